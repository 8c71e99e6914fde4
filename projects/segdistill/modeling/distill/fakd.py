"""FAKD (Yuan et al., WACV 2024): CWD-aug (Eq. 7) and PD-aug (Eq. 8).

The student's pre-classifier feature ``s_i`` of pixel i is augmented infinitely many times,
``s^_i ~ N(s_i, lambda Sigma)``, with Sigma the online class-conditional covariance of the
student's features (:class:`ClassCovariance`). The loss averaged over the augmentations is
bounded (Jensen, then the Gaussian moment-generating function) by a closed form in the
student's logits ``z = W s + b``, its 1x1 classifier ``W`` and Sigma. Both bounds are written
here as KL divergences (teacher entropy included), so that ``lambda = 0`` gives PD and CWD
exactly.

CWD-aug, per image and channel c, with ``Sigma_i`` the covariance of pixel i's labelled class
(0 for ignore pixels) and ``v_{c,i} = w_c^T Sigma_i w_c / (2 tau^2)``::

    sum_i p^T_{c,i} [log p^T_{c,i} + log sum_k exp((z_{c,k} - z_{c,i}) / tau + lambda (v_{c,k} + v_{c,i}))]
  = KL(p^T_c || softmax_i(z_{c,i} / tau + lambda v_{c,i})) + 2 lambda sum_i p^T_{c,i} v_{c,i}

then ``tau^2 / (N C)`` times the sum over images and channels, as CWD. The variance of
``w_c^T (s^_k - s^_i) / tau`` is ``w_c^T (Sigma_k + Sigma_i) w_c / tau^2``: the paper's Eq. 6-7
print ``/ tau`` (one power); the bound here follows the derivation (``/ tau^2``). As in Eq. 7
the term ``k = i`` keeps its variance (a slightly looser bound; removing it would cost a
per-pixel correction).

PD-aug (Eq. 8), per pixel, with ``Sigma_c`` the covariance of the class c of the teacher's
distribution (as the paper writes it) and temperature T::

    T^2 sum_c p^T_c [log p^T_c + log sum_k exp((z_k - z_c) / T
                                     + lambda (w_k - w_c)^T Sigma_c (w_k - w_c) / (2 T^2))]

averaged over the (valid) pixels. ``B[c, k] = (w_k - w_c)^T Sigma_c (w_k - w_c)`` is a C x C
matrix per step, so the inner log-sum-exp is one (pixels x C) @ (C x C) product.

lambda follows a cosine ramp from 0 to ``lambda0`` over training (:func:`cosine_ramp`).

Both losses read the ``logits`` taps and the student's ``head_features`` (the covariance is
estimated on them, labels nearest-resized to their size) and the student's 1x1 classifier
(the tap contract's ``tap_classifier()``). Each owns its :class:`ClassCovariance` and the
position of its lambda schedule (``progress`` = iteration, max_iter) as buffers, so
``--resume`` continues both. Settings: ``MODEL.DISTILL.FAKD`` (shared) and
``MODEL.DISTILL.FAKD_CWD`` / ``MODEL.DISTILL.FAKD_PD``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from .base import DistillLoss, as_float, masked_mean, register_distill_loss
from .covariance import ClassCovariance
from .cwd import channel_distributions, channel_kl
from .pd import pixel_kl
from .taps import HEAD_FEATURES, LOGITS

__all__ = [
    "cosine_ramp", "class_projected_variance", "pairwise_projected_variance",
    "fakd_cwd_loss", "fakd_pd_loss", "FeatureAugmentedCWD", "FeatureAugmentedPD", "ClassCovariance",
    "LAMBDA_SCHEDULES", "COVARIANCE_TYPES",
]

LAMBDA_SCHEDULES = ("cosine", "constant")
COVARIANCE_TYPES = ("diagonal", "full")


def cosine_ramp(iteration: float, max_iter: float, lambda0: float, schedule: str = "cosine") -> float:
    """lambda at ``iteration``: ``lambda0 (1 - cos(pi t / T)) / 2`` (``lambda0`` if T unknown)."""
    if schedule not in LAMBDA_SCHEDULES:
        raise ValueError(f"FAKD lambda schedule must be one of {LAMBDA_SCHEDULES}, got {schedule!r}.")
    if schedule == "constant" or max_iter <= 0:
        return float(lambda0)
    ratio = min(max(float(iteration) / float(max_iter), 0.0), 1.0)
    return float(lambda0) * 0.5 * (1.0 - math.cos(math.pi * ratio))


def _classifier_weight(classifier) -> torch.Tensor:
    w = classifier.weight if isinstance(classifier, nn.Module) else classifier
    if w.dim() == 4:
        if w.shape[2:] != (1, 1):
            raise TypeError(f"FAKD needs a 1x1 classifier; got a {tuple(w.shape[2:])} kernel.")
        w = w[:, :, 0, 0]
    return as_float(w)


def class_projected_variance(weight: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``G[c, y] = w_c^T Sigma_y w_c`` (C x K) for diagonal (K x A) or full (K x A x A) covariances."""
    if cov.dim() == 2:
        return (weight * weight) @ cov.T
    return ((weight[None] @ cov) * weight[None]).sum(-1).T  # [K, C, A] . W -> [K, C] -> [C, K]


