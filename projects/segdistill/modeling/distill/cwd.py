"""CWD: channel-wise distillation (Shu et al., ICCV 2021) on the logits.

FAKD Eq. 2, HWD Eq. 2-3: each channel c of an image's logits becomes a distribution over the
h x w positions, ``p_c = softmax_i(z_{c,i} / T)``, and

    CWD = T^2 / (N C) * sum_n sum_c KL( p^T_{n,c} || p^S_{n,c} )     (KL summed over positions)

With a ``valid`` mask, the positions outside it are left out of every spatial softmax (an
image whose channel has no valid position contributes 0). HWD (``hwd.py``) and FAKD's
CWD-aug (``fakd.py``) build on the helpers here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from .base import TemperedLogitsLoss, as_float, register_distill_loss

__all__ = ["channel_kl", "channel_distributions", "cwd_loss", "ChannelWiseDistillation", "flatten_masked"]

# Masked positions get this logit: exp() of it is 0, and it stays finite (no NaN gradients).
_MASKED_LOGIT = -1e9


def flatten_masked(x: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """N x C x h x w -> N x C x hw float, masked positions set to a huge negative logit."""
    x = as_float(x).flatten(2)
    if valid is not None:
        x = x.masked_fill(~valid.flatten(1)[:, None, :], _MASKED_LOGIT)
    return x


def channel_distributions(logits: torch.Tensor, temperature: float, valid: Optional[torch.Tensor] = None):
    """Log of the spatial softmax of every channel, N x C x hw (``logits / T``)."""
    return F.log_softmax(flatten_masked(logits / temperature, valid), dim=-1)


def channel_kl(student_scaled: torch.Tensor, teacher_scaled: torch.Tensor,
               valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per (image, channel) KL(teacher || student) of the spatial softmaxes, N x C.

    Inputs are already divided by the temperature.
    """
    log_ps = F.log_softmax(flatten_masked(student_scaled, valid), dim=-1)
    log_pt = F.log_softmax(flatten_masked(teacher_scaled, valid), dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)


def cwd_loss(student_logits, teacher_logits, temperature: float, valid=None) -> torch.Tensor:
    """CWD: T^2 / (N C) x the sum of the per-channel spatial KLs."""
    n, c = student_logits.shape[:2]
    t = float(temperature)
    kl = channel_kl(student_logits / t, teacher_logits / t, valid)
    return t * t * kl.sum() / (n * c)


@register_distill_loss("cwd")
class ChannelWiseDistillation(TemperedLogitsLoss):
    """CWD on the logits; ``MODEL.DISTILL.CWD`` (temperature 4, weight 3, as in CWD/HWD/FAKD)."""

    loss_fn = staticmethod(cwd_loss)
    # MODEL.DISTILL.CWD (FAKD Eq. 2, HWD Eq. 3): KL of each channel's spatial softmax at TEMPERATURE.
    defaults = {"WEIGHT": 3.0, "TEMPERATURE": 4.0}
