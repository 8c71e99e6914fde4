"""Channel-wise distillation: CWD (Shu et al., ICCV 2021) and HWD (Sun et al., ICME 2023).

CWD (FAKD Eq. 2, HWD Eq. 2-3): each channel c of an image's logits becomes a distribution over
the h x w positions, ``p_c = softmax_i(z_{c,i} / tau)``, and

    CWD = tau^2 / (N C) * sum_n sum_c KL( p^T_{n,c} || p^S_{n,c} )     (KL summed over positions)

HWD (HWD paper, section III-C) weights each (image, channel) KL by ``w_{n,c}``, computed
without gradient from how far the student is from the teacher on that channel:

1. channel divergence ``CD_c = mean_i (p^T_{c,i} - p^S_{c,i})^2`` on the activation maps
   (``divergence_input="logits"`` uses the raw logits, the authors' code's other mode);
2. optionally ``CD_c / (N_c + 1)`` with ``N_c`` the image's pixel count of class c
   (``pixel_correction``; labels at the logits' size, ignore pixels not counted);
3. per image, ``w^n_c = mu + (CD_c - mean(CD)) / std(CD) * sigma`` (std over the C channels,
   unbiased as in the authors' code), computed on ``CD / mean(CD)`` with ``eps`` added to the
   std, so that the epsilon is relative to the divergences' scale;
4. ``w_c = C * softmax_c((1 - beta^{w^n_c}) / (1 - beta))``, so the weights sum to C per image.

    HWD = tau^2 / (N C) * sum_n sum_c w_{n,c} KL( p^T_{n,c} || p^S_{n,c} )

With a ``valid`` mask, the positions outside it are left out of every spatial softmax (an
image whose channel has no valid position contributes 0).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .pixel_wise import as_float

__all__ = [
    "channel_kl", "channel_distributions", "cwd_loss", "hwd_weights", "hwd_loss",
    "ChannelWiseDistillation", "HolisticWeightedDistillation", "class_pixel_counts",
]

# Masked positions get this logit: exp() of it is 0, and it stays finite (no NaN gradients).
_MASKED_LOGIT = -1e9


def _flatten(x: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """N x C x h x w -> N x C x hw float, masked positions set to a huge negative logit."""
    x = as_float(x).flatten(2)
    if valid is not None:
        x = x.masked_fill(~valid.flatten(1)[:, None, :], _MASKED_LOGIT)
    return x


def channel_distributions(logits: torch.Tensor, tau: float, valid: Optional[torch.Tensor] = None):
    """Log of the spatial softmax of every channel, N x C x hw (``logits / tau``)."""
    return F.log_softmax(_flatten(logits / tau, valid), dim=-1)


def channel_kl(
    student_scaled: torch.Tensor, teacher_scaled: torch.Tensor, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per (image, channel) KL(teacher || student) of the spatial softmaxes, N x C.

    Inputs are already divided by the temperature.
    """
    log_ps = F.log_softmax(_flatten(student_scaled, valid), dim=-1)
    log_pt = F.log_softmax(_flatten(teacher_scaled, valid), dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)


def cwd_loss(student_logits, teacher_logits, tau: float = 4.0, valid=None) -> torch.Tensor:
    """CWD: tau^2 / (N C) x the sum of the per-channel spatial KLs."""
    n, c = student_logits.shape[:2]
    kl = channel_kl(student_logits / tau, teacher_logits / tau, valid)
    return tau * tau * kl.sum() / (n * c)


def class_pixel_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """N x C pixel count of every class in every image (one bincount; ignore pixels skipped)."""
    n = labels.shape[0]
    flat = labels.reshape(n, -1).long()
    keep = (flat >= 0) & (flat < num_classes)
    index = (flat + num_classes * torch.arange(n, device=flat.device)[:, None])[keep]
    return torch.bincount(index, minlength=n * num_classes).view(n, num_classes)


@torch.no_grad()
def hwd_weights(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tau: float = 4.0,
    beta: float = 0.1,
    mu: float = 1.0,
    sigma: float = 1.0,
    eps: float = 1e-8,
    pixel_correction: bool = False,
    labels: Optional[torch.Tensor] = None,
    valid: Optional[torch.Tensor] = None,
    divergence_input: str = "activation",
    maps: Optional[tuple] = None,
) -> torch.Tensor:
    """HWD's per-image channel weights, N x C, each row summing to C (no gradient).

    ``maps``: the (student, teacher) activation maps N x C x hw when the caller has them.
    """
    n, c = student_logits.shape[:2]
    if divergence_input == "activation":
        if maps is not None:
            s, t = maps
        else:
            s = channel_distributions(student_logits, tau, valid).exp()
            t = channel_distributions(teacher_logits, tau, valid).exp()
    elif divergence_input == "logits":
        s, t = _flatten(student_logits, None), _flatten(teacher_logits, None)
        if valid is not None:
            m = valid.flatten(1)[:, None, :].to(s.dtype)
            s, t = s * m, t * m
    else:
        raise ValueError(f"HWD divergence_input must be 'activation' or 'logits', got {divergence_input!r}.")
    sq = (t - s).pow(2)
    if valid is None:
        divergence = sq.mean(dim=-1).double()
    else:
        divergence = sq.sum(dim=-1).double() / valid.flatten(1).sum(dim=1, keepdim=True).clamp(min=1).double()
    if pixel_correction:
        if labels is None:
            raise ValueError("HWD pixel_correction needs the labels (the teacher-student pair got none).")
        divergence = divergence / (class_pixel_counts(labels, c).double() + 1.0)
    if c > 1:
        # The z-score is scale-free; dividing by the mean first makes ``eps`` scale-free too
        # (divergences of activation maps are ~1/(hw)^2 small).
        rel = divergence / divergence.mean(dim=1, keepdim=True).clamp(min=torch.finfo(divergence.dtype).tiny)
        normalised = mu + (rel - rel.mean(dim=1, keepdim=True)) / (rel.std(dim=1, keepdim=True) + eps) * sigma
    else:
        normalised = torch.full_like(divergence, float(mu))
    smoothed = (1.0 - torch.pow(float(beta), normalised)) / (1.0 - beta)
    return (c * torch.softmax(smoothed, dim=1)).to(s.dtype)


