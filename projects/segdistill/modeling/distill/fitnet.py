"""FitNet: hint-based distillation (Romero et al., ICLR 2015), with a trainable connector.

A connector ``r`` (the paper's regressor; a 1x1 conv without bias in CIRKD's segmentation
code) maps the student's hint to the teacher's channels, and::

    l_fitnet = 1 / (N C h w) * sum (r(S) - T)^2                                      (loss_fitnet)

(the paper writes ``1/2 ||T - r(S)||^2`` summed; the mean used by CIRKD's code differs by the
constant ``2 / (N C h w)``, i.e. only by the weight). Defaults: CIRKD's segmentation setting
(winycg/CIRKD ``losses/fitnet.py``, ``scripts/train_kd/train_fitnet.sh``: weight 10 with the
pixel-wise KD, ``pd``, weight 1), on the head's pre-classifier features of both models.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from detectron2.config import configurable

from ..backbones.norm import resolve_norm
from .base import CONNECTORS, DistillLoss, build_connector, register_distill_loss, run_trainable

__all__ = ["HintDistillation"]


@register_distill_loss("fitnet")
class HintDistillation(DistillLoss):
    """FitNet; ``MODEL.DISTILL.FITNET``."""

    @configurable
    def __init__(self, *, loss_weight: float, student_tap: str, teacher_tap: str, connector: str, norm: str):
        super().__init__(loss_weight=loss_weight, taps=[(student_tap, teacher_tap)])
        if connector not in CONNECTORS:
            raise ValueError(f"MODEL.DISTILL.FITNET.CONNECTOR must be one of {CONNECTORS}, got {connector!r}.")
        self.connector_kind, self.norm = connector, norm
        self.connector: Optional[nn.Module] = None  # built in bind()

    @classmethod
    def add_config(cls, cfg):
        # FitNet (Romero et al., ICLR 2015): MSE between the connector's map of the student's hint
        # and the teacher's. Defaults: CIRKD's segmentation setting (scripts/train_kd/train_fitnet.sh).
        cfg.MODEL.DISTILL.FITNET.WEIGHT = 10.0
        cfg.MODEL.DISTILL.FITNET.STUDENT_TAP = "head_features"
        cfg.MODEL.DISTILL.FITNET.TEACHER_TAP = "head_features"
        cfg.MODEL.DISTILL.FITNET.CONNECTOR = "conv1x1"

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.DISTILL.FITNET
        return {"loss_weight": c.WEIGHT, "student_tap": c.STUDENT_TAP, "teacher_tap": c.TEACHER_TAP,
                "connector": c.CONNECTOR, "norm": resolve_norm(cfg, "head")}

    def bind(self, student, teacher, *, num_classes):
        p = self.taps[0]
        owner = f"FitNet ('{p.student}' -> '{p.teacher}', MODEL.DISTILL.FITNET.CONNECTOR)"
        self.connector = build_connector(self.connector_kind, student[p.student].channels,
                                         teacher[p.teacher].channels, norm=self.norm, owner=owner)

    def trainable_parts(self):
        return {"connector": self.connector}

    def forward(self, student_feature, teacher_feature):
        return (run_trainable(self.connector, student_feature) - teacher_feature).pow(2).mean()

    def distill(self, batch):
        return {"loss_fitnet": self.loss_weight * self(*batch.pair(self.taps[0]))}
