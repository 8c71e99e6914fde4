"""Distiller: a frozen teacher, any student segmentor and distillation losses (PD, CWD, HWD, FAKD).

* The **student** is built from the config's ``MODEL`` with the meta-architecture named in
  ``MODEL.DISTILL.STUDENT_META_ARCHITECTURE`` (``SemanticSegmentor``, or any segmentor that
  implements the student contract below, e.g. a multi-exit one). It is the only trained
  part: ``parameters()``, ``state_dict()`` and so the optimizer, DDP and checkpoints see the
  student (``student.*``) and the loss state (FAKD's ``covariance.*``, ``fakd_progress``).
* The **teacher** comes from its own config file and weights
  (``MODEL.DISTILL.TEACHER.{CONFIG_FILE,WEIGHTS,OPTS}``). It is kept outside the module tree
  (``_apply`` moves it with the wrapper), frozen, always in ``eval()`` (also after
  ``model.train()``) and run under ``no_grad``.
* In ``eval()`` the wrapper is the student alone; with ``MODEL.DISTILL.EVAL_TEACHER`` the
  teacher's prediction is added as ``sem_seg_teacher``, which the evaluator scores too.
* ``deploy_state_dict()`` is the student's own state dict (``tools/deploy_model.py``): it
  loads into the student's own config.

Shapes: the teacher sees the student's padded batch (re-normalised with its own pixel
mean/std, channels swapped if its ``INPUT.FORMAT`` differs). Its logits are resized
(bilinear) to the student's logits' size, and the labels (nearest) too; every loss is
computed at the student's logits' resolution (1/8 for the papers' students). Teacher and
student must predict the same classes: a different count is an error at build time.

Student contract (what a student meta-architecture other than ``SemanticSegmentor``
implements to be distilled)::

    student.distill_forward(batched_inputs) -> dict(
        losses=dict of the student's own loss_* terms (training mode),
        logits=N x C x h x w final logits before upsampling,
        features=N x A x h x w pre-classifier features (FAKD) or None,
        images=detectron2 ImageList of the normalised, padded images,
        targets=N x H x W padded labels (ignore value outside the images) or None)
    student.pixel_mean, student.pixel_std            # the normalisation of ``images``
    student.sem_seg_head.predictor                   # the 1x1 classifier (FAKD), or
    student.distill_classifier() -> nn.Conv2d

``SemanticSegmentor`` students (and subclasses that keep its ``forward``) are served by
:func:`semantic_segmentor_distill_forward` (backbone + ``head_outputs()``).
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor
from detectron2.structures import ImageList

from ..heads.base import head_outputs
from ..losses.channel_wise import ChannelWiseDistillation, HolisticWeightedDistillation
from ..losses.covariance import ClassCovariance
from ..losses.feature_aug import LAMBDA_SCHEDULES, FeatureAugmentedCWD, FeatureAugmentedPD, cosine_ramp
from ..losses.pixel_wise import PixelWiseDistillation, label_mask

__all__ = [
    "Distiller", "build_teacher", "build_distill_losses", "semantic_segmentor_distill_forward", "resize_labels",
    "LOSS_NAMES",
]

logger = logging.getLogger(__name__)

LOSS_NAMES = ("pd", "cwd", "hwd", "fakd_cwd", "fakd_pd")
COVARIANCE_TYPES = ("diagonal", "full")
_REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))


# ---------------------------------------------------------------------------------------------
# The student: logits, features and its own losses for a batch
# ---------------------------------------------------------------------------------------------
def semantic_segmentor_distill_forward(model: SemanticSegmentor, batched_inputs: List[dict]) -> dict:
    """The student contract for detectron2's ``SemanticSegmentor`` (same steps as its forward)."""
    images = [x["image"].to(model.device) for x in batched_inputs]
    images = [(x - model.pixel_mean) / model.pixel_std for x in images]
    backbone = model.backbone
    images = ImageList.from_tensors(images, backbone.size_divisibility,
                                    padding_constraints=backbone.padding_constraints)
    features = backbone(images.tensor)
    targets = None
    if "sem_seg" in batched_inputs[0]:
        targets = [x["sem_seg"].to(model.device) for x in batched_inputs]
        targets = ImageList.from_tensors(targets, backbone.size_divisibility, model.sem_seg_head.ignore_value,
                                         backbone.padding_constraints).tensor
    outputs = head_outputs(model.sem_seg_head, features)
    losses = model.sem_seg_head.losses(outputs, targets) if model.training and targets is not None else {}
    return {"losses": losses, "logits": outputs["logits"], "features": outputs.get("features"),
            "images": images, "targets": targets}


