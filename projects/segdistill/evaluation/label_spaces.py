"""Label spaces of prediction keys that do not predict the dataset's own classes.

An HS3 exit predicts its own clustered class set; the evaluator scores it there, mapping
the ground truth through a lookup table. ``build_label_spaces(cfg, dataset_name)`` asks the
exit objective of ``MODEL.EXITS.MODE`` (its ``eval_label_spaces``, part of the objectives'
contract in ``segdistill.modeling.exits.objective``), so the trainer needs no knowledge of
the methods that use it.
"""
from __future__ import annotations

from typing import Dict

from ..modeling.exits import EXIT_OBJECTIVES, exit_modes
from .sem_seg import LabelSpace

__all__ = ["build_label_spaces"]


def build_label_spaces(cfg, dataset_name: str) -> Dict[str, LabelSpace]:
    """``{prediction key: (lut, class names)}`` for ``dataset_name``; ``{}`` when every output
    predicts the dataset's classes (no exits, or a mode whose exits do)."""
    exits = cfg.MODEL.get("EXITS", None)
    mode = exits.get("MODE", "none") if exits is not None else "none"
    if mode == "none":
        return {}
    if mode not in EXIT_OBJECTIVES:
        raise ValueError(f"Unknown MODEL.EXITS.MODE {mode!r}; choose from {list(exit_modes())}.")
    return dict(EXIT_OBJECTIVES[mode].eval_label_spaces(cfg, dataset_name))
