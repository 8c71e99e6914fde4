"""The distillation-loss contract, its registry, the batch a loss reads and the connectors.

A distillation loss is one registered class (``@register_distill_loss("name")``, one file
per method; the package imports every module it holds, so dropping a file in registers it):
``MODEL.DISTILL.LOSSES`` lists the names, each with its config section
``MODEL.DISTILL.<NAME>`` (the name upper-cased). A loss

* fills that section with every key its ``from_config`` reads and their defaults, in
  :meth:`DistillLoss.add_config` (``register_distill_loss`` registers it as a config hook
  that creates the section, so ``add_segdistill_config`` has the keys as soon as the file is
  imported);
* declares the taps it reads as :class:`TapPair` s (student tap, teacher tap or None) in its
  constructor (:attr:`DistillLoss.taps`);
* builds its trainable parts (a connector, a generator, a projection head, a discriminator)
  in :meth:`DistillLoss.bind`, which the distiller calls once at build time with the taps'
  :class:`~detectron2.layers.ShapeSpec` s, so parts are sized before the optimizer exists;
  they are submodules of the loss, hence of the distiller: trained with the student (in the
  optimizer, DDP and checkpoints), never in the deployed student;
* keeps state (queues, memories, covariances, schedule positions) in buffers, so checkpoints
  save it and ``--resume`` restores it;
* returns its weighted terms from :meth:`DistillLoss.distill` as ``{"loss_<name>...": tensor}``.

Precision (mixed-precision training, ``SOLVER.AMP``): the distiller calls every ``distill`` inside
its float32 island (:func:`float32_island`: autocast off, so softmax, log-softmax, KL,
normalisations, covariances, reductions and the gradient penalty run in float32, and
:meth:`DistillBatch.pair` gives float32 taps). A loss's trainable parts are not loss arithmetic:
it lists them in :meth:`DistillLoss.trainable_parts` and calls each one through
:func:`run_trainable`, which runs it in the step's autocast dtype (tensor cores, bf16 kernels)
and hands its output back in float32. Outside a distiller's step (a loss called on its own, or
a float32 step) :func:`run_trainable` is a plain call.

Conventions of :class:`DistillBatch`: teacher taps are resized (bilinear) to the spatial size
of the student tap they are paired with; labels are resized (nearest) to the size asked for,
with every ignore pixel set to -1 (outside ``[0, K)``).

Names of keys (docs/config_keys.md): a loss's weight is ``WEIGHT`` (``<TERM>_WEIGHT`` for a
loss with several terms), its taps ``STUDENT_TAP`` / ``TEACHER_TAP`` (``logits``,
``head_features`` or a backbone stage: ``res2``..``res5``, HRNet's ``stage2_b0`` ...), its
temperature ``TEMPERATURE``, its connector ``CONNECTOR`` (:data:`CONNECTORS`), and the switch
between the paper's form and the authors' code ``VARIANT`` (``"paper"`` / ``"code"``).
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable, get_cfg
from detectron2.layers import ShapeSpec, get_norm

from ...config import SectionRegistry, add_segdistill_config
from .taps import LOGITS

__all__ = [
    "DISTILL_LOSSES", "register_distill_loss", "unregister_distill_loss", "build_distill_losses",
    "distill_losses_from_names", "DistillLoss", "TemperedLogitsLoss", "DistillBatch", "TapPair", "CONNECTORS",
    "build_connector", "as_float", "label_mask", "masked_mean", "resize_labels", "float32_island", "run_trainable",
    "seeded_generator",
]

def seeded_generator(seed: int, rank: int, draws: torch.Tensor, device="cpu") -> torch.Generator:
    """The generator of one step's random draws of a loss: a function of the run's seed, the
    process's rank and ``draws``, the loss's count of draws so far (a buffer, saved with its
    checkpoints), so that a seeded run repeats and ``--resume`` continues it exactly."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + rank) * 1_000_003 + int(draws))


def register_distill_loss(name: str):
    """Class decorator: make ``name`` a valid entry of ``MODEL.DISTILL.LOSSES`` and register the
    config hook that creates ``MODEL.DISTILL.<NAME>`` and fills it (the class's ``add_config``)."""
    return DISTILL_LOSSES.register(name)


def unregister_distill_loss(name: str) -> None:
    """Remove ``name`` and its config hook (tests, reloading a module); configs already made keep its keys."""
    DISTILL_LOSSES.unregister(name)