def _student_classifier(student: nn.Module) -> Optional[nn.Module]:
    fn = getattr(student, "distill_classifier", None)
    if fn is not None:
        return fn()
    return getattr(getattr(student, "sem_seg_head", None), "predictor", None)


def _num_classes(model: nn.Module) -> Optional[int]:
    head = getattr(model, "sem_seg_head", None)
    pred = getattr(head, "predictor", None)
    if isinstance(pred, nn.Conv2d):
        return pred.out_channels
    n = getattr(head, "num_classes", None)
    return int(n) if isinstance(n, int) else None


def _check_student(student: nn.Module, needs_classifier: bool) -> None:
    name = type(student).__name__
    if not hasattr(student, "distill_forward"):
        if not _plain_semantic_segmentor(student):
            raise TypeError(
                f"The student {name} cannot be distilled: it has no distill_forward(batched_inputs) and "
                "is not a plain SemanticSegmentor (a subclass with its own forward would lose its own "
                "losses); see the student contract in docs/distillation.md."
            )
        head = student.sem_seg_head
        if not (hasattr(head, "forward_outputs") and hasattr(head, "predictor")):
            if needs_classifier:
                _raise_no_fakd_features(student)
            head_outputs(head, {})  # raises the head contract's TypeError, naming the usable heads
    if needs_classifier:
        clf = _student_classifier(student)
        if not (isinstance(clf, nn.Conv2d) and tuple(clf.kernel_size) == (1, 1)):
            _raise_no_fakd_features(student)


def _plain_semantic_segmentor(model: nn.Module) -> bool:
    """A SemanticSegmentor (or subclass) whose training forward is SemanticSegmentor's own."""
    return isinstance(model, SemanticSegmentor) and type(model).forward is SemanticSegmentor.forward


def _raise_no_fakd_features(student: nn.Module) -> None:
    raise TypeError(
        f"FAKD needs the student's pre-classifier features and its 1x1 classifier, but the student "
        f"{type(student).__name__} (head {type(getattr(student, 'sem_seg_head', None)).__name__}) does not "
        "expose them: use a head with segdistill's head contract (forward_features + 1x1 predictor, "
        "e.g. SegDeepLabV3Head, FCNHead), or drop fakd_cwd/fakd_pd from MODEL.DISTILL.LOSSES."
    )


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
    from detectron2.config import get_cfg

    from ...config import add_segdistill_config

    path = _resolve(config_file, "MODEL.DISTILL.TEACHER.CONFIG_FILE")
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    if cfg.MODEL.META_ARCHITECTURE == "Distiller":
        raise ValueError(f"The teacher config {path!r} is itself a Distiller; point it at a plain segmentor config.")
    return cfg


def _load_strict(model: nn.Module, weights: str) -> None:
    """Load a detectron2 checkpoint and refuse one that leaves teacher weights missing."""
    from detectron2.checkpoint import DetectionCheckpointer

    class _Recording(DetectionCheckpointer):
        def _load_model(self, checkpoint):
            self.incompatible = super()._load_model(checkpoint)
            return self.incompatible

    ckpt = _Recording(model)
    ckpt.load(weights)
    incompatible = ckpt.incompatible
    missing = list(incompatible.missing_keys)
    shapes = list(incompatible.incorrect_shapes)
    if missing or shapes:
        hint = ""
        if any(k.startswith("student.") for k in incompatible.unexpected_keys):
            hint = " It is a Distiller checkpoint: write its student with tools/deploy_model.py first."
        raise ValueError(
            f"The teacher weights {weights!r} do not fit the teacher's config: {len(missing)} missing "
            f"tensors {missing[:5]}, {len(shapes)} of another shape {[s[0] for s in shapes[:5]]}.{hint}"
        )


