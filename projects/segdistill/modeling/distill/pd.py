"""PD: pixel-wise distillation, the per-pixel KL between teacher and student class distributions.

FAKD (Yuan et al., WACV 2024) Eq. 1, with a temperature as in Hinton et al.::

    PD = T^2 / M * sum_i KL( softmax(t_i / T) || softmax(s_i / T) )

over the M pixels of the batch (only the valid ones when a ``valid`` mask is given), on the
``logits`` taps (the teacher's resized to the student's). Eq. 1 is written as a
cross-entropy; it differs from the KL by the teacher's entropy, a constant with no gradient,
so the value here is the KL (0 when the student matches the teacher). At T = 1 this is also
the "KD" term of the CIRKD, HWD and DIST codebases (``CriterionKD``: ``kl_div(batchmean)``
over the pixels).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from .base import TemperedLogitsLoss, as_float, masked_mean, register_distill_loss

__all__ = ["pixel_kl", "PixelWiseDistillation"]


def pixel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
             valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T^2 x the mean over (valid) pixels of KL(teacher || student) over the classes (dim 1)."""
    t = float(temperature)
    log_ps = F.log_softmax(as_float(student_logits) / t, dim=1)
    log_pt = F.log_softmax(as_float(teacher_logits) / t, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)  # N x h x w
    return t * t * masked_mean(kl, valid)


@register_distill_loss("pd")
class PixelWiseDistillation(TemperedLogitsLoss):
    """PD (FAKD Eq. 1) on the logits; ``MODEL.DISTILL.PD``."""

    loss_fn = staticmethod(pixel_kl)
    # MODEL.DISTILL.PD (FAKD Eq. 1): per-pixel KL of the class distributions at TEMPERATURE (x T^2).
    defaults = {"WEIGHT": 1.0, "TEMPERATURE": 1.0}