def build_distill_losses(cfg) -> Dict[str, "DistillLoss"]:
    """``MODEL.DISTILL.LOSSES`` -> {name: unbound loss}, each from its config section."""
    names = list(cfg.MODEL.DISTILL.LOSSES)
    unknown = [n for n in names if n not in DISTILL_LOSSES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(
            f"MODEL.DISTILL.LOSSES {names}: each of {sorted(DISTILL_LOSSES)} at most once (unknown: {unknown})."
        )
    return {n: DISTILL_LOSSES[n](cfg) for n in names}


def distill_losses_from_names(names: Sequence[str], opts: Sequence = ()) -> List["DistillLoss"]:
    """Losses for lazy configs: ``names`` with their defaults (each loss's ``add_config``), then
    ``opts`` (KEY VALUE list).

    ``model.losses = L(distill_losses_from_names)(names=["pd", "skd"])`` builds exactly what
    ``MODEL.DISTILL.LOSSES: ["pd", "skd"]`` builds in a YAML config; change a setting with e.g.
    ``opts=["MODEL.DISTILL.SKD.POOL_SCALE", 0.25]`` (a renamed key fails as in a YAML config).
    """
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.MODEL.NORM = "BN"  # the connectors' norm unless opts say otherwise (detectron2's default head norm is GN)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DISTILL.LOSSES = list(names)
    return list(build_distill_losses(cfg).values())


class TapPair(NamedTuple):
    """A student tap and the teacher tap it is compared with (None: the student's alone)."""

    student: str
    teacher: Optional[str]


# ------------------------------------------------------------------------------------------
# Small helpers every loss uses
# ------------------------------------------------------------------------------------------
def as_float(x: torch.Tensor) -> torch.Tensor:
    """float32 for half/bfloat16 tensors (AMP), float64 kept as is."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def label_mask(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """True where ``labels`` is a class (``0 <= label < num_classes``), False at ignore pixels."""
    return (labels >= 0) & (labels < num_classes)


def masked_mean(values: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``values`` over the ``valid`` positions (all when None; 0 when none is valid)."""
    if valid is None:
        return values.mean()
    valid = valid.to(values.dtype)
    return (values * valid).sum() / valid.sum().clamp(min=1.0)


def resize_labels(targets: torch.Tensor, size) -> torch.Tensor:
    """N x H x W labels resized (nearest) to ``size``."""
    return F.interpolate(targets[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


# ------------------------------------------------------------------------------------------
# Precision: the float32 island of the losses and the trainable parts inside it
# ------------------------------------------------------------------------------------------
# The autocast state (device type, dtype) of the step whose losses are being computed, recorded
# by float32_island for run_trainable; None outside an island or in a float32 step.
_STEP_AUTOCAST: ContextVar[Optional[Tuple[str, torch.dtype]]] = ContextVar("segdistill_step_autocast", default=None)


@contextlib.contextmanager
def float32_island(device_type: str) -> Iterator[None]:
    """Autocast off for the loss arithmetic of ``device_type``; the step's autocast state is
    recorded so that :func:`run_trainable` runs the losses' trainable parts in it."""
    state = None
    if torch.is_autocast_enabled(device_type):
        state = (device_type, torch.get_autocast_dtype(device_type))
    token = _STEP_AUTOCAST.set(state)
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        _STEP_AUTOCAST.reset(token)


def run_trainable(part: Callable[..., torch.Tensor], *inputs) -> torch.Tensor:
    """``part(*inputs)``: a loss's trainable part (connector, generator, projection,
    discriminator) in the step's autocast dtype, its output back in float32 for the loss
    arithmetic. A plain call outside :func:`float32_island` or in a float32 step."""
    state = _STEP_AUTOCAST.get()
    if state is None:
        return part(*inputs)
    with torch.autocast(state[0], dtype=state[1]):
        out = part(*inputs)
    return as_float(out)


# ------------------------------------------------------------------------------------------
# Connectors
# ------------------------------------------------------------------------------------------
CONNECTORS = ("none", "conv1x1", "conv1x1_bias", "conv_bn_relu")


def build_connector(kind: str, in_channels: int, out_channels: int, *, norm: str = "BN", owner: str = "") -> nn.Module:
    """A trainable map from the student's channels to the teacher's.

    ``none``: identity (the channels must already match); ``conv1x1``: a 1x1 conv without bias
    (FitNet in CIRKD's code); ``conv1x1_bias``: with bias (MGD's align layer); ``conv_bn_relu``:
    1x1 conv + norm + ReLU (CWD's feature connector in HWD's code).
    """
    if kind not in CONNECTORS:
        raise ValueError(f"{owner}: unknown connector {kind!r}; choose from {CONNECTORS}.")
    if kind == "none":
        if in_channels != out_channels:
            raise ValueError(
                f"{owner}: the student tap has {in_channels} channels and the teacher tap {out_channels}; "
                f"without a connector they must match. Choose a connector from {CONNECTORS[1:]}."
            )
        return nn.Identity()
    if kind == "conv_bn_relu":
        conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        return nn.Sequential(conv, get_norm(norm, out_channels) or nn.Identity(), nn.ReLU(inplace=True))
    return nn.Conv2d(in_channels, out_channels, 1, bias=kind == "conv1x1_bias")


# ------------------------------------------------------------------------------------------
# The batch a loss reads
# ------------------------------------------------------------------------------------------
class DistillBatch:
    """What one training step gives to every loss (built by the distiller).

    Args:
        student, teacher: {tap: tensor} of the student and of the teacher (the teacher's
            already cropped to the student's padded extent, without gradient).
        targets: N x H x W padded labels of the batch, or None.
        images: the student's normalised, padded N x 3 x H x W batch.
        classifier: the student's 1x1 classifier (FAKD reads its weight).
        num_classes, ignore_value: of the labels.
        exclude_ignore: :meth:`valid` masks ignore pixels (``MODEL.DISTILL.EXCLUDE_IGNORE``).
    """

    def __init__(self, *, student: Dict[str, torch.Tensor], teacher: Dict[str, torch.Tensor],
                 targets: Optional[torch.Tensor], images: torch.Tensor, classifier: nn.Module,
                 num_classes: int, ignore_value: int, exclude_ignore: bool):
        self.student = student
        self.teacher = teacher
        self.targets = targets
        self.images = images
        self.classifier = classifier
        self.num_classes = int(num_classes)
        self.ignore_value = int(ignore_value)
        self.exclude_ignore = bool(exclude_ignore)
        self._resized: Dict[Tuple, torch.Tensor] = {}
        self._labels: Dict[Tuple[int, int], torch.Tensor] = {}

    def pair(self, pair: TapPair) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(student tap, teacher tap resized bilinearly to the student tap's size, float32)."""
        s = as_float(self.student[pair.student])
        if pair.teacher is None:
            return s, None
        size = tuple(s.shape[-2:])
        key = (pair.teacher, size)
        if key not in self._resized:
            t = as_float(self.teacher[pair.teacher])
            if tuple(t.shape[-2:]) != size:
                t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
            self._resized[key] = t
        return s, self._resized[key]

    def labels(self, size) -> torch.Tensor:
        """N x h x w labels at ``size`` (nearest), ignore pixels -1; an error without labels."""
        if self.targets is None:
            raise ValueError("This distillation loss needs the labels of the batch ('sem_seg' in the inputs).")
        size = tuple(int(v) for v in size)
        if size not in self._labels:
            labels = resize_labels(self.targets, size)
            self._labels[size] = labels.masked_fill(~label_mask(labels, self.num_classes), -1)
        return self._labels[size]

    def valid(self, size) -> Optional[torch.Tensor]:
        """The pixels that count at ``size``: None (all) unless ignore pixels are excluded."""
        if not self.exclude_ignore or self.targets is None:
            return None
        return self.labels(size) >= 0


# ------------------------------------------------------------------------------------------
# The loss contract
# ------------------------------------------------------------------------------------------
class DistillLoss(nn.Module):
    """Base of the registered distillation losses (see the module docstring).

    Subclasses define :meth:`add_config` (their config section and its defaults), are
    ``@configurable`` (``from_config(cls, cfg)`` reads their ``MODEL.DISTILL.<NAME>`` section,
    every constructor argument is keyword-only and required), call
    ``super().__init__(loss_weight=..., taps=...)``, and implement :meth:`distill`.
    """

    name: str = ""  # the registered name, set by register_distill_loss

    def __init__(self, *, loss_weight: float, taps: Sequence[Tuple[str, Optional[str]]]):
        super().__init__()
        self.loss_weight = float(loss_weight)
        self.taps: Tuple[TapPair, ...] = tuple(TapPair(*p) for p in taps)

    # -- config ----------------------------------------------------------------------------
    @classmethod
    def add_config(cls, cfg) -> None:
        """Fill ``cfg.MODEL.DISTILL.<NAME>`` (the registered name upper-cased; the config hook
        that ``register_distill_loss`` registers creates it empty, once per config) with every
        key :meth:`from_config` reads, with its default and a comment saying what it is and
        where the default comes from (paper, authors' code). Keys other losses read too stay
        in ``config/defaults.py``; a section several losses of one file share is added here by
        each of them when it is absent (FAKD's ``MODEL.DISTILL.FAKD``, the holistic term's
        ``MODEL.DISTILL.HOLISTIC``)."""
        raise NotImplementedError(
            f"Distillation loss {cls.__name__} ('{cls.name}') must define the classmethod add_config(cfg) that fills "
            f"its section MODEL.DISTILL.{cls.name.upper()} with the defaults of its keys."
        )

    # -- build time ------------------------------------------------------------------------
    def bind(self, student: Dict[str, ShapeSpec], teacher: Dict[str, ShapeSpec], *, num_classes: int) -> None:
        """Called once by the distiller with the shapes of this loss's taps: build the parts.

        ``student`` / ``teacher`` map tap names (only those of :attr:`taps`) to shapes;
        ``num_classes`` is the class count of both models. The default builds nothing; losses
        comparing tensors channel by channel check them here.
        """

    def check_same_channels(self, student: Dict[str, ShapeSpec], teacher: Dict[str, ShapeSpec]) -> None:
        for p in self.taps:
            if p.teacher is not None and student[p.student].channels != teacher[p.teacher].channels:
                raise ValueError(
                    f"Distillation loss '{self.name}' compares the student's '{p.student}' "
                    f"({student[p.student].channels} channels) with the teacher's '{p.teacher}' "
                    f"({teacher[p.teacher].channels} channels) channel by channel, and it has no connector: "
                    "the channel counts must match (e.g. the same number of classes for logits)."
                )

    def trainable_parts(self) -> Dict[str, nn.Module]:
        """{name: module} of the trainable parts :meth:`bind` built, each called through
        :func:`run_trainable` (the step's precision); every parameter of the loss belongs to one.
        The default: none (a loss without parameters)."""
        return {}

    # -- training --------------------------------------------------------------------------
    def set_training_progress(self, iteration: int, max_iter: int) -> None:
        """Called before every training step (schedules); the default has none."""

    def distill(self, batch: DistillBatch) -> Dict[str, torch.Tensor]:
        """The weighted loss terms of one step, named ``loss_*``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"loss_weight={self.loss_weight}, taps={[tuple(p) for p in self.taps]}"


# MODEL.DISTILL.LOSSES name -> DistillLoss subclass, built as ``cls(cfg)`` (a @configurable class).
DISTILL_LOSSES = SectionRegistry(parent="MODEL.DISTILL", base=DistillLoss, what="Distillation loss")


# ------------------------------------------------------------------------------------------
# A loss between the logits at a temperature (PD, CWD)
# ------------------------------------------------------------------------------------------
class TemperedLogitsLoss(DistillLoss):
    """The shape PD and CWD share: the logits of both models, a temperature, a weight, one term
    ``loss_<name>``. Subclasses set :attr:`loss_fn` ``(student, teacher, temperature, valid)``
    and :attr:`defaults`, their section's ``WEIGHT`` and ``TEMPERATURE``."""

    loss_fn = None  # staticmethod(the functional form) in the subclass
    defaults = {"WEIGHT": 1.0, "TEMPERATURE": 1.0}

    @configurable
    def __init__(self, *, temperature: float, loss_weight: float):
        super().__init__(loss_weight=loss_weight, taps=[(LOGITS, LOGITS)])
        if temperature <= 0:
            raise ValueError(f"MODEL.DISTILL.{self.name.upper()}.TEMPERATURE must be > 0, got {temperature}.")
        self.temperature = float(temperature)

    @classmethod
    def add_config(cls, cfg):
        cfg.MODEL.DISTILL[cls.name.upper()].update(cls.defaults)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.DISTILL[cls.name.upper()]
        return {"temperature": c.TEMPERATURE, "loss_weight": c.WEIGHT}

    def bind(self, student, teacher, *, num_classes):
        self.check_same_channels(student, teacher)

    def forward(self, student_logits, teacher_logits, labels=None, valid=None):
        """``labels`` is unused (the logits losses share one signature)."""
        return self.loss_fn(student_logits, teacher_logits, self.temperature, valid)

    def distill(self, batch):
        s, t = batch.pair(self.taps[0])
        return {f"loss_{self.name}": self.loss_weight * self(s, t, None, batch.valid(s.shape[-2:]))}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, " + super().extra_repr()
