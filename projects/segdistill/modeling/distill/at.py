"""AT: attention transfer (Zagoruyko & Komodakis, ICLR 2017).

The spatial attention map of a feature ``f`` (N x C x h x w) is ``a = mean_c |f_c|^p``
(p = 2), flattened and L2-normalised per image, ``q = a / ||a||_2``. For every tapped pair::

    code (default):  l_at = 1 / (N h w) * sum_{n,i} (q^S_{n,i} - q^T_{n,i})^2
    paper (Eq. 2):   l_at = 1 / N * sum_n 1/2 * ||q^S_n - q^T_n||_2

summed over the pairs (``loss_at``). The "code" form is that of the authors' code
(szagoruyko/attention-transfer ``at_loss``) and of CIRKD's segmentation setting
(winycg/CIRKD ``losses/at.py``, ``scripts/train_kd/train_at.sh``: weight 10000 on the head's
pre-classifier features, with the pixel-wise KD ``pd``); the weight is tuned for it.
Student and teacher may have different channel counts (the maps average them away).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

from detectron2.config import configurable

from .base import DistillLoss, register_distill_loss

__all__ = ["attention_map", "at_loss", "AttentionTransfer", "AT_FORMS"]

AT_FORMS = ("code", "paper")


def attention_map(feat: torch.Tensor, p: float) -> torch.Tensor:
    """N x hw L2-normalised ``mean_c |f_c|^p``."""
    return F.normalize(feat.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(student: torch.Tensor, teacher: torch.Tensor, *, p: float, form: str) -> torch.Tensor:
    diff = attention_map(student, p) - attention_map(teacher, p)
    if form == "code":
        return diff.pow(2).mean()
    return 0.5 * diff.norm(dim=1).mean()


@register_distill_loss("at")
class AttentionTransfer(DistillLoss):
    """AT; ``MODEL.DISTILL.AT``."""

    @configurable
    def __init__(self, *, loss_weight: float, taps: Sequence[str], p: float, form: str):
        if not taps:
            raise ValueError("MODEL.DISTILL.AT.TAPS is empty: name the taps to compare (e.g. ['head_features']).")
        if form not in AT_FORMS:
            raise ValueError(f"MODEL.DISTILL.AT.FORM must be one of {AT_FORMS}, got {form!r}.")
        super().__init__(loss_weight=loss_weight, taps=[(t, t) for t in taps])
        self.p, self.form = float(p), form

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.DISTILL.AT
        return {"loss_weight": c.WEIGHT, "taps": list(c.TAPS), "p": c.P, "form": c.FORM}

    def forward(self, student_feature, teacher_feature):
        return at_loss(student_feature, teacher_feature, p=self.p, form=self.form)

    def distill(self, batch):
        return {"loss_at": self.loss_weight * sum(self(*batch.pair(pair)) for pair in self.taps)}
