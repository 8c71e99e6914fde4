"""HS3 (Borse et al., BMVC 2021) objective, paper Eq. 1::

    L_total = sum_i gamma_i * CE(exit i, ground truth mapped class -> cluster of exit i) + L_final

The first term is ``loss_hs3`` (one term, summed over exits; per-exit values are logged as
``hs3_ce_<exit>``); ``L_final`` is the head's own ``loss_sem_seg``. Each exit's targets come
from ``label_luts`` (class -> cluster, ignore kept), set by ``MultiExitSegmentor`` from
``MODEL.EXITS.HS3.CLUSTERS_FILE``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from detectron2.config import configurable

from ..exits import ExitObjective, MultiExitOutputs, register_exit_objective
from .self_regulation import _put_scalar, seg_cross_entropy

__all__ = ["HS3Objective"]


@register_exit_objective("hs3")
class HS3Objective(ExitObjective):
    """Eq. 1's exit term: ``loss_hs3 = sum_i gamma_i * CE_i`` on each exit's clustered labels."""

    @configurable
    def __init__(self, *, gammas=1.0, ignore_value: int = 255, label_luts: Optional[Dict[str, torch.Tensor]] = None):
        """``gammas``: one float for all exits or {exit: gamma}; ``label_luts``: {exit: class -> cluster}."""
        super().__init__(ignore_value, label_luts)
        self.gammas = gammas

    @classmethod
    def from_config(cls, cfg, exit_num_classes: Optional[Dict[str, int]] = None):
        from ...hs3.model import exit_gammas

        return {"gammas": exit_gammas(cfg.MODEL.EXITS.HS3.GAMMAS, cfg.MODEL.EXITS.IN_FEATURES),
                "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE}

    def gamma(self, name: str) -> float:
        return float(self.gammas[name]) if isinstance(self.gammas, dict) else float(self.gammas)

    def check_exits(self, exit_num_classes: Dict[str, int], head_num_classes: int) -> None:
        """Every exit needs a label table whose clusters match its class count."""
        missing = [n for n in exit_num_classes if n not in self.label_luts]
        if missing:
            raise ValueError(f"HS3 exits {missing} have no class -> cluster table (MODEL.EXITS.HS3.CLUSTERS_FILE).")
        if isinstance(self.gammas, dict) and set(self.gammas) != set(exit_num_classes):
            raise ValueError(f"HS3 gammas are given for {sorted(self.gammas)} but the exits are {list(exit_num_classes)}.")
        for n, k in exit_num_classes.items():
            lut = self.label_luts[n][: head_num_classes]
            if int(lut.max()) + 1 != k:
                raise ValueError(f"HS3 exit {n!r} predicts {k} classes but its table has {int(lut.max()) + 1} clusters.")

    def forward(self, outputs: MultiExitOutputs, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        total = 0.0
        for name, out in outputs.exits.items():
            ce = seg_cross_entropy(out.seg_logits, self.exit_targets(name, targets), self.ignore_value)
            if self.training:
                _put_scalar(f"hs3_ce_{name}", float(ce.detach()))
            total = total + self.gamma(name) * ce
        return {"loss_hs3": total}
