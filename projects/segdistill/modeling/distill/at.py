"""AT: attention transfer (Zagoruyko & Komodakis, ICLR 2017).

The spatial attention map of a feature ``f`` (N x C x h x w) is ``a = mean_c |f_c|^p``
(p = 2), flattened and L2-normalised per image, ``q = a / ||a||_2``. For every tapped pair
(``student_tap[i]``, ``teacher_tap[i]``; the teacher's map resized to the student's)::

    variant "code" (default):  l_at = 1 / (N h w) * sum_{n,i} (q^S_{n,i} - q^T_{n,i})^2
    variant "paper" (Eq. 2):   l_at = 1 / N * sum_n 1/2 * ||q^S_n - q^T_n||_2

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

__all__ = ["attention_map", "at_loss", "AttentionTransfer", "AT_VARIANTS"]

AT_VARIANTS = ("code", "paper")


def attention_map(feat: torch.Tensor, p: float) -> torch.Tensor:
    """N x hw L2-normalised ``mean_c |f_c|^p``."""
    return F.normalize(feat.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(student: torch.Tensor, teacher: torch.Tensor, *, p: float, variant: str) -> torch.Tensor:
    diff = attention_map(student, p) - attention_map(teacher, p)
    if variant == "code":
        return diff.pow(2).mean()
    return 0.5 * diff.norm(dim=1).mean()


@register_distill_loss("at")
class AttentionTransfer(DistillLoss):
    """AT; ``MODEL.DISTILL.AT``."""

    @configurable
    def __init__(self, *, loss_weight: float, student_tap: Sequence[str], teacher_tap: Sequence[str], p: float,
                 variant: str):
        student_tap, teacher_tap = list(student_tap), list(teacher_tap)
        if not student_tap or len(student_tap) != len(teacher_tap):
            raise ValueError(
                f"MODEL.DISTILL.AT.STUDENT_TAP {student_tap} and TEACHER_TAP {teacher_tap} must name the taps to "
                "compare, paired by position: two non-empty lists of one length (e.g. ['head_features'] both)."
            )
        if variant not in AT_VARIANTS:
            raise ValueError(f"MODEL.DISTILL.AT.VARIANT must be one of {AT_VARIANTS}, got {variant!r}.")
        super().__init__(loss_weight=loss_weight, taps=list(zip(student_tap, teacher_tap)))
        self.p, self.variant = float(p), variant

    @classmethod
    def add_config(cls, cfg):
        # AT (Zagoruyko & Komodakis, ICLR 2017): L2-normalised spatial attention maps mean_c |f_c|^P.
        # Defaults: CIRKD's segmentation setting (scripts/train_kd/train_at.sh, losses/at.py).
        cfg.MODEL.DISTILL.AT.WEIGHT = 10000.0
        # The taps compared, as two lists paired by position (AT sums the terms of several pairs;
        # the maps average the channels away, so the pairs need not have equal channel counts).
        cfg.MODEL.DISTILL.AT.STUDENT_TAP = ["head_features"]
        cfg.MODEL.DISTILL.AT.TEACHER_TAP = ["head_features"]
        cfg.MODEL.DISTILL.AT.P = 2.0
        # "code": mean squared difference of the normalised maps (the authors' and CIRKD's code);
        # "paper": half the L2 norm of their difference per image (AT Eq. 2), averaged over images.
        cfg.MODEL.DISTILL.AT.VARIANT = "code"

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.DISTILL.AT
        return {"loss_weight": c.WEIGHT, "student_tap": c.STUDENT_TAP, "teacher_tap": c.TEACHER_TAP, "p": c.P,
                "variant": c.VARIANT}

    def forward(self, student_feature, teacher_feature):
        return at_loss(student_feature, teacher_feature, p=self.p, variant=self.variant)

    def distill(self, batch):
        return {"loss_at": self.loss_weight * sum(self(*batch.pair(pair)) for pair in self.taps)}
