"""DIST: knowledge distillation from a stronger teacher (Huang et al., NeurIPS 2022), per pixel.

With ``Y^S``, ``Y^T`` the P x K matrices of class distributions of the P pixels of the batch
(``softmax(z / T)`` of the logits; ``input="logits"``: the raw logits, as HWD's code) and
``rho(u, v) = cos(u - mean(u), v - mean(v))`` the Pearson correlation (``cos`` with 1e-8 added
to the product of the norms, as the authors' code)::

    inter = 1 - 1/P * sum_p rho(Y^S_{p,:}, Y^T_{p,:})        (relations between the classes of a pixel)
    intra = 1 - 1/K * sum_k rho(Y^S_{:,k}, Y^T_{:,k})        (relations of a class across the pixels)
    l_dist = T^2 * (beta * inter + gamma * intra)                                      (loss_dist)

Defaults: the authors' segmentation code (hunto/DIST_KD ``segmentation/losses/dist_kd.py``,
``segmentation/train_kd.py``): beta = gamma = 1, no temperature (T = 1), weight 1. Their
script also distils the auxiliary head's logits (x 0.4); the teacher's auxiliary head is not
a tap here (it does not run in eval()), so that term is left out.
"""
from __future__ import annotations

import torch

from detectron2.config import configurable

from .base import DistillLoss, register_distill_loss
from .taps import LOGITS

__all__ = ["pearson", "dist_loss", "RelationDistillation", "DIST_INPUTS"]

DIST_INPUTS = ("probabilities", "logits")


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation of two R x D matrices (the authors' eps)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float, gamma: float,
              temperature: float, input: str = "probabilities") -> torch.Tensor:
    """DIST over every pixel of the batch (logits N x K x h x w)."""
    k = student_logits.shape[1]
    s = student_logits.permute(0, 2, 3, 1).reshape(-1, k)
    t = teacher_logits.permute(0, 2, 3, 1).reshape(-1, k)
    if input == "probabilities":
        s, t = torch.softmax(s / temperature, dim=1), torch.softmax(t / temperature, dim=1)
    inter = 1.0 - pearson(s, t).mean()
    intra = 1.0 - pearson(s.t(), t.t()).mean()
    return temperature ** 2 * (beta * inter + gamma * intra)


@register_distill_loss("dist")
class RelationDistillation(DistillLoss):
    """DIST on the logits; ``MODEL.DISTILL.DIST``."""

    @configurable
    def __init__(self, *, loss_weight: float, beta: float, gamma: float, temperature: float, input: str):
        super().__init__(loss_weight=loss_weight, taps=[(LOGITS, LOGITS)])
        if temperature <= 0:
            raise ValueError(f"MODEL.DISTILL.DIST.TEMPERATURE must be > 0, got {temperature}.")
        if input not in DIST_INPUTS:
            raise ValueError(f"MODEL.DISTILL.DIST.INPUT must be one of {DIST_INPUTS}, got {input!r}.")
        self.beta, self.gamma, self.temperature, self.input = float(beta), float(gamma), float(temperature), input

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.DISTILL.DIST
        return {"loss_weight": c.WEIGHT, "beta": c.BETA, "gamma": c.GAMMA, "temperature": c.TEMPERATURE,
                "input": c.INPUT}

    def bind(self, student, teacher, *, num_classes):
        self.check_same_channels(student, teacher)

    def forward(self, student_logits, teacher_logits):
        return dist_loss(student_logits, teacher_logits, beta=self.beta, gamma=self.gamma,
                         temperature=self.temperature, input=self.input)

    def distill(self, batch):
        return {"loss_dist": self.loss_weight * self(*batch.pair(self.taps[0]))}
