"""HWD: holistic weighted distillation (Sun et al., ICME 2023), CWD with per-image channel weights.

HWD section III-C weights each (image, channel) KL of CWD (``cwd.py``) by ``w_{n,c}``,
computed without gradient from how far the student is from the teacher on that channel:

1. channel divergence ``CD_c = mean_i (p^T_{c,i} - p^S_{c,i})^2`` on the activation maps
   (``variant="paper"``, also the authors' recommended run; ``variant="code"`` uses the raw
   logits, the authors' code without ``--activation``);
2. optionally ``CD_c / (N_c + 1)`` with ``N_c`` the image's pixel count of class c
   (``pixel_correction``; labels at the logits' size, ignore pixels not counted);
3. per image, ``w^n_c = mu + (CD_c - mean(CD)) / std(CD) * sigma`` (std over the C channels,
   unbiased as in the authors' code), computed on ``CD / mean(CD)`` with ``eps`` added to the
   std, so that the epsilon is relative to the divergences' scale;
4. ``w_c = C * softmax_c((1 - beta^{w^n_c}) / (1 - beta))``, so the weights sum to C per image.

    HWD = T^2 / (N C) * sum_n sum_c w_{n,c} KL( p^T_{n,c} || p^S_{n,c} )

Defaults (``MODEL.DISTILL.HWD``) follow the authors' recommended run (zju-SWJ/HWD
``train_hwd.py``); the paper's ablation setting is ``MU 0.0, PIXEL_CORRECTION True``.
"""
from __future__ import annotations

from typing import Optional

import torch

from detectron2.config import configurable

from .base import DistillLoss, register_distill_loss
from .cwd import channel_distributions, channel_kl, flatten_masked
from .taps import LOGITS

__all__ = ["hwd_weights", "hwd_loss", "HolisticWeightedDistillation", "class_pixel_counts", "HWD_VARIANTS"]

# "paper": divergences of the activation maps (spatial softmax); "code": of the raw logits.
HWD_VARIANTS = ("paper", "code")


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
    temperature: float,
    beta: float,
    mu: float,
    sigma: float,
    eps: float,
    pixel_correction: bool,
    variant: str,
    labels: Optional[torch.Tensor] = None,
    valid: Optional[torch.Tensor] = None,
    maps: Optional[tuple] = None,
) -> torch.Tensor:
    """HWD's per-image channel weights, N x C, each row summing to C (no gradient).

    ``maps``: the (student, teacher) activation maps N x C x hw when the caller has them.
    """
    n, c = student_logits.shape[:2]
    if variant == "paper":
        if maps is not None:
            s, t = maps
        else:
            s = channel_distributions(student_logits, temperature, valid).exp()
            t = channel_distributions(teacher_logits, temperature, valid).exp()
    elif variant == "code":
        s, t = flatten_masked(student_logits, None), flatten_masked(teacher_logits, None)
        if valid is not None:
            m = valid.flatten(1)[:, None, :].to(s.dtype)
            s, t = s * m, t * m
    else:
        raise ValueError(f"HWD variant must be one of {HWD_VARIANTS}, got {variant!r}.")
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


def hwd_loss(student_logits, teacher_logits, weights: torch.Tensor, temperature: float, valid=None):
    """HWD: T^2 / (N C) x the weighted sum of the per-channel spatial KLs."""
    n, c = student_logits.shape[:2]
    t = float(temperature)
    kl = channel_kl(student_logits / t, teacher_logits / t, valid)
    return t * t * (weights.detach() * kl).sum() / (n * c)