def pairwise_projected_variance(weight: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``B[c, k] = (w_k - w_c)^T Sigma_c (w_k - w_c)`` (C x C) for diagonal or full covariances."""
    if cov.dim() == 2:  # sum_a s_ca (w_ka^2 - 2 w_ca w_ka + w_ca^2)
        quad = cov @ (weight * weight).T
        cross = (cov * weight) @ weight.T
        own = (cov * weight * weight).sum(-1, keepdim=True)
        return (quad - 2 * cross + own).clamp(min=0)
    sw = cov @ weight.T  # [C, A, K]: Sigma_c w_k
    quad = (weight.T[None] * sw).sum(1)  # w_k^T Sigma_c w_k
    cross = (weight[:, :, None] * sw).sum(1)  # w_c^T Sigma_c w_k
    own = cross.diagonal()[:, None]  # w_c^T Sigma_c w_c
    return (quad - 2 * cross + own).clamp(min=0)


def _float_inputs(student_logits, teacher_logits, weight, cov):
    """Both bounds' inputs in float32 under AMP: the logits, the C x A classifier weight, the covariance."""
    student_logits, teacher_logits = as_float(student_logits), as_float(teacher_logits)
    weight = _classifier_weight(weight).to(student_logits.dtype)
    return student_logits, teacher_logits, weight, cov.to(weight.dtype)


def fakd_cwd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                  weight: torch.Tensor, cov: torch.Tensor, lam: float, temperature: float,
                  valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CWD-aug (FAKD Eq. 7 as a KL) at temperature tau; ``lam = 0`` is CWD exactly."""
    tau = float(temperature)
    n, c = student_logits.shape[:2]
    student_logits, teacher_logits, weight, cov = _float_inputs(student_logits, teacher_logits, weight, cov)
    g = class_projected_variance(weight, cov) / (2.0 * tau * tau)  # [C, K]
    g = torch.cat([g, g.new_zeros(c, 1)], dim=1)  # column K: ignore pixels, no augmentation
    y = labels.reshape(n, -1).long()
    y = torch.where((y >= 0) & (y < g.shape[1] - 1), y, torch.full_like(y, g.shape[1] - 1))
    v = g[:, y].permute(1, 0, 2)  # [N, C, hw]
    lam = float(lam)
    s_scaled = student_logits.flatten(2) / tau + lam * v
    t_scaled = teacher_logits.flatten(2) / tau
    kl = channel_kl(s_scaled, t_scaled, None if valid is None else valid.flatten(1))
    pt = channel_distributions(t_scaled, 1.0, None if valid is None else valid.flatten(1)).exp()
    extra = 2.0 * lam * (pt * v).sum(-1)
    return tau * tau * (kl + extra).sum() / (n * c)


def fakd_pd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weight: torch.Tensor,
                 cov: torch.Tensor, lam: float, temperature: float,
                 valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PD-aug (FAKD Eq. 8 as a KL); ``lam = 0`` is PD exactly."""
    lam = float(lam)
    if lam == 0.0:
        return pixel_kl(student_logits, teacher_logits, temperature, valid)
    t = float(temperature)
    c = student_logits.shape[1]
    student_logits, teacher_logits, weight, cov = _float_inputs(student_logits, teacher_logits, weight, cov)
    b = lam * pairwise_projected_variance(weight, cov) / (2.0 * t * t)  # [C, C]
    b_max = b.max(dim=1, keepdim=True).values.detach()
    e = torch.exp(b - b_max)  # in (0, 1]
    x = (student_logits / t).permute(0, 2, 3, 1).reshape(-1, c)  # [P, C]
    x_max = x.max(dim=1, keepdim=True).values.detach()
    # log sum_k exp(x_k + b[c, k]) = x_max + b_max[c] + log sum_k exp(x_k - x_max) e[c, k]
    inner = torch.exp(x - x_max) @ e.T  # [P, C]
    lse = x_max + b_max.T + torch.log(inner.clamp(min=torch.finfo(inner.dtype).tiny))
    log_pt = F.log_softmax(teacher_logits / t, dim=1).permute(0, 2, 3, 1).reshape(-1, c)
    per_pixel = (log_pt.exp() * (log_pt - x + lse)).sum(dim=1)
    per_pixel = per_pixel.view(student_logits.shape[0], *student_logits.shape[2:])
    return t * t * masked_mean(per_pixel, valid)


class _FeatureAugmented(DistillLoss):
    """What FAKD's two bounds share: the covariance, the lambda schedule, the taps, the config
    section ``MODEL.DISTILL.FAKD``."""

    defaults = {}  # the subclass's WEIGHT and TEMPERATURE

    @configurable
    def __init__(self, *, temperature: float, loss_weight: float, lambda0: float, lambda_schedule: str,
                 covariance: str, all_reduce: bool):
        super().__init__(loss_weight=loss_weight, taps=[(LOGITS, LOGITS), (HEAD_FEATURES, None)])
        if temperature <= 0:
            raise ValueError(f"MODEL.DISTILL.{self.name.upper()}.TEMPERATURE must be > 0, got {temperature}.")
        if covariance not in COVARIANCE_TYPES:
            raise ValueError(f"MODEL.DISTILL.FAKD.COVARIANCE must be one of {COVARIANCE_TYPES}, got {covariance!r}.")
        if lambda_schedule not in LAMBDA_SCHEDULES:
            raise ValueError(
                f"MODEL.DISTILL.FAKD.LAMBDA_SCHEDULE must be one of {LAMBDA_SCHEDULES}, got {lambda_schedule!r}."
            )
        self.temperature = float(temperature)
        self.lambda0 = float(lambda0)
        self.lambda_schedule = lambda_schedule
        self.full_covariance = covariance == "full"
        self.all_reduce = bool(all_reduce)
        self.covariance: Optional[ClassCovariance] = None  # sized in bind()
        # (iteration, max_iter) of the lambda schedule; saved with the checkpoint.
        self.register_buffer("progress", torch.zeros(2, dtype=torch.float64))
        self._progress: Optional[Tuple[float, float]] = None  # the buffer on the host (lam)
        self.register_load_state_dict_post_hook(type(self)._forget_progress)

    @classmethod
    def add_config(cls, cfg):
        cfg.MODEL.DISTILL[cls.name.upper()].update(cls.defaults)
        if "FAKD" not in cfg.MODEL.DISTILL:  # added by whichever of the two losses comes first
            # FAKD (Eq. 7, 8): feature augmentation of the student by its class covariance; shared by
            # FAKD-CWD and FAKD-PD.
            cfg.MODEL.DISTILL.FAKD = CN()
            # lambda0, the end value of lambda; "cosine" ramps lambda 0 -> LAMBDA0 over SOLVER.MAX_ITER,
            # "constant" keeps LAMBDA0.
            cfg.MODEL.DISTILL.FAKD.LAMBDA0 = 1.0
            cfg.MODEL.DISTILL.FAKD.LAMBDA_SCHEDULE = "cosine"
            # Class-conditional covariance of the student's pre-classifier features: "diagonal" or "full"
            # (C x A x A, heavier). Estimated online from the labels, saved in checkpoints.
            cfg.MODEL.DISTILL.FAKD.COVARIANCE = "diagonal"
            # Sum the covariance statistics over the training processes (same estimate everywhere).
            cfg.MODEL.DISTILL.FAKD.ALL_REDUCE = True

    @classmethod
    def from_config(cls, cfg):
        f, c = cfg.MODEL.DISTILL.FAKD, cfg.MODEL.DISTILL[cls.name.upper()]
        return {"temperature": c.TEMPERATURE, "loss_weight": c.WEIGHT, "lambda0": f.LAMBDA0,
                "lambda_schedule": f.LAMBDA_SCHEDULE, "covariance": f.COVARIANCE, "all_reduce": f.ALL_REDUCE}

    def bind(self, student, teacher, *, num_classes):
        self.check_same_channels(student, teacher)
        self.covariance = ClassCovariance(student[LOGITS].channels, student[HEAD_FEATURES].channels,
                                          full=self.full_covariance, all_reduce=self.all_reduce)

    def set_training_progress(self, iteration: int, max_iter: int) -> None:
        # kept on the host for lam (read every step), written into the buffer without a host
        # tensor (fill_ takes the scalar as a kernel argument: no copy, no wait)
        self._progress = (float(iteration), float(max_iter))
        self.progress[0].fill_(self._progress[0])
        self.progress[1].fill_(self._progress[1])

    @staticmethod
    def _forget_progress(module, incompatible_keys) -> None:
        module._progress = None

    @property
    def lam(self) -> float:
        """lambda at the current iteration (``lambda0`` before any progress is known)."""
        if self._progress is None:  # after building or loading: the buffer, read once
            self._progress = tuple(self.progress.tolist())
        it, max_iter = self._progress
        return cosine_ramp(it, max_iter, self.lambda0, self.lambda_schedule)

    def distill(self, batch):
        if self.covariance is None:
            raise RuntimeError(f"Distillation loss '{self.name}' was not bound to its taps' shapes.")
        s, t = batch.pair(self.taps[0])
        features, _ = batch.pair(self.taps[1])
        labels = batch.labels(s.shape[-2:])
        self.covariance.update(features, batch.labels(features.shape[-2:]))
        lam = self.lam
        put_scalar("fakd_lambda", lam)
        value = self(s, t, labels, batch.valid(s.shape[-2:]), classifier=batch.classifier,
                     covariance=self.covariance, lam=lam)
        return {f"loss_{self.name}": self.loss_weight * value}

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, lambda0={self.lambda0}, schedule={self.lambda_schedule!r}, "
                + super().extra_repr())


