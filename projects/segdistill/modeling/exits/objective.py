"""The exit objectives' contract and registry (``MODEL.EXITS.MODE``).

An exit objective turns the :class:`~.heads.MultiExitOutputs` of a training step into named
loss terms. It is also where a mode's specific parts come from, so that the segmentor has no
branch for any mode, and where its config keys come from: the registered class of
``MODEL.EXITS.MODE`` gives

* :meth:`ExitObjective.add_config`: the defaults of its keys, in its section
  ``MODEL.EXITS.<MODE>`` (``register_exit_objective`` registers a config hook that creates the
  section and calls it, so ``add_segdistill_config`` has the keys as soon as the file is
  imported);

and ``MultiExitSegmentor.from_config`` asks it for

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
from detectron2.utils.events import get_event_storage

from ...config import SectionRegistry
from ..heads.base import safe_cross_entropy
from .heads import ExitFusion, MultiExitOutputs
from .hs3_clusters import map_labels

__all__ = ["ExitObjective", "EXIT_OBJECTIVES", "register_exit_objective", "unregister_exit_objective", "exit_modes",
           "seg_cross_entropy", "put_scalar"]


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

    name: str = ""  # the registered MODEL.EXITS.MODE, set by register_exit_objective
    needs_classifiers = False

    def __init__(self, *, ignore_value: int, label_luts: Optional[Dict[str, torch.Tensor]] = None):
        super().__init__()
        self.ignore_value = ignore_value
        self._lut_names: List[str] = []
        self.label_luts = dict(label_luts or {})
        self.register_buffer("class_weights", None, persistent=False)
        self.iteration: Optional[int] = None
        self.max_iter: Optional[int] = None

    # ---- config
    @classmethod
    def add_config(cls, cfg) -> None:
        """Fill ``cfg.MODEL.EXITS.<MODE>`` (the registered mode upper-cased; the config hook that
        ``register_exit_objective`` registers creates it empty, once per config) with every key
        this mode reads, with its default and a comment saying what it is and where the default
        comes from. The keys every mode shares (``MODEL.EXITS.IN_FEATURES``, ``CHANNELS``,
        ``NUM_CLASSES`` ...) stay in ``config/defaults.py``."""
        raise NotImplementedError(
            f"Exit objective {cls.__name__} ('{cls.name}') must define the classmethod add_config(cfg) that fills "
            f"its section MODEL.EXITS.{cls.name.upper()} with the defaults of its keys."
        )

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

    @property
    def label_luts(self) -> Dict[str, torch.Tensor]:
        """{exit: class -> exit class table}. The tables are non-persistent buffers, so
        ``.to(device)`` moves them with the model (a table left on the host would be copied to
        the device for every exit at every step) and checkpoints do not change."""
        return {name: getattr(self, f"_label_lut_{i}") for i, name in enumerate(self._lut_names)}

    @label_luts.setter
    def label_luts(self, luts: Dict[str, torch.Tensor]) -> None:
        for i in range(len(self._lut_names)):
            delattr(self, f"_label_lut_{i}")
        self._lut_names = list(luts)
        for i, lut in enumerate(luts.values()):
            self.register_buffer(f"_label_lut_{i}", torch.as_tensor(lut, dtype=torch.long), persistent=False)

    def exit_targets(self, exit_name: str, targets: torch.Tensor) -> torch.Tensor:
        lut = self.label_luts.get(exit_name)
        if lut is None:
            return targets
        return map_labels(targets, lut, self.ignore_value)

    def set_class_weights(self, class_weights: Optional[torch.Tensor]) -> None:
        """The head's class weights (``MODEL.SEM_SEG_HEAD.CLASS_WEIGHTS``), for the exits that predict
        the dataset's classes (set by the segmentor; a loss setting, not saved in checkpoints)."""
        self.class_weights = None if class_weights is None else class_weights.detach().clone()

    def exit_cross_entropy(self, exit_name: str, seg_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """:func:`seg_cross_entropy` of one exit against its own targets (:meth:`exit_targets`),
        class-weighted when the exit predicts the dataset's classes (no label table)."""
        weight = self.class_weights if exit_name not in self.label_luts else None
        return seg_cross_entropy(seg_logits, self.exit_targets(exit_name, targets), self.ignore_value, weight)

    def check_exits(self, exit_num_classes: Dict[str, int], head_num_classes: int) -> None:
        """Raise a clear ValueError when the exits do not suit this objective (called by the model)."""

    def set_training_progress(self, iteration: int, max_iter: int) -> None:
        self.iteration, self.max_iter = int(iteration), int(max_iter)

    def forward(self, outputs: MultiExitOutputs, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


# MODEL.EXITS.MODE -> ExitObjective subclass, built as ``cls(cfg)`` (a @configurable class).
EXIT_OBJECTIVES = SectionRegistry(parent="MODEL.EXITS", base=ExitObjective, what="Exit objective",
                                  reserved={"none": "MODEL.EXITS.MODE 'none' means no exits",
                                            "rh": "MODEL.EXITS.RH holds the keys of the rh exit head "
                                                  "(MODEL.EXITS.HEAD)"})


def register_exit_objective(name: str):
    """Class decorator: make ``name`` a valid ``MODEL.EXITS.MODE`` and register the config hook
    that creates ``MODEL.EXITS.<MODE>`` and fills it (the class's ``add_config``)."""
    return EXIT_OBJECTIVES.register(name)


def unregister_exit_objective(name: str) -> None:
    """Remove ``name`` and its config hook (tests, reloading a module); configs already made keep its keys."""
    EXIT_OBJECTIVES.unregister(name)


def exit_modes():
    """Valid ``MODEL.EXITS.MODE`` values: ``none`` plus every registered objective."""
    return ("none",) + tuple(EXIT_OBJECTIVES)


# ---- helpers the objectives share
def seg_cross_entropy(seg_logits: torch.Tensor, targets: torch.Tensor, ignore_value: int = 255,
                      weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pixel CE of logits (upsampled bilinearly to the targets' size), mean over non-ignore pixels
    (class-weighted mean with ``weight``: :func:`~..heads.base.safe_cross_entropy`).

    An all-ignore batch gives 0 (with a graph), not NaN.
    """
    if seg_logits.shape[-2:] != targets.shape[-2:]:
        seg_logits = F.interpolate(seg_logits.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False)
    return safe_cross_entropy(seg_logits.float(), targets, ignore_value, weight)


def put_scalar(name: str, value: float) -> None:
    """Log to detectron2's event storage when one is open (inside a trainer)."""
    try:
        storage = get_event_storage()
    except AssertionError:  # no trainer: nothing to log to
        return
    storage.put_scalar(name, value, smoothing_hint=False)
