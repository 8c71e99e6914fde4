"""Distiller: a frozen teacher, any student segmentor, and registered distillation losses on taps.

* The **student** is built from the config's ``MODEL`` with the meta-architecture named in
  ``MODEL.DISTILL.STUDENT_META_ARCHITECTURE`` (``SemanticSegmentorAnySize``, ``MultiExitSegmentor``,
  or any segmentor with the tap contract, :class:`~segdistill.modeling.distill.SegmentorTaps`).
* The **teacher** comes from its own config file and weights
  (``MODEL.DISTILL.TEACHER.{CONFIG_FILE,WEIGHTS,OPTS}``). It is held outside the module tree
  (not in ``parameters()``, ``state_dict()`` or DDP; ``_apply`` moves it with the wrapper),
  frozen, always in ``eval()`` (also after ``model.train()``) and run under ``no_grad``, only
  as far as the losses' taps need.
* The **losses** (``MODEL.DISTILL.LOSSES``, the registry of ``modeling/distill``) declare the
  taps they read. When the distiller is built, every tap is checked against the student's and
  the teacher's ``tap_shapes()`` (a missing tap is an error naming the model, the tap and the
  valid ones) and each loss builds its trainable parts for those shapes (``bind``). Those
  parts are submodules (``distill_losses.<name>.*``): in the optimizer, DDP and checkpoints,
  never in the deployed student. Loss state (FAKD's covariance, CIRKD's memories) is in
  buffers, saved and restored with them.
* ``parameters()``/``state_dict()`` = ``student.*`` + ``distill_losses.*``.
* In ``eval()`` the wrapper is the student alone; with ``MODEL.DISTILL.EVAL_TEACHER`` the
  teacher's prediction is added as ``sem_seg_teacher``, which the evaluator scores too.
* Precision (``SOLVER.AMP``): the losses' arithmetic runs in float32 (the island,
  :func:`~segdistill.modeling.distill.base.float32_island`) while their trainable parts run in
  the step's autocast dtype (:func:`~segdistill.modeling.distill.base.run_trainable`); the
  teacher's forward runs in ``MODEL.DISTILL.TEACHER.PRECISION`` ("step": the step's own).
* The frozen teacher's score cannot change during a run: the trainer's evaluator keeps it per
  dataset and :meth:`Distiller.teacher_identity`, and switches ``eval_teacher`` off for the
  later evaluations of that dataset.
* ``deploy_state_dict()`` is the student's own deployed state dict (``tools/deploy_model.py``):
  it loads into the student's own config.

Shapes: the teacher sees the student's padded batch (re-normalised with its own pixel
mean/std, channels swapped if its ``INPUT.FORMAT`` differs, padded further if its backbone
needs it, the extra rows and columns of every tap cropped). A teacher tap is resized
(bilinear) to the spatial size of the student tap it is paired with, labels (nearest) to
the size a loss asks for. Teacher and student must predict the same classes: a different
count is an error at build time.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from ...config import TEACHER_PRECISIONS, load_lazy_config, load_yaml_config, precision_dtype
from ...convert import (
    DeployableModel, SegmentorWrapper, check_weights_file, load_checked_weights, load_foreign_weights,
)
from ..backbones.stages import with_backbone_stages
from ..distill.base import DistillBatch, DistillLoss, build_distill_losses, float32_island
from ..distill.taps import LOGITS, backbone_stage_taps, segmentor_taps

__all__ = ["Distiller", "build_teacher", "load_teacher_cfg"]

logger = logging.getLogger(__name__)

_REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))


# ---------------------------------------------------------------------------------------------
# The teacher
# ---------------------------------------------------------------------------------------------
def _resolve(path: str, key: str) -> str:
    """An existing config path: as given, else relative to the repository root."""
    if not path:
        raise ValueError(f"{key} is empty: set it to the teacher's config file (YAML or lazy .py).")
    for candidate in (path, os.path.join(_REPO_ROOT, path)):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"Teacher config file not found: {path!r} ({key}); looked in {os.getcwd()!r} and {_REPO_ROOT!r}."
    )


def load_teacher_cfg(config_file: str, opts: Sequence[str] = ()):
    """The teacher's YAML config (segdistill keys, file, then ``opts``)."""
    path = _resolve(config_file, "MODEL.DISTILL.TEACHER.CONFIG_FILE")
    cfg = load_yaml_config(path, opts)
    if cfg.MODEL.META_ARCHITECTURE == "Distiller":
        raise ValueError(f"The teacher config {path!r} is itself a Distiller; point it at a plain segmentor config.")
    return cfg


