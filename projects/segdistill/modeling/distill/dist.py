"""DIST: knowledge distillation from a stronger teacher (Huang et al., NeurIPS 2022), per pixel.

With ``Y^S``, ``Y^T`` the P x K matrices of class distributions of the P pixels of the batch
(``softmax(z / T)`` of the logits, ``variant="paper"``, also the authors' code;
``variant="hwd"``: the raw logits, as HWD's re-implementation) and
``rho(u, v) = cos(u - mean(u), v - mean(v))`` the Pearson correlation (``cos`` with 1e-8 added
to the product of the norms, as the authors' code)::

    inter = 1 - 1/P * sum_p rho(Y^S_{p,:}, Y^T_{p,:})        (relations between the classes of a pixel)
    intra = 1 - 1/K * sum_k rho(Y^S_{:,k}, Y^T_{:,k})        (relations of a class across the pixels)
    l_dist = T^2 * (beta * inter + gamma * intra)                                      (loss_dist)

with the paper's beta and gamma the weights ``inter_weight`` and ``intra_weight``. Defaults: the
authors' segmentation code (hunto/DIST_KD ``segmentation/losses/dist_kd.py``,
``segmentation/train_kd.py``): beta = gamma = 1, no temperature (T = 1), weight 1. Their
script also distils the auxiliary head's logits (x 0.4); the teacher's auxiliary head is not
a tap here (it does not run in eval()), so that term is left out.
"""
from __future__ import annotations

import torch

from detectron2.config import configurable

from .base import DistillLoss, register_distill_loss
from .taps import LOGITS

__all__ = ["pearson", "dist_loss", "RelationDistillation", "DIST_VARIANTS"]

# The relations of the class "paper" distributions (softmax at T) or, as HWD's code ("hwd"), of the raw logits.
DIST_VARIANTS = ("paper", "hwd")


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation of two R x D matrices (the authors' eps)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, inter_weight: float,
              intra_weight: float, temperature: float, variant: str = "paper") -> torch.Tensor:
    """DIST over every pixel of the batch (logits N x K x h x w)."""
    k = student_logits.shape[1]
    s = student_logits.permute(0, 2, 3, 1).reshape(-1, k)
    t = teacher_logits.permute(0, 2, 3, 1).reshape(-1, k)
    if variant == "paper":
        s, t = torch.softmax(s / temperature, dim=1), torch.softmax(t / temperature, dim=1)
    inter = 1.0 - pearson(s, t).mean()
    intra = 1.0 - pearson(s.t(), t.t()).mean()
    return temperature ** 2 * (inter_weight * inter + intra_weight * intra)


@register_distill_loss("dist")
class RelationDistillation(DistillLoss):
    """DIST on the logits; ``MODEL.DISTILL.DIST``."""

    @configurable
    def __init__(self, *, loss_weight: float, inter_weight: float, intra_weight: float, temperature: float,
                 variant: str):
        super().__init__(loss_weight=loss_weight, taps=[(LOGITS, LOGITS)])
        if temperature <= 0:
            raise ValueError(f"MODEL.DISTILL.DIST.TEMPERATURE must be > 0, got {temperature}.")
        if variant not in DIST_VARIANTS:
            raise ValueError(f"MODEL.DISTILL.DIST.VARIANT must be one of {DIST_VARIANTS}, got {variant!r}.")
        self.inter_weight, self.intra_weight = float(inter_weight), float(intra_weight)
        self.temperature, self.variant = float(temperature), variant

    @classmethod
    def add_config(cls, cfg):
        # DIST (Huang et al., NeurIPS 2022): inter-class and intra-class Pearson correlation of the
        # per-pixel class distributions. Defaults: the authors' segmentation code (hunto/DIST_KD
        # segmentation/losses/dist_kd.py, train_kd.py).
        cfg.MODEL.DISTILL.DIST.WEIGHT = 1.0
        cfg.MODEL.DISTILL.DIST.INTER_WEIGHT = 1.0  # the paper's beta
        cfg.MODEL.DISTILL.DIST.INTRA_WEIGHT = 1.0  # the paper's gamma
        cfg.MODEL.DISTILL.DIST.TEMPERATURE = 1.0
        # Relations of the probabilities (softmax at TEMPERATURE; "paper", also the authors' code) or
        # of the raw logits ("hwd": HWD's code).
        cfg.MODEL.DISTILL.DIST.VARIANT = "paper"

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.DISTILL.DIST
        return {"loss_weight": c.WEIGHT, "inter_weight": c.INTER_WEIGHT,
                "intra_weight": c.INTRA_WEIGHT, "temperature": c.TEMPERATURE, "variant": c.VARIANT}

    def bind(self, student, teacher, *, num_classes):
        self.check_same_channels(student, teacher)

    def forward(self, student_logits, teacher_logits):
        return dist_loss(student_logits, teacher_logits, inter_weight=self.inter_weight,
                         intra_weight=self.intra_weight, temperature=self.temperature, variant=self.variant)

    def distill(self, batch):
        return {"loss_dist": self.loss_weight * self(*batch.pair(self.taps[0]))}