@register_distill_loss("fakd_cwd")
class FeatureAugmentedCWD(_FeatureAugmented):
    """FAKD's CWD-aug (Eq. 7) on the logits; ``MODEL.DISTILL.FAKD_CWD`` and ``MODEL.DISTILL.FAKD``."""

    defaults = {"WEIGHT": 3.0, "TEMPERATURE": 4.0}  # MODEL.DISTILL.FAKD_CWD: CWD's

    def forward(self, student_logits, teacher_logits, labels, valid=None, *, classifier, covariance, lam):
        if labels is None:
            raise ValueError("FAKD-CWD needs the labels of the batch.")
        return fakd_cwd_loss(student_logits, teacher_logits, labels, classifier, covariance.cov, lam,
                             self.temperature, valid)


@register_distill_loss("fakd_pd")
class FeatureAugmentedPD(_FeatureAugmented):
    """FAKD's PD-aug (Eq. 8) on the logits; ``MODEL.DISTILL.FAKD_PD`` and ``MODEL.DISTILL.FAKD``."""

    defaults = {"WEIGHT": 1.0, "TEMPERATURE": 1.0}  # MODEL.DISTILL.FAKD_PD: PD's

    def forward(self, student_logits, teacher_logits, labels=None, valid=None, *, classifier, covariance, lam):
        return fakd_pd_loss(student_logits, teacher_logits, classifier, covariance.cov, lam, self.temperature, valid)


def put_scalar(name: str, value: float) -> None:
    """Log a scalar to detectron2's event storage (nothing outside a trainer)."""
    try:
        from detectron2.utils.events import get_event_storage

        get_event_storage().put_scalar(name, value, smoothing_hint=False)
    except (AssertionError, ImportError):  # outside a trainer: no event storage
        pass