@register_distill_loss("hwd")
class HolisticWeightedDistillation(DistillLoss):
    """HWD on the logits; ``MODEL.DISTILL.HWD``."""

    @configurable
    def __init__(self, *, temperature: float, loss_weight: float, beta: float, mu: float, sigma: float,
                 eps: float, pixel_correction: bool, variant: str):
        super().__init__(loss_weight=loss_weight, taps=[(LOGITS, LOGITS)])
        if temperature <= 0:
            raise ValueError(f"MODEL.DISTILL.HWD.TEMPERATURE must be > 0, got {temperature}.")
        if not 0.0 < beta < 1.0:
            raise ValueError(f"MODEL.DISTILL.HWD.BETA must be in (0, 1), got {beta}.")
        if variant not in HWD_VARIANTS:
            raise ValueError(f"MODEL.DISTILL.HWD.VARIANT must be one of {HWD_VARIANTS}, got {variant!r}.")
        self.temperature = float(temperature)
        self.beta, self.mu, self.sigma, self.eps = float(beta), float(mu), float(sigma), float(eps)
        self.pixel_correction = bool(pixel_correction)
        self.variant = variant

    @classmethod
    def add_config(cls, cfg):
        # HWD (HWD section III-C): CWD with per-image channel weights. Defaults: the authors' recommended
        # run; the paper's variant is MU 0.0 + PIXEL_CORRECTION True.
        cfg.MODEL.DISTILL.HWD.WEIGHT = 3.0  # alpha
        cfg.MODEL.DISTILL.HWD.TEMPERATURE = 4.0
        cfg.MODEL.DISTILL.HWD.BETA = 0.1  # smoothing, in (0, 1)
        cfg.MODEL.DISTILL.HWD.MU = 1.0  # mean of the normalised divergences
        cfg.MODEL.DISTILL.HWD.SIGMA = 1.0  # their standard deviation
        cfg.MODEL.DISTILL.HWD.EPS = 1e-8  # added to the std of the divergences / their mean (relative)
        # Divide each channel's divergence by (its class's pixel count in the image + 1).
        cfg.MODEL.DISTILL.HWD.PIXEL_CORRECTION = False
        # "paper": the divergence of the activation maps (spatial softmax; paper and recommended run);
        # "code": of the raw logits (the authors' code without --activation).
        cfg.MODEL.DISTILL.HWD.VARIANT = "paper"

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.DISTILL.HWD
        return {"temperature": c.TEMPERATURE, "loss_weight": c.WEIGHT, "beta": c.BETA, "mu": c.MU,
                "sigma": c.SIGMA, "eps": c.EPS, "pixel_correction": c.PIXEL_CORRECTION,
                "variant": c.VARIANT}

    def bind(self, student, teacher, *, num_classes):
        self.check_same_channels(student, teacher)

    def _settings(self):
        return dict(temperature=self.temperature, beta=self.beta, mu=self.mu, sigma=self.sigma, eps=self.eps,
                    pixel_correction=self.pixel_correction, variant=self.variant)

    def weights(self, student_logits, teacher_logits, labels=None, valid=None) -> torch.Tensor:
        return hwd_weights(student_logits, teacher_logits, labels=labels, valid=valid, **self._settings())

    def forward(self, student_logits, teacher_logits, labels=None, valid=None):
        n, c = student_logits.shape[:2]
        log_ps = channel_distributions(student_logits, self.temperature, valid)
        log_pt = channel_distributions(teacher_logits, self.temperature, valid)
        pt = log_pt.exp()
        maps = (log_ps.detach().exp(), pt) if self.variant == "paper" else None
        w = hwd_weights(student_logits, teacher_logits, labels=labels, valid=valid, maps=maps, **self._settings())
        kl = (pt * (log_pt - log_ps)).sum(dim=-1)
        return self.temperature * self.temperature * (w * kl).sum() / (n * c)

    def distill(self, batch):
        s, t = batch.pair(self.taps[0])
        size = s.shape[-2:]
        labels = batch.labels(size) if self.pixel_correction else None
        return {"loss_hwd": self.loss_weight * self(s, t, labels, batch.valid(size))}

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, beta={self.beta}, mu={self.mu}, sigma={self.sigma}, "
                f"pixel_correction={self.pixel_correction}, variant={self.variant!r}, "
                + super().extra_repr())