def build_teacher(
    config_file: str,
    weights: str,
    *,
    opts: Sequence[str] = (),
    device: str = "cpu",
    allow_random: bool = False,
) -> nn.Module:
    """Build the frozen teacher from its config (YAML or lazy ``.py``) and local weights.

    ``weights`` must be a local checkpoint; ``""`` is refused unless ``allow_random`` (tests
    and benchmarks only: a random teacher teaches nothing).
    """
    from ...convert import load_foreign_weights
    from ...engine.trainer import check_weights_file

    path = _resolve(config_file, "MODEL.DISTILL.TEACHER.CONFIG_FILE")
    if weights:
        check_weights_file(weights, "MODEL.DISTILL.TEACHER.WEIGHTS")
    elif not allow_random:
        raise ValueError(
            "MODEL.DISTILL.TEACHER.WEIGHTS is empty: set it to the trained teacher's checkpoint. "
            "(Tests and benchmarks may set MODEL.DISTILL.TEACHER.ALLOW_RANDOM True for a random teacher.)"
        )
    if path.endswith(".py"):
        from detectron2.config import LazyConfig, instantiate

        lazy = LazyConfig.apply_overrides(LazyConfig.load(path), list(opts))
        teacher = instantiate(lazy.model)
        input_format = "RGB"
    else:
        from detectron2.modeling import build_model

        cfg = load_teacher_cfg(path, opts)
        cfg.defrost()
        cfg.MODEL.DEVICE = str(device)
        cfg.MODEL.WEIGHTS = ""
        teacher = build_model(cfg)
        input_format = cfg.INPUT.FORMAT
    teacher.to(torch.device(device))
    if weights and not load_foreign_weights(teacher, weights):  # mmseg / CIRKD files: converted (segdistill.convert)
        _load_strict(teacher, weights)
    else:
        logger.warning(
            "\n%s\nMODEL.DISTILL.TEACHER.ALLOW_RANDOM: the teacher %s has RANDOM weights. It teaches "
            "nothing; use this for tests and benchmarks only.\n%s", "!" * 80, path, "!" * 80,
        )
    teacher.requires_grad_(False)
    teacher.eval()
    teacher.segdistill_teacher_source = path
    teacher.segdistill_input_format = input_format
    return teacher


# ---------------------------------------------------------------------------------------------
# Losses from the config
# ---------------------------------------------------------------------------------------------
def build_distill_losses(cfg) -> Dict[str, nn.Module]:
    """``MODEL.DISTILL.LOSSES`` -> {name: loss module with its ``loss_weight``}."""
    d = cfg.MODEL.DISTILL
    names = list(d.LOSSES)
    unknown = [n for n in names if n not in LOSS_NAMES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"MODEL.DISTILL.LOSSES {names}: each of {LOSS_NAMES} at most once (unknown: {unknown}).")
    make = {
        "pd": lambda: PixelWiseDistillation(d.PD.TEMPERATURE, d.PD.WEIGHT),
        "cwd": lambda: ChannelWiseDistillation(d.CWD.TAU, d.CWD.WEIGHT),
        "hwd": lambda: HolisticWeightedDistillation(
            d.HWD.TAU, d.HWD.WEIGHT, beta=d.HWD.BETA, mu=d.HWD.MU, sigma=d.HWD.SIGMA, eps=d.HWD.EPS,
            pixel_correction=d.HWD.PIXEL_CORRECTION, divergence_input=d.HWD.DIVERGENCE_INPUT,
        ),
        "fakd_cwd": lambda: FeatureAugmentedCWD(d.FAKD_CWD.TAU, d.FAKD_CWD.WEIGHT),
        "fakd_pd": lambda: FeatureAugmentedPD(d.FAKD_PD.TEMPERATURE, d.FAKD_PD.WEIGHT),
    }
    return {n: make[n]() for n in names}


