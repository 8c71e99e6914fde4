"""MGD: masked generative distillation (Yang et al., ECCV 2022).

The student's feature is aligned to the teacher's channels (``f_align``, a 1x1 conv when the
counts differ, as the authors' code), a random spatial mask ``M`` zeroes a ``mask_ratio``
share of the positions (``R ~ U(0, 1)`` per position and image; ``M = 0`` where
``R > 1 - mask_ratio``, the authors' test, ``M = 1`` elsewhere), and a generator ``G``
(3x3 conv, ReLU, 3x3 conv at the teacher's channels) reconstructs the teacher's feature::

    l_mgd = 1 / N * sum_{n,c,i,j} (G(f_align(S) * M)_{n,c,i,j} - T_{n,c,i,j})^2          (loss_mgd)

weighted by ``alpha`` (MODEL.DISTILL.MGD.WEIGHT, 2e-5). The mask is drawn from the global
random generator (seeded by detectron2's ``SEED`` per process), or from a given
``torch.Generator`` (:func:`mgd_mask`). Defaults: the authors' segmentation code (yzd-v/MGD
``seg/mmseg/distillation/losses/mgd.py``, ``seg/configs/distillers/mgd/*.py``): the
backbone's last stage (``res5``) of both models; their distiller adds CWD on the logits
(``use_logit``: temperature 4, weight 3, which is ``cwd`` here).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from detectron2.config import configurable

from .base import CONNECTORS, DistillLoss, build_connector, register_distill_loss, run_trainable

__all__ = ["mgd_mask", "mgd_loss", "MaskedGenerativeDistillation"]


def mgd_mask(n: int, h: int, w: int, mask_ratio: float, *, device=None, dtype=torch.float32,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """N x 1 x h x w mask: 0 where ``rand > 1 - mask_ratio`` (about ``mask_ratio`` of the positions)."""
    r = torch.rand((n, 1, h, w), generator=generator, device=None if generator is not None else device)
    return (r <= 1.0 - mask_ratio).to(device=device, dtype=dtype)


def mgd_loss(aligned: torch.Tensor, teacher: torch.Tensor, generator: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """The sum of squared errors of ``generator(aligned * mask)`` against ``teacher``, over N."""
    return (run_trainable(generator, aligned * mask) - teacher).pow(2).sum() / teacher.shape[0]


@register_distill_loss("mgd")
class MaskedGenerativeDistillation(DistillLoss):
    """MGD; ``MODEL.DISTILL.MGD``."""

    @configurable
    def __init__(self, *, loss_weight: float, mask_ratio: float, student_tap: str, teacher_tap: str, connector: str):
        super().__init__(loss_weight=loss_weight, taps=[(student_tap, teacher_tap)])
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"MODEL.DISTILL.MGD.MASK_RATIO must be in [0, 1), got {mask_ratio}.")
        if connector not in CONNECTORS:
            raise ValueError(f"MODEL.DISTILL.MGD.CONNECTOR must be one of {CONNECTORS}, got {connector!r}.")
        self.mask_ratio = float(mask_ratio)
        self.connector_kind = connector
        self.align: Optional[nn.Module] = None  # built in bind()
        self.generation: Optional[nn.Module] = None

    @classmethod
    def add_config(cls, cfg):
        # MGD (Yang et al., ECCV 2022): a random spatial mask (MASK_RATIO of the positions zeroed) on
        # the aligned student feature, a generator (3x3 conv, ReLU, 3x3 conv) reconstructs the
        # teacher's; summed squared error / N. Defaults: the authors' segmentation code (yzd-v/MGD
        # seg/configs/distillers/mgd), which adds CWD on the logits ("cwd").
        cfg.MODEL.DISTILL.MGD.WEIGHT = 2e-5
        cfg.MODEL.DISTILL.MGD.MASK_RATIO = 0.75
        cfg.MODEL.DISTILL.MGD.STUDENT_TAP = "res5"
        cfg.MODEL.DISTILL.MGD.TEACHER_TAP = "res5"
        cfg.MODEL.DISTILL.MGD.CONNECTOR = "conv1x1_bias"

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.DISTILL.MGD
        return {"loss_weight": c.WEIGHT, "mask_ratio": c.MASK_RATIO, "student_tap": c.STUDENT_TAP,
                "teacher_tap": c.TEACHER_TAP, "connector": c.CONNECTOR}

    def bind(self, student, teacher, *, num_classes):
        p = self.taps[0]
        cs, ct = student[p.student].channels, teacher[p.teacher].channels
        # the authors align only when the channel counts differ
        kind = self.connector_kind if cs != ct else "none"
        self.align = build_connector(kind, cs, ct, owner="MODEL.DISTILL.MGD.CONNECTOR")
        self.generation = nn.Sequential(nn.Conv2d(ct, ct, 3, padding=1), nn.ReLU(inplace=True),
                                        nn.Conv2d(ct, ct, 3, padding=1))

    def trainable_parts(self):
        return {"align": self.align, "generation": self.generation}

    def forward(self, student_feature, teacher_feature, generator: Optional[torch.Generator] = None):
        aligned = run_trainable(self.align, student_feature)
        n, _, h, w = teacher_feature.shape
        mask = mgd_mask(n, h, w, self.mask_ratio, device=aligned.device, dtype=aligned.dtype, generator=generator)
        return mgd_loss(aligned, teacher_feature, self.generation, mask)

    def distill(self, batch):
        return {"loss_mgd": self.loss_weight * self(*batch.pair(self.taps[0]))}
