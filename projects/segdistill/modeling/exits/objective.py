"""The exit objectives' contract and registry (``MODEL.EXITS.MODE``).

An exit objective turns the :class:`~.heads.MultiExitOutputs` of a training step into named
loss terms. It is also where a mode's specific parts come from, so that the segmentor has no
branch for any mode: ``MultiExitSegmentor.from_config`` asks the registered class of
``MODEL.EXITS.MODE`` for

* :meth:`ExitObjective.exit_num_classes`: the class count of every exit (DS / SR: the
  dataset's classes or ``MODEL.EXITS.NUM_CLASSES``; HS3: each exit's clusters);
* :meth:`ExitObjective.build_fusion`: an :class:`~.heads.ExitFusion` that feeds the exits
  into the head (HS3-Fuse), or None;
* ``cls(cfg)``: the objective itself (``@configurable``), with what it needs built in
  (HS3: each exit's class -> cluster table);

and the evaluator asks it for :meth:`ExitObjective.eval_label_spaces`, the label space of
each ``sem_seg_<exit>`` prediction that does not predict the dataset's classes.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import ShapeSpec

from ..heads.base import safe_cross_entropy
from .heads import ExitFusion, MultiExitOutputs
from .hs3_clusters import map_labels

__all__ = ["ExitObjective", "EXIT_OBJECTIVES", "register_exit_objective", "exit_modes", "seg_cross_entropy",
           "put_scalar"]


class ExitObjective(nn.Module):
    """Base of the exit objectives: ``forward(outputs, targets) -> {loss name: tensor}``.

    ``targets`` are the padded N x H x W labels of the dataset's classes; an objective reads
    each exit's own targets through :meth:`exit_targets`, which maps them through
    ``label_luts[exit_name]`` (a LongTensor from dataset class to the exit's class, ignore
    kept; :func:`~.hs3_clusters.map_labels`) when the mode gives one (HS3), else returns them
    unchanged. Subclasses set ``needs_classifiers`` (an attribute or property) when they read
    ``cls_logits``, so the model builds the classifiers only then (no unused parameters under
    DDP), and override the classmethods below when their mode shapes the exits.
    """

    needs_classifiers = False

    def __init__(self, *, ignore_value: int, label_luts: Optional[Dict[str, torch.Tensor]] = None):
        super().__init__()
        self.ignore_value = ignore_value
        self.label_luts: Dict[str, torch.Tensor] = dict(label_luts or {})
        self.iteration: Optional[int] = None
        self.max_iter: Optional[int] = None

    # ---- the parts a mode builds (classmethods: asked before the objective exists)
    @classmethod
    def exit_num_classes(cls, cfg, exit_names: Sequence[str]) -> Union[int, List[int]]:
        """Classes of every exit: ``MODEL.EXITS.NUM_CLASSES`` (one per exit) or, when empty,
        ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` for all."""
        return list(cfg.MODEL.EXITS.NUM_CLASSES) or cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES

    @classmethod
    def build_fusion(cls, cfg, exit_names: Sequence[str], backbone_shapes: Dict[str, ShapeSpec]) -> Optional[ExitFusion]:
        """An :class:`ExitFusion` feeding the exits into the head, or None (the exits are training-only)."""
        return None

    @classmethod
    def eval_label_spaces(cls, cfg, dataset_name: str) -> Dict[str, tuple]:
        """``{"sem_seg_<exit>": (lut, class names)}`` for exits that predict another label space
        than the dataset's (the evaluator maps the ground truth through ``lut``); ``{}`` = none."""
        return {}

    # ---- training
    @property
    def final_loss_weight(self) -> float:
        """Factor on the head's own ``loss_sem_seg`` (1: the head's loss as it is)."""
        return 1.0

    def exit_targets(self, exit_name: str, targets: torch.Tensor) -> torch.Tensor:
        lut = self.label_luts.get(exit_name)
        if lut is None:
            return targets
        return map_labels(targets, lut, self.ignore_value)

    def check_exits(self, exit_num_classes: Dict[str, int], head_num_classes: int) -> None:
        """Raise a clear ValueError when the exits do not suit this objective (called by the model)."""

    def set_training_progress(self, iteration: int, max_iter: int) -> None:
        self.iteration, self.max_iter = int(iteration), int(max_iter)

    def forward(self, outputs: MultiExitOutputs, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


# MODEL.EXITS.MODE -> ExitObjective subclass, built as ``cls(cfg)`` (a @configurable class).
EXIT_OBJECTIVES: Dict[str, type] = {}


def register_exit_objective(name: str):
    """Class decorator: make ``name`` a valid ``MODEL.EXITS.MODE``."""

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, ExitObjective)):
            raise TypeError(f"Exit objective {name!r} must subclass ExitObjective, got {cls!r}.")
        if name in EXIT_OBJECTIVES and EXIT_OBJECTIVES[name] is not cls:
            raise ValueError(f"Exit objective {name!r} is already registered ({EXIT_OBJECTIVES[name].__name__}).")
        EXIT_OBJECTIVES[name] = cls
        return cls

    return deco


def exit_modes():
    """Valid ``MODEL.EXITS.MODE`` values: ``none`` plus every registered objective."""
    return ("none",) + tuple(EXIT_OBJECTIVES)


# ---- helpers the objectives share
def seg_cross_entropy(seg_logits: torch.Tensor, targets: torch.Tensor, ignore_value: int = 255) -> torch.Tensor:
    """Pixel CE of logits (upsampled bilinearly to the targets' size), mean over non-ignore pixels.

    An all-ignore batch gives 0 (with a graph), not NaN.
    """
    if seg_logits.shape[-2:] != targets.shape[-2:]:
        seg_logits = F.interpolate(seg_logits.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False)
    return safe_cross_entropy(seg_logits.float(), targets, ignore_value)


def put_scalar(name: str, value: float) -> None:
    """Log to detectron2's event storage when one is open (inside a trainer)."""
    from detectron2.utils.events import get_event_storage

    try:
        storage = get_event_storage()
    except AssertionError:  # no trainer: nothing to log to
        return
    storage.put_scalar(name, value, smoothing_hint=False)