# ---------------------------------------------------------------------------------------------
# The wrapper
# ---------------------------------------------------------------------------------------------
@META_ARCH_REGISTRY.register()
class Distiller(nn.Module):
    """Teacher-student distillation around any student segmentor (see the module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        student: nn.Module,
        teacher: nn.Module,
        losses: Union[Mapping[str, nn.Module], Sequence[nn.Module]],
        ignore_value: int = 255,
        exclude_ignore: bool = False,
        eval_teacher: bool = False,
        input_format: str = "RGB",
        teacher_input_format: Optional[str] = None,
        covariance: str = "diagonal",
        covariance_all_reduce: bool = True,
        lambda0: float = 1.0,
        lambda_schedule: str = "cosine",
    ):
        """
        Args:
            student: the trained segmentor (``SemanticSegmentor`` or the student contract).
            teacher: the teacher segmentor (see :func:`build_teacher`); frozen here.
            losses: {name: loss module} or a list of loss modules (named by their ``name``);
                each adds ``loss_<name> = loss_weight * loss``.
            ignore_value: label of ignore pixels.
            exclude_ignore: leave ignore pixels out of every distillation loss (default: all
                pixels count, as in the papers).
            eval_teacher: in eval(), also return the teacher's prediction as ``sem_seg_teacher``.
            input_format, teacher_input_format: channel order of the inputs and of the
                teacher's training data (``None``: the teacher's own record, else the same).
            covariance: FAKD's class covariance, ``"diagonal"`` or ``"full"``.
            covariance_all_reduce: sum FAKD's covariance statistics over the processes.
            lambda0, lambda_schedule: FAKD's lambda, ``"cosine"`` ramp 0 -> lambda0 or ``"constant"``.
        """
        super().__init__()
        if covariance not in COVARIANCE_TYPES:
            raise ValueError(f"MODEL.DISTILL.FAKD.COVARIANCE must be one of {COVARIANCE_TYPES}, got {covariance!r}.")
        if lambda_schedule not in LAMBDA_SCHEDULES:
            raise ValueError(
                f"MODEL.DISTILL.FAKD.LAMBDA_SCHEDULE must be one of {LAMBDA_SCHEDULES}, got {lambda_schedule!r}."
            )
        if isinstance(student, Distiller) or isinstance(teacher, Distiller):
            raise TypeError("Neither the student nor the teacher of a Distiller can be a Distiller.")
        if isinstance(losses, Mapping):
            losses = dict(losses)
        else:  # a list of loss modules (lazy configs), named by their ``name``
            losses = {l.name: l for l in losses}
        needs_classifier = any(getattr(l, "needs_classifier", False) for l in losses.values())
        _check_student(student, needs_classifier)
        s_classes, t_classes = _num_classes(student), _num_classes(teacher)
        if s_classes is not None and t_classes is not None and s_classes != t_classes:
            raise ValueError(
                f"The teacher ({getattr(teacher, 'segdistill_teacher_source', type(teacher).__name__)}) "
                f"predicts {t_classes} classes but the student (MODEL.SEM_SEG_HEAD.NUM_CLASSES) predicts "
                f"{s_classes}: distillation needs the same class set."
            )
        self.student = student
        self.distill_losses = nn.ModuleDict(losses)
        self.ignore_value = int(ignore_value)
        self.exclude_ignore = bool(exclude_ignore)
        self.eval_teacher = bool(eval_teacher)
        self.input_format = input_format
        self.teacher_input_format = teacher_input_format or getattr(teacher, "segdistill_input_format", input_format)
        self.lambda0 = float(lambda0)
        self.lambda_schedule = lambda_schedule
        self.covariance = None
        if needs_classifier:
            clf = _student_classifier(student)
            self.covariance = ClassCovariance(clf.out_channels, clf.in_channels, full=covariance == "full",
                                              all_reduce=covariance_all_reduce)
            # (iteration, max_iter) of the lambda schedule; saved with the checkpoint.
            self.register_buffer("fakd_progress", torch.zeros(2, dtype=torch.float64))
        # The teacher lives outside the module tree: no parameters(), state_dict() or DDP.
        teacher.requires_grad_(False)
        self.teacher = teacher.eval()
        self.register_load_state_dict_pre_hook(_load_student_checkpoint)

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DISTILL
        student_arch = d.STUDENT_META_ARCHITECTURE
        if student_arch == "Distiller":
            raise ValueError("MODEL.DISTILL.STUDENT_META_ARCHITECTURE cannot be 'Distiller'.")
        # The class counts are compared before anything is built.
        lazy_teacher = d.TEACHER.CONFIG_FILE.endswith(".py")
        t_cfg = None if lazy_teacher else load_teacher_cfg(d.TEACHER.CONFIG_FILE, d.TEACHER.OPTS)
        if t_cfg is not None and t_cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES != cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES:
            raise ValueError(
                f"The teacher ({d.TEACHER.CONFIG_FILE}) predicts {t_cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES} classes "
                f"but the student (MODEL.SEM_SEG_HEAD.NUM_CLASSES) predicts {cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES}: "
                "distillation needs the same class set."
            )
        teacher = build_teacher(d.TEACHER.CONFIG_FILE, d.TEACHER.WEIGHTS, opts=d.TEACHER.OPTS,
                                device=cfg.MODEL.DEVICE, allow_random=d.TEACHER.ALLOW_RANDOM)
        student_cfg = cfg.clone()
        student_cfg.defrost()
        student_cfg.MODEL.META_ARCHITECTURE = student_arch
        student = META_ARCH_REGISTRY.get(student_arch)(student_cfg)
        return {
            "student": student,
            "teacher": teacher,
            "losses": build_distill_losses(cfg),
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "exclude_ignore": d.EXCLUDE_IGNORE,
            "eval_teacher": d.EVAL_TEACHER,
            "input_format": cfg.INPUT.FORMAT,
            "covariance": d.FAKD.COVARIANCE,
            "covariance_all_reduce": d.FAKD.ALL_REDUCE,
            "lambda0": d.FAKD.LAMBDA0,
            "lambda_schedule": d.FAKD.LAMBDA_SCHEDULE,
        }

    # -- the teacher follows the wrapper's device/dtype but never its train mode ------------
    def __setattr__(self, name, value):
        if name == "teacher":  # never registered as a submodule
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    @property
    def student_device(self) -> torch.device:
        p = next(self.student.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def device(self) -> torch.device:
        return self.student_device

    # -- schedules ------------------------------------------------------------------------
    def set_training_progress(self, iteration: int, max_iter: int) -> None:
        """Called by TrainingProgressHook before every step (FAKD's lambda; the student's own)."""
        if self.covariance is not None:
            self.fakd_progress.copy_(torch.tensor([float(iteration), float(max_iter)], dtype=torch.float64))
        fn = getattr(self.student, "set_training_progress", None)
        if fn is not None:
            fn(iteration, max_iter)

    @property
    def fakd_lambda(self) -> float:
        """FAKD's lambda at the current iteration (``lambda0`` before any progress is known)."""
        if self.covariance is None:
            return 0.0
        it, max_iter = self.fakd_progress.tolist()
        return cosine_ramp(it, max_iter, self.lambda0, self.lambda_schedule)

    # -- deployment -----------------------------------------------------------------------
    def deploy_state_dict(self) -> Dict[str, torch.Tensor]:
        """The student's own weights (keys of the student's config), without the loss state."""
        fn = getattr(self.student, "deploy_state_dict", None)
        return dict(fn()) if fn is not None else dict(self.student.state_dict())

    # -- forward ----------------------------------------------------------------------------
    def _to_teacher_format(self, x: torch.Tensor) -> torch.Tensor:
        if {self.input_format, self.teacher_input_format} == {"RGB", "BGR"}:
            return x.flip(-3)
        return x

    def _student_outputs(self, batched_inputs) -> dict:
        fn = getattr(self.student, "distill_forward", None)
        if fn is not None:
            return fn(batched_inputs)
        return semantic_segmentor_distill_forward(self.student, batched_inputs)

    @torch.no_grad()
    def teacher_logits(self, images: ImageList, size) -> torch.Tensor:
        """The teacher's logits on the student's padded, normalised batch, resized to ``size``."""
        t, s = self.teacher, self.student
        x = images.tensor
        if hasattr(s, "pixel_mean") and hasattr(t, "pixel_mean"):
            x = x * s.pixel_std + s.pixel_mean
            x = (self._to_teacher_format(x) - t.pixel_mean) / t.pixel_std
        h, w = x.shape[-2:]
        div = getattr(getattr(t, "backbone", None), "size_divisibility", 0) or 0
        if div > 1 and (h % div or w % div):
            x = F.pad(x, (0, (-w) % div, 0, (-h) % div))
        if hasattr(t, "distill_teacher_logits"):
            logits = t.distill_teacher_logits(x)
        else:
            feats = t.backbone(x)
            head = t.sem_seg_head
            if hasattr(head, "forward_outputs") and hasattr(head, "predictor"):
                logits = head.forward_outputs(feats)["logits"]
            else:  # any detectron2 head: logits at the input's scale
                logits, _ = head(feats)
        if x.shape[-2:] != (h, w):  # drop the teacher's extra padding
            lh, lw = logits.shape[-2:]
            logits = logits[..., : -(-h * lh // x.shape[-2]), : -(-w * lw // x.shape[-1])]
        if logits.shape[-2:] != tuple(size):
            logits = F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
        return logits

    def forward(self, batched_inputs):
        if not self.training:
            return self._inference(batched_inputs)
        out = self._student_outputs(batched_inputs)
        losses = dict(out["losses"])
        s_logits = out["logits"]
        t_logits = self.teacher_logits(out["images"], s_logits.shape[-2:])
        if t_logits.shape[1] != s_logits.shape[1]:
            raise ValueError(f"The teacher gives {t_logits.shape[1]} channels, the student {s_logits.shape[1]}.")
        labels = valid = None
        if out.get("targets") is not None:
            labels = resize_labels(out["targets"], s_logits.shape[-2:])
            labels = labels.masked_fill(labels == self.ignore_value, -1)  # the losses' ignore: outside [0, C)
            if self.exclude_ignore:
                valid = label_mask(labels, s_logits.shape[1])
        extras = {}
        if self.covariance is not None:
            features = out.get("features")
            if features is None or labels is None:
                raise ValueError("FAKD needs the student's pre-classifier features and the labels of the batch.")
            self.covariance.update(features, labels)
            lam = self.fakd_lambda
            extras = {"classifier": _student_classifier(self.student), "covariance": self.covariance, "lam": lam}
            _put_scalar("fakd_lambda", lam)
        with torch.autocast(s_logits.device.type, enabled=False):  # losses in float32 under AMP
            for name, loss in self.distill_losses.items():
                losses[f"loss_{name}"] = loss.loss_weight * loss(s_logits, t_logits, labels, valid, **extras)
        return losses

    def _inference(self, batched_inputs):
        results = self.student(batched_inputs)
        if self.eval_teacher:
            inputs = batched_inputs
            if self.input_format != self.teacher_input_format:
                inputs = [{**x, "image": self._to_teacher_format(x["image"])} for x in batched_inputs]
            with torch.no_grad():
                teacher_results = self.teacher(inputs)
            for r, t in zip(results, teacher_results):
                r["sem_seg_teacher"] = t["sem_seg"]
        return results


def resize_labels(targets: torch.Tensor, size) -> torch.Tensor:
    """N x H x W labels resized (nearest) to ``size``, as the losses read them."""
    return F.interpolate(targets[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


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


def _put_scalar(name: str, value: float) -> None:
    try:
        from detectron2.utils.events import get_event_storage

        get_event_storage().put_scalar(name, value, smoothing_hint=False)
    except (AssertionError, ImportError):  # outside a trainer: no event storage
        pass
