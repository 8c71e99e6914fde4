"""Pixel-wise distillation (PD): per-pixel KL between teacher and student class distributions.

FAKD (Yuan et al., AAAI 2023) Eq. 1, with a temperature as in Hinton et al.:

    PD = T^2 / M * sum_i KL( softmax(t_i / T) || softmax(s_i / T) )

over the M pixels of the batch (only the valid ones when a ``valid`` mask is given). Eq. 1
is written as a cross-entropy; it differs from the KL by the teacher's entropy, a constant
with no gradient, so the value here is the KL (0 when the student matches the teacher).

Every distillation loss of this package has the same call signature (the :class:`Distiller`
calls them all alike)::

    loss(student_logits, teacher_logits, labels=None, valid=None, *,
         classifier=None, covariance=None, lam=0.0) -> scalar tensor (unweighted)

with logits N x C x h x w at the same size, ``labels`` N x h x w at that size (values outside
``[0, C)`` are ignore pixels), ``valid`` an optional N x h x w bool mask of the pixels that
count, and FAKD's extras (the student's 1x1 classifier, the class covariance, lambda).
Each module also carries its ``loss_weight``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["pixel_kl", "PixelWiseDistillation", "label_mask", "as_float"]


def as_float(x: torch.Tensor) -> torch.Tensor:
    """float32 for half/bfloat16 logits (AMP), float64 kept as is."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def label_mask(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """True where ``labels`` is a class (``0 <= label < num_classes``), False at ignore pixels."""
    return (labels >= 0) & (labels < num_classes)


def _masked_mean(values: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    if valid is None:
        return values.mean()
    valid = valid.to(values.dtype)
    return (values * valid).sum() / valid.sum().clamp(min=1.0)


def pixel_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """T^2 x the mean over (valid) pixels of KL(teacher || student) over the classes (dim 1)."""
    t = float(temperature)
    log_ps = F.log_softmax(as_float(student_logits) / t, dim=1)
    log_pt = F.log_softmax(as_float(teacher_logits) / t, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)  # N x h x w
    return t * t * _masked_mean(kl, valid)


class PixelWiseDistillation(nn.Module):
    """PD (FAKD Eq. 1) as a loss term: ``loss_weight`` is applied by the caller."""

    name = "pd"
    needs_classifier = False

    def __init__(self, temperature: float = 1.0, loss_weight: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"PD temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)
        self.loss_weight = float(loss_weight)

    def forward(self, student_logits, teacher_logits, labels=None, valid=None, **unused):
        return pixel_kl(student_logits, teacher_logits, self.temperature, valid)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, loss_weight={self.loss_weight}"