def build_teacher(
    config_file: str,
    weights: str,
    *,
    opts: Sequence[str] = (),
    device: str = "cpu",
    allow_random: bool = False,
    stages: Sequence[str] = (),
) -> nn.Module:
    """Build the frozen teacher from its config (YAML or lazy ``.py``) and its weights.

    ``weights``: a checkpoint file, or its URL (fetched once into the cache,
    ``segdistill.convert.fetch``); ``""`` is refused unless ``allow_random`` (tests
    and benchmarks only: a random teacher teaches nothing). ``stages``: backbone stages the
    losses tap, added to the backbone's outputs (no parameter changes).
    """
    path = _resolve(config_file, "MODEL.DISTILL.TEACHER.CONFIG_FILE")
    if weights:
        weights = check_weights_file(weights, "MODEL.DISTILL.TEACHER.WEIGHTS")  # a URL: the cached file
    elif not allow_random:
        raise ValueError(
            "MODEL.DISTILL.TEACHER.WEIGHTS is empty: set it to the trained teacher's checkpoint. "
            "(Tests and benchmarks may set MODEL.DISTILL.TEACHER.ALLOW_RANDOM True for a random teacher.)"
        )
    if path.endswith(".py"):
        from detectron2.config import instantiate

        lazy = load_lazy_config(path, list(opts))  # unknown keys (file and overrides): an error
        teacher = instantiate(with_backbone_stages(lazy.model, stages))
    else:
        from detectron2.modeling import build_model

        cfg = load_teacher_cfg(path, opts)
        cfg.defrost()
        cfg.MODEL.DEVICE = str(device)
        cfg.MODEL.WEIGHTS = ""
        teacher = build_model(with_backbone_stages(cfg, stages))
    teacher.to(torch.device(device))
    if weights:
        if not load_foreign_weights(teacher, weights):  # mmseg / CIRKD files: converted (segdistill.convert)
            # every tensor must come from the file; a Distiller checkpoint gets the deploy command
            load_checked_weights(teacher, weights, key="MODEL.DISTILL.TEACHER.WEIGHTS", min_matched=1.0,
                                 what="the teacher")
    else:
        logger.warning(
            "\n%s\nMODEL.DISTILL.TEACHER.ALLOW_RANDOM: the teacher %s has RANDOM weights. It teaches "
            "nothing; use this for tests and benchmarks only.\n%s", "!" * 80, path, "!" * 80,
        )
    teacher.requires_grad_(False)
    return teacher.eval()


