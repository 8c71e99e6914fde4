"""Deep supervision (``MODEL.EXITS.MODE ds``): every exit's segmenter trained with the
pixel cross-entropy against the ground truth, summed over exits (``loss_ds``), next to the
head's own ``loss_sem_seg``. HS3's Phase 1 trains this mode.
"""
from __future__ import annotations

from typing import Dict

import torch

from detectron2.config import configurable

from .heads import MultiExitOutputs
from .objective import ExitObjective, register_exit_objective

__all__ = ["DeepSupervisionObjective"]


@register_exit_objective("ds")
class DeepSupervisionObjective(ExitObjective):
    """Deep supervision: ``loss_ds = weight * sum_i CE(exit i, ground truth)``."""

    @configurable
    def __init__(self, *, weight: float, ignore_value: int):
        super().__init__(ignore_value=ignore_value)
        self.weight = weight

    @classmethod
    def add_config(cls, cfg):
        # Deep supervision: weight of every exit's full-class cross-entropy (loss_ds, summed over exits).
        cfg.MODEL.EXITS.DS.WEIGHT = 1.0

    @classmethod
    def from_config(cls, cfg):
        return {"weight": cfg.MODEL.EXITS.DS.WEIGHT, "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE}

    def forward(self, outputs: MultiExitOutputs, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        total = sum(
            self.exit_cross_entropy(name, out.seg_logits, targets)
            for name, out in outputs.exits.items()
        )
        return {"loss_ds": self.weight * total}