def hwd_loss(student_logits, teacher_logits, weights: torch.Tensor, tau: float = 4.0, valid=None):
    """HWD: tau^2 / (N C) x the weighted sum of the per-channel spatial KLs."""
    n, c = student_logits.shape[:2]
    kl = channel_kl(student_logits / tau, teacher_logits / tau, valid)
    return tau * tau * (weights.detach() * kl).sum() / (n * c)


class ChannelWiseDistillation(nn.Module):
    """CWD as a loss term (defaults: tau 4, weight 3, as in CWD/HWD/FAKD)."""

    name = "cwd"
    needs_classifier = False

    def __init__(self, tau: float = 4.0, loss_weight: float = 3.0):
        super().__init__()
        if tau <= 0:
            raise ValueError(f"CWD tau must be > 0, got {tau}.")
        self.tau = float(tau)
        self.loss_weight = float(loss_weight)

    def forward(self, student_logits, teacher_logits, labels=None, valid=None, **unused):
        return cwd_loss(student_logits, teacher_logits, self.tau, valid)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, loss_weight={self.loss_weight}"


class HolisticWeightedDistillation(nn.Module):
    """HWD as a loss term.

    Defaults follow the authors' recommended run (tau 4, alpha 3, beta 0.1, mu 1, sigma 1,
    no pixel correction); the paper's ablation setting is ``mu=0, pixel_correction=True``.
    """

    name = "hwd"
    needs_classifier = False

    def __init__(
        self,
        tau: float = 4.0,
        loss_weight: float = 3.0,
        *,
        beta: float = 0.1,
        mu: float = 1.0,
        sigma: float = 1.0,
        eps: float = 1e-8,
        pixel_correction: bool = False,
        divergence_input: str = "activation",
    ):
        super().__init__()
        if tau <= 0:
            raise ValueError(f"HWD tau must be > 0, got {tau}.")
        if not 0.0 < beta < 1.0:
            raise ValueError(f"HWD beta must be in (0, 1), got {beta}.")
        if divergence_input not in ("activation", "logits"):
            raise ValueError(f"HWD divergence_input must be 'activation' or 'logits', got {divergence_input!r}.")
        self.tau = float(tau)
        self.loss_weight = float(loss_weight)
        self.beta, self.mu, self.sigma, self.eps = float(beta), float(mu), float(sigma), float(eps)
        self.pixel_correction = bool(pixel_correction)
        self.divergence_input = divergence_input

    def weights(self, student_logits, teacher_logits, labels=None, valid=None) -> torch.Tensor:
        return hwd_weights(
            student_logits, teacher_logits, tau=self.tau, beta=self.beta, mu=self.mu, sigma=self.sigma,
            eps=self.eps, pixel_correction=self.pixel_correction, labels=labels, valid=valid,
            divergence_input=self.divergence_input,
        )

    def forward(self, student_logits, teacher_logits, labels=None, valid=None, **unused):
        n, c = student_logits.shape[:2]
        log_ps = channel_distributions(student_logits, self.tau, valid)
        log_pt = channel_distributions(teacher_logits, self.tau, valid)
        pt = log_pt.exp()
        maps = (log_ps.detach().exp(), pt) if self.divergence_input == "activation" else None
        w = hwd_weights(
            student_logits, teacher_logits, tau=self.tau, beta=self.beta, mu=self.mu, sigma=self.sigma,
            eps=self.eps, pixel_correction=self.pixel_correction, labels=labels, valid=valid,
            divergence_input=self.divergence_input, maps=maps,
        )
        kl = (pt * (log_pt - log_ps)).sum(dim=-1)
        return self.tau * self.tau * (w * kl).sum() / (n * c)

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, loss_weight={self.loss_weight}, beta={self.beta}, mu={self.mu}, "
                f"sigma={self.sigma}, pixel_correction={self.pixel_correction}, "
                f"divergence_input={self.divergence_input!r}")