class _OutsideModuleTree:
    """Holds a module (or a tap adapter) without registering it in the owner's module tree."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


# ---------------------------------------------------------------------------------------------
# The wrapper
# ---------------------------------------------------------------------------------------------
@META_ARCH_REGISTRY.register()
class Distiller(nn.Module, SegmentorWrapper, DeployableModel):
    """Teacher-student distillation around any student segmentor (see the module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        student: nn.Module,
        teacher: nn.Module,
        losses: Union[Mapping[str, DistillLoss], Sequence[DistillLoss]],
        ignore_value: int,
        exclude_ignore: bool,
        eval_teacher: bool,
        input_format: str,
        teacher_input_format: Optional[str],
        teacher_name: str,
        teacher_precision: str = "step",
        teacher_weights: str = "",
    ):
        """
        Args:
            student: the trained segmentor (the tap contract, directly or through an adapter).
            teacher: the teacher segmentor (see :func:`build_teacher`); frozen here.
            losses: {name: loss} or a list of registered losses (named by their ``name``),
                not yet bound: the distiller binds them to the taps' shapes.
            ignore_value: label of ignore pixels.
            exclude_ignore: leave ignore pixels out of the losses that support it.
            eval_teacher: in eval(), also return the teacher's prediction as ``sem_seg_teacher``.
            input_format, teacher_input_format: channel order of the inputs and of the
                teacher's training data (None: the same).
            teacher_name: how errors name the teacher (its config file).
            teacher_precision: the teacher's forward precision, one of ``TEACHER_PRECISIONS``:
                "step" (the step's autocast state), "fp32", "bf16", "fp16" (CUDA).
            teacher_weights: the teacher's weights file ("" for a random teacher): with
                ``teacher_name``, what :meth:`teacher_identity` names.
        """
        super().__init__()
        if teacher_precision not in TEACHER_PRECISIONS:
            raise ValueError(f"MODEL.DISTILL.TEACHER.PRECISION is {teacher_precision!r}; write one of "
                             f"{list(TEACHER_PRECISIONS)}.")
        if isinstance(student, Distiller) or isinstance(teacher, Distiller):
            raise TypeError("Neither the student nor the teacher of a Distiller can be a Distiller.")
        losses = dict(losses) if isinstance(losses, Mapping) else {l.name: l for l in losses}
        student_taps = segmentor_taps(student)
        try:
            teacher_taps = segmentor_taps(teacher)
        except TypeError as e:
            raise TypeError(f"The teacher ({teacher_name}): {e}") from None
        student_name = f"the student ({type(student).__name__})"
        teacher_name = f"the teacher ({teacher_name})"
        s_shapes, t_shapes = student_taps.tap_shapes(), teacher_taps.tap_shapes()
        s_classes, t_classes = s_shapes[LOGITS].channels, t_shapes[LOGITS].channels
        if s_classes != t_classes:
            raise ValueError(
                f"{teacher_name[0].upper()}{teacher_name[1:]} predicts {t_classes} classes but the student "
                f"(MODEL.SEM_SEG_HEAD.NUM_CLASSES) predicts {s_classes}: distillation needs the same class set."
            )
        for name, loss in losses.items():
            if not isinstance(loss, DistillLoss):
                raise TypeError(f"Distillation loss {name!r} is a {type(loss).__name__}, not a DistillLoss.")
            s = {p.student: _tap_shape(s_shapes, p.student, name, student_name) for p in loss.taps}
            t = {p.teacher: _tap_shape(t_shapes, p.teacher, name, teacher_name) for p in loss.taps
                 if p.teacher is not None}
            loss.bind(s, t, num_classes=s_classes)
        self.student = student
        self.distill_losses = nn.ModuleDict(losses)
        self.num_classes = int(s_classes)
        self.ignore_value = int(ignore_value)
        self.exclude_ignore = bool(exclude_ignore)
        self.eval_teacher = bool(eval_teacher)
        self.teacher_precision = teacher_precision
        self._teacher_identity = (f"{teacher_name}|{teacher_weights}" if teacher_weights
                                  else f"{teacher_name}|random teacher {id(teacher)}")
        self.input_format = input_format
        self.teacher_input_format = teacher_input_format or input_format
        self.student_taps_needed = sorted({p.student for l in losses.values() for p in l.taps})
        self.teacher_taps_needed = sorted({p.teacher for l in losses.values() for p in l.taps if p.teacher})
        # The teacher and the tap adapters live outside the module tree: no parameters(),
        # state_dict() or DDP for the teacher, no second registration of the student.
        teacher.requires_grad_(False)
        self._teacher = _OutsideModuleTree(teacher.eval())
        self._taps = _OutsideModuleTree((student_taps, teacher_taps))
        self.register_load_state_dict_pre_hook(_load_student_checkpoint)

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DISTILL
        student_arch = d.STUDENT_META_ARCHITECTURE
        if student_arch == "Distiller":
            raise ValueError("MODEL.DISTILL.STUDENT_META_ARCHITECTURE cannot be 'Distiller'.")
        losses = build_distill_losses(cfg)
        student_stages = backbone_stage_taps([p.student for l in losses.values() for p in l.taps])
        teacher_stages = backbone_stage_taps([p.teacher for l in losses.values() for p in l.taps if p.teacher])
        if d.TEACHER.PRECISION != "step":  # fp16 off CUDA, an unknown name: before anything is built
            precision_dtype(d.TEACHER.PRECISION, cfg.MODEL.DEVICE, key="MODEL.DISTILL.TEACHER.PRECISION")
        # The class counts are compared before anything is built.
        lazy_teacher = d.TEACHER.CONFIG_FILE.endswith(".py")
        t_cfg = None if lazy_teacher else load_teacher_cfg(d.TEACHER.CONFIG_FILE, d.TEACHER.OPTS)
        if t_cfg is not None and t_cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES != cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES:
            raise ValueError(
                f"The teacher ({d.TEACHER.CONFIG_FILE}) predicts {t_cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES} classes "
                f"but the student (MODEL.SEM_SEG_HEAD.NUM_CLASSES) predicts {cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES}: "
                "distillation needs the same class set."
            )
        with _naming_stage_taps(teacher_stages, f"the teacher ({d.TEACHER.CONFIG_FILE})"):
            teacher = build_teacher(d.TEACHER.CONFIG_FILE, d.TEACHER.WEIGHTS, opts=d.TEACHER.OPTS,
                                    device=cfg.MODEL.DEVICE, allow_random=d.TEACHER.ALLOW_RANDOM,
                                    stages=teacher_stages)
        student_cfg = with_backbone_stages(cfg, student_stages).clone()
        student_cfg.defrost()
        student_cfg.MODEL.META_ARCHITECTURE = student_arch
        with _naming_stage_taps(student_stages, f"the student ({student_arch})"):
            student = META_ARCH_REGISTRY.get(student_arch)(student_cfg)
        return {
            "student": student,
            "teacher": teacher,
            "losses": losses,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "exclude_ignore": d.EXCLUDE_IGNORE,
            "eval_teacher": d.EVAL_TEACHER,
            "input_format": cfg.INPUT.FORMAT,
            "teacher_input_format": None if t_cfg is None else t_cfg.INPUT.FORMAT,
            "teacher_name": d.TEACHER.CONFIG_FILE,
            "teacher_precision": d.TEACHER.PRECISION,
            "teacher_weights": d.TEACHER.WEIGHTS,
        }

    # -- the teacher: outside the module tree, follows the wrapper's device/dtype, never its mode
    @property
    def teacher(self) -> nn.Module:
        return self._teacher.value

    def teacher_identity(self) -> str:
        """What the frozen teacher's predictions depend on (its config file and weights file; a
        random teacher: this instance): the key of its cached evaluation score."""
        return self._teacher_identity

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    @property
    def device(self) -> torch.device:
        p = next(self.student.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # -- schedules ------------------------------------------------------------------------
    def set_training_progress(self, iteration: int, max_iter: int) -> None:
        """Called by TrainingProgressHook before every step: the losses' and the student's schedules."""
        for loss in self.distill_losses.values():
            loss.set_training_progress(iteration, max_iter)
        self._taps.value[0].set_training_progress(iteration, max_iter)

    # -- deployment -----------------------------------------------------------------------
    def deploy_state_dict(self) -> Dict[str, torch.Tensor]:
        """The student's own deployed weights (its config's keys): no teacher, no loss part or state."""
        return dict(self._taps.value[0].deploy_state_dict())

    def wrapped_segmentor(self) -> Tuple[nn.Module, str]:
        """Whole-model checkpoints (``MODEL.WEIGHTS``) are the student's: it is ``student.*`` here."""
        return self.student, "student."

    # -- forward ----------------------------------------------------------------------------
    def _to_teacher_format(self, x: torch.Tensor) -> torch.Tensor:
        if {self.input_format, self.teacher_input_format} == {"RGB", "BGR"}:
            return x.flip(-3)
        return x

    def _teacher_precision(self, device: torch.device):
        """The autocast context of the teacher's forward (``teacher_precision``)."""
        if self.teacher_precision == "step":
            return contextlib.nullcontext()
        dtype = precision_dtype(self.teacher_precision, device, key="MODEL.DISTILL.TEACHER.PRECISION")
        if dtype is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=dtype)

    @torch.no_grad()
    def teacher_taps(self, images: torch.Tensor, taps: Sequence[str]) -> Dict[str, torch.Tensor]:
        """The teacher's ``taps`` on the student's padded, normalised batch, cropped to its extent."""
        student_taps, teacher_taps = self._taps.value
        s_mean, s_std, _ = student_taps.tap_normalization()
        t_mean, t_std, div = teacher_taps.tap_normalization()
        x = (self._to_teacher_format(images * s_std + s_mean) - t_mean) / t_std
        h, w = x.shape[-2:]
        if div > 1 and (h % div or w % div):
            x = F.pad(x, (0, (-w) % div, 0, (-h) % div))
        with self._teacher_precision(x.device):
            out = teacher_taps.tap_teacher(x, taps)
        if x.shape[-2:] != (h, w):  # drop the teacher's extra padding
            for k, v in out.items():
                lh, lw = v.shape[-2:]
                out[k] = v[..., : -(-h * lh // x.shape[-2]), : -(-w * lw // x.shape[-1])]
        return out

    def distill_batch(self, batched_inputs) -> Tuple[Dict[str, torch.Tensor], DistillBatch]:
        """One training forward of the student (its own losses) and of the teacher (its taps):
        what every distillation loss reads. ``forward`` = this + each loss's ``distill``."""
        student_taps = self._taps.value[0]
        out = student_taps.tap_student(batched_inputs, self.student_taps_needed)
        teacher = self.teacher_taps(out.images.tensor, self.teacher_taps_needed) if self.teacher_taps_needed else {}
        batch = DistillBatch(
            student=out.taps, teacher=teacher, targets=out.targets, images=out.images.tensor,
            classifier=student_taps.tap_classifier(), num_classes=self.num_classes,
            ignore_value=self.ignore_value, exclude_ignore=self.exclude_ignore,
        )
        return dict(out.losses), batch

    def forward(self, batched_inputs):
        if not self.training:
            return self._inference(batched_inputs)
        losses, batch = self.distill_batch(batched_inputs)
        # the loss arithmetic in float32 under AMP; the losses' trainable parts in the step's dtype
        with float32_island(batch.images.device.type):
            for loss in self.distill_losses.values():
                terms = loss.distill(batch)
                clash = set(terms) & set(losses)
                if clash:
                    raise ValueError(f"Distillation loss '{loss.name}' returns {sorted(clash)}, already used.")
                losses.update(terms)
        return losses

    def _inference(self, batched_inputs):
        results = self.student(batched_inputs)
        if self.eval_teacher:
            inputs = batched_inputs
            if self.input_format != self.teacher_input_format:
                inputs = [{**x, "image": self._to_teacher_format(x["image"])} for x in batched_inputs]
            with torch.no_grad(), self._teacher_precision(self.device):
                teacher_results = self.teacher(inputs)
            for r, t in zip(results, teacher_results):
                r["sem_seg_teacher"] = t["sem_seg"]
        return results


@contextlib.contextmanager
def _naming_stage_taps(stages: Sequence[str], model: str):
    """Re-raise a backbone's refusal of a stage as an error about the taps that asked for it."""
    try:
        yield
    except ValueError as e:
        if not stages:
            raise
        raise ValueError(f"Building {model} with the backbone stages {list(stages)} that MODEL.DISTILL.LOSSES "
                         f"tap: {e}") from e


def _tap_shape(shapes, tap: str, loss: str, model: str):
    if tap not in shapes:
        raise ValueError(
            f"Distillation loss '{loss}' reads the tap '{tap}' of {model}, which gives only {sorted(shapes)}. "
            "Backbone stages must be among the backbone's outputs (timm backbones: MODEL.TIMM.OUT_FEATURES is "
            "extended automatically with valid stage names; a lazy config lists them in backbone.out_features)."
        )
    return shapes[tap]


def _load_student_checkpoint(module, state_dict, prefix, *args) -> None:
    """Let a student-only checkpoint (e.g. a trained baseline as MODEL.WEIGHTS) load into ``student``."""
    own = prefix + "student."
    if any(k.startswith(own) for k in state_dict):
        return
    student_keys = set(module.student.state_dict())
    hits = [k for k in list(state_dict) if k.startswith(prefix) and k[len(prefix):] in student_keys]
    if hits:
        logger.info("Loading a student-only checkpoint (%d tensors) into the Distiller's student.", len(hits))
        for k in hits:
            state_dict[own + k[len(prefix):]] = state_dict.pop(k)
