"""``AnytimeSegmentor``: the deployed multi-exit model, run stage by stage, answering from an exit.

The exits that deep supervision and Self-Regulation train are an early-exit model: an image
that the res3 exit already segments confidently does not need res4, res5 and the head. This
meta-architecture is the *deployed* form of a trained ``MultiExitSegmentor`` (docs/anytime.md):

* parts: the backbone (a :class:`~segdistill.modeling.stagewise.StagewiseBackbone`), the
  final head and each exit (``MODEL.EXITS.HEAD`` ``sr`` or ``rh``) without its multi-label classifier;
  the training-only parts (classifiers, objective state) are not built. Parameter names are
  the training model's (``backbone.*``, ``sem_seg_head.*``, ``exits.<name>.*``), so
  ``tools/deploy_model.py --target anytime`` writes a checkpoint that loads with no missing
  or unexpected keys into the training config with ``MODEL.META_ARCHITECTURE
  "AnytimeSegmentor"``.
* inference runs the backbone with ``forward_stages`` (a lazy generator): after an exit's
  stage the exit may answer, and then no later stage, exit or head runs.
* the exit policy (``MODEL.EXITS.ANYTIME.POLICY``, or the ``policy`` attribute):

  - ``final``: the final head answers; no exit runs. The output is bit for bit the plain
    deployed ``SemanticSegmentorAnySize``'s (the head's logits resized to the padded input
    size, at any input size) and the cost the same MACs (tested).
  - ``exit:<name>``: that exit always answers (stages after it are not run).
  - ``confidence``: per image, the exits with a finite threshold run shallowest first; the
    first whose confidence (``MODEL.EXITS.ANYTIME.CONFIDENCE``, :data:`ANYTIME_CONFIDENCES`)
    reaches its threshold answers, else the final head. Images run one at a time (each
    image takes its own path; batch size does not change a decision).
  - ``pixel``: per pixel (:meth:`AnytimeSegmentor.run_pixel`, ``MODEL.EXITS.ANYTIME.PIXEL_THRESHOLDS``
    / ``PIXEL_MODE``): after each exit, the pixels whose top probability reaches its threshold
    (``MODEL.EXITS.PIXEL.CELL`` > 1: whole cells of the input whose active pixels all reach
    it, :mod:`..exits.pixel_cells`) keep its answer and are frozen; the later stages run masked (:mod:`..masked`, through the
    backbone's ``stage_modules()`` / ``stage_outputs()``: one tensor or, on HRNet, a list of
    branches per stage) on the rest; the later exits (``sr``, ``rh``: :mod:`..masked_exits`)
    and the head run masked too where masked execution implements them (heads: DeepLabV3,
    FCN, HRNetV2, :mod:`..masked_heads`), else dense, and the head answers what is left.
    With ``PIXEL_MODE sparse``, a masked stage, exit or head takes the sparse path where masked
    execution's rule (``SPARSE_MAX_ACTIVE`` / ``SPARSE_MIN_PIXELS``) says it pays, else runs emulated.
    Images run one at a time; outputs add counted ``macs``, ``active_pct``, ``answered_pct``
    and the ``masked`` report to ``anytime``.

* every output carries ``sem_seg`` (the answer), ``sem_seg_exit`` (the answering exit's
  name, or ``"final"``) and ``anytime`` = ``{"evaluated": exits run, "input_hw": padded
  input size, "time_s": wall time of this image's forward}``; with ``EVAL_FINAL`` also
  ``sem_seg_final`` and ``anytime["final_time_s"]`` (the plain path, run after the answer
  and timed on its own), so an evaluator reports both side by side.
* an exit's answer is its logits resized (bilinear, ``align_corners`` False, as its training
  loss resizes them) to the padded input size, the size the final head's logits get.
* :meth:`AnytimeSegmentor.costs` measures (fvcore) the MACs of the parts every path is made
  of at one input size: backbone prefixes, exits, the answer's upsampling and the plain
  final path; :meth:`AnytimeCosts.macs` adds them up for a path (tested against a trace of
  the whole path).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.utils.registry import Registry
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.structures import ImageList

from ...config import ConfigError, register_keys
from ...convert import load_checked_weights
from ..backbones.norm import resolve_norm
from ..exits import (
    EXIT_OBJECTIVES, HEAD_FEATURE_PREFIX, ExitHeadBase, build_exit_heads, exit_head_kwargs, exit_modes, exit_size,
)
from ..exits.pixel_cells import check_pixel_cell, freeze_decision
from ..fold import FoldAware
from ..heads.base import check_seg_head, crop_logits
from ..masked import (
    MODES as MASKED_MODES, SPARSE_MAX_ACTIVE, SPARSE_MIN_PIXELS, MaskedStage, PixelMask, UnsupportedModuleError,
)
from ..masked_heads import masked_head_input
from ..stagewise import StageModulesUnsupported, StagewiseBackbone
from ..test_time import WholeImageOnly, check_whole_image_only
from .segmentor import postprocess_sem_seg

__all__ = [
    "AnytimeSegmentor", "AnytimeCosts", "PixelCosts", "ANYTIME_CONFIDENCES",
    "parse_policy", "load_thresholds", "save_thresholds", "thresholds_file_policy", "anytime_state_dict", "anytime_from_trained",
    "load_anytime_weights",
    "FINAL", "NEVER", "PIXEL",
]

logger = logging.getLogger(__name__)

FINAL = "final"  # the answer of the final head (``sem_seg_exit``), and the policy that always takes it
CONFIDENCE = "confidence"
PIXEL = "pixel"
HEAD = "sem_seg_head"  # the final head's name in policy pixel's dense_ops / sparse_stages
EXITS = "exits"  # exit e's name there: "exits.<e>"
EXIT_PREFIX = "exit:"
NEVER = math.inf  # a threshold no confidence reaches: that exit is not run
THRESHOLDS_FORMAT = "segdistill-anytime-thresholds/1"

# Policy "pixel" with PIXEL_MODE "sparse": the rule by which a masked stage (or the head) runs
# the sparse path: at most SPARSE_MAX_ACTIVE of its input pixels active and at least
# SPARSE_MIN_PIXELS pixels per image at its finest input map, else dense (the same outputs).
# The defaults are masked execution's measured break-even (modeling/masked.py).
add_anytime_sparse_config = register_keys("add_anytime_sparse_config", "MODEL.EXITS.ANYTIME",
                                          SPARSE_MAX_ACTIVE=SPARSE_MAX_ACTIVE, SPARSE_MIN_PIXELS=SPARSE_MIN_PIXELS)


def _check_sparse_rule(max_active, min_pixels) -> None:
    if isinstance(max_active, bool) or not isinstance(max_active, (int, float)) or not 0.0 <= max_active <= 1.0:
        raise ConfigError(f"MODEL.EXITS.ANYTIME.SPARSE_MAX_ACTIVE is {max_active!r}; write an active share in "
                          f"[0, 1], e.g. {SPARSE_MAX_ACTIVE} (1: any share may run sparse).")
    if isinstance(min_pixels, bool) or not isinstance(min_pixels, int) or min_pixels < 0:
        raise ConfigError(f"MODEL.EXITS.ANYTIME.SPARSE_MIN_PIXELS is {min_pixels!r}; write a pixel count >= 0, "
                          f"e.g. {SPARSE_MIN_PIXELS} (0: a map of any size may run sparse).")


# MODEL.EXITS.ANYTIME.CONFIDENCE -> fn(logits N x K x h x w, pixel_threshold) -> N confidences in
# [0, 1]; a function registers under its own name: ``@ANYTIME_CONFIDENCES.register()``.
ANYTIME_CONFIDENCES = Registry("ANYTIME_CONFIDENCES")


@ANYTIME_CONFIDENCES.register()
def mean_max_prob(logits: torch.Tensor, pixel_threshold: float) -> torch.Tensor:
    """Mean over pixels of the top softmax probability."""
    return F.softmax(logits.float(), dim=1).amax(dim=1).mean(dim=(1, 2))


@ANYTIME_CONFIDENCES.register()
def fraction_above(logits: torch.Tensor, pixel_threshold: float) -> torch.Tensor:
    """Share of pixels whose top softmax probability is at least ``pixel_threshold``."""
    top = F.softmax(logits.float(), dim=1).amax(dim=1)
    return (top >= pixel_threshold).float().mean(dim=(1, 2))


def parse_policy(policy: str, exit_names: Sequence[str]) -> Tuple[str, Optional[str]]:
    """``(kind, exit)`` of a policy string: ``("final", None)``, ``("exit", name)``, ``("confidence", None)``,
    ``("pixel", None)``."""
    choices = [FINAL, CONFIDENCE, PIXEL] + [EXIT_PREFIX + n for n in exit_names]
    if policy == FINAL:
        return FINAL, None
    if policy in (CONFIDENCE, PIXEL) and exit_names:
        return policy, None
    if policy.startswith(EXIT_PREFIX) and policy[len(EXIT_PREFIX):] in exit_names:
        return "exit", policy[len(EXIT_PREFIX):]
    raise ValueError(f"Unknown MODEL.EXITS.ANYTIME.POLICY {policy!r} for exits {list(exit_names)}; "
                     f"valid choices: {choices if exit_names else [FINAL]}.")


# ----------------------------------------------------------------------------- thresholds file
def save_thresholds(path: str, thresholds: Dict[str, float], *, confidence: str, pixel_threshold: float,
                    calibration: Optional[dict] = None, policy: str = CONFIDENCE, pixel_cell: int = 1) -> str:
    """Write the thresholds file ``MODEL.EXITS.ANYTIME.THRESHOLDS_FILE`` points to (JSON;
    ``null`` = never answer from that exit). ``policy``: the policy the thresholds are for,
    ``confidence`` (per-image confidence thresholds) or ``pixel`` (per-pixel top-probability
    thresholds, read as ``PIXEL_THRESHOLDS``, with the decision cell ``pixel_cell`` they were
    calibrated for, ``MODEL.EXITS.PIXEL.CELL``)."""
    if policy not in (CONFIDENCE, PIXEL):
        raise ValueError(f"A thresholds file is for policy {CONFIDENCE!r} or {PIXEL!r}, got {policy!r}.")
    doc = {
        "format": THRESHOLDS_FORMAT,
        "policy": policy,
        "confidence": confidence,
        "pixel_threshold": float(pixel_threshold),
        "thresholds": {k: (None if not math.isfinite(v) else float(v)) for k, v in thresholds.items()},
        "calibration": calibration or {},
    }
    if policy == PIXEL:  # the same thresholds freeze other pixels with other cells
        doc["pixel_cell"] = check_pixel_cell(pixel_cell)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return path


def _read_thresholds_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MODEL.EXITS.ANYTIME.THRESHOLDS_FILE {path!r} does not exist; "
                                "tools/calibrate_exits.py writes one.")
    with open(path) as f:
        doc = json.load(f)
    if doc.get("format") != THRESHOLDS_FORMAT:
        raise ValueError(f"{path!r} is not an anytime thresholds file (format {doc.get('format')!r}, "
                         f"expected {THRESHOLDS_FORMAT!r}).")
    return doc


def thresholds_file_policy(path: str) -> str:
    """The policy a thresholds file is for: ``confidence`` (files written before the field
    existed too) or ``pixel``."""
    return _read_thresholds_file(path).get("policy", CONFIDENCE)


def load_thresholds(path: str, exit_names: Sequence[str], *, confidence: str, pixel_threshold: float,
                    policy: str = CONFIDENCE, pixel_cell: int = 1) -> Dict[str, float]:
    """Read a thresholds file, checked against the model's exits, the policy it is read for,
    (policy ``confidence``) the confidence settings and (policy ``pixel``) the decision cell
    (a file without one was calibrated per pixel, cell 1)."""
    doc = _read_thresholds_file(path)
    if doc.get("policy", CONFIDENCE) != policy:
        raise ValueError(f"{path!r} holds thresholds of policy {doc.get('policy', CONFIDENCE)!r}, read for policy "
                         f"{policy!r}: calibrate with tools/calibrate_exits.py --policy {policy}.")
    mismatch = doc["confidence"] != confidence or (confidence == "fraction_above"
                                                   and float(doc["pixel_threshold"]) != float(pixel_threshold))
    if policy == CONFIDENCE and mismatch:  # a per-pixel policy's thresholds do not depend on the confidence
        raise ValueError(
            f"{path!r} was calibrated for confidence {doc['confidence']!r} (pixel threshold "
            f"{doc['pixel_threshold']}), but the config asks for MODEL.EXITS.ANYTIME.CONFIDENCE {confidence!r} "
            f"(PIXEL_THRESHOLD {pixel_threshold}); recalibrate or change the config.")
    if policy == PIXEL and int(doc.get("pixel_cell", 1)) != pixel_cell:
        raise ValueError(f"{path!r} was calibrated for MODEL.EXITS.PIXEL.CELL {doc.get('pixel_cell', 1)}, but the config "
                         f"asks for {pixel_cell}; write MODEL.EXITS.PIXEL.CELL {doc.get('pixel_cell', 1)} or recalibrate.")
    got = doc["thresholds"]
    if sorted(got) != sorted(exit_names):
        raise ValueError(f"{path!r} has thresholds for exits {sorted(got)}, the model has {list(exit_names)}.")
    return {k: (NEVER if got[k] is None else float(got[k])) for k in exit_names}


def _thresholds_from_config(a, exit_names: Sequence[str]) -> Optional[Dict[str, float]]:
    if a.THRESHOLDS and a.THRESHOLDS_FILE:
        raise ValueError("Set MODEL.EXITS.ANYTIME.THRESHOLDS or MODEL.EXITS.ANYTIME.THRESHOLDS_FILE, not both.")
    if a.THRESHOLDS_FILE and thresholds_file_policy(a.THRESHOLDS_FILE) == CONFIDENCE:
        return load_thresholds(a.THRESHOLDS_FILE, exit_names, confidence=a.CONFIDENCE, pixel_threshold=a.PIXEL_THRESHOLD)
    if a.THRESHOLDS:
        if len(a.THRESHOLDS) != len(exit_names):
            raise ValueError(f"MODEL.EXITS.ANYTIME.THRESHOLDS has {len(a.THRESHOLDS)} values for the exits "
                             f"{list(exit_names)}; give one per exit (above 1 = never answer there).")
        return {n: (NEVER if float(t) > 1.0 else float(t)) for n, t in zip(exit_names, a.THRESHOLDS)}
    return None


def _pixel_thresholds_from_config(a, exit_names: Sequence[str], cell: int) -> Optional[Dict[str, float]]:
    values = [float(t) for t in a.PIXEL_THRESHOLDS]
    if a.THRESHOLDS_FILE and thresholds_file_policy(a.THRESHOLDS_FILE) == PIXEL:  # calibrated per-pixel thresholds
        if values:
            raise ValueError(f"MODEL.EXITS.ANYTIME.THRESHOLDS_FILE {a.THRESHOLDS_FILE!r} holds policy 'pixel''s "
                             "thresholds: set it or MODEL.EXITS.ANYTIME.PIXEL_THRESHOLDS, not both.")
        return load_thresholds(a.THRESHOLDS_FILE, exit_names, confidence=a.CONFIDENCE,
                               pixel_threshold=a.PIXEL_THRESHOLD, policy=PIXEL, pixel_cell=check_pixel_cell(cell))
    if not values:
        return None
    if len(values) == 1:
        values = values * len(exit_names)
    if len(values) != len(exit_names):
        raise ValueError(f"MODEL.EXITS.ANYTIME.PIXEL_THRESHOLDS has {len(values)} values for the exits "
                         f"{list(exit_names)}; give one per exit or one for all (above 1 = that exit freezes nothing).")
    return {n: (NEVER if t > 1.0 else t) for n, t in zip(exit_names, values)}


# ----------------------------------------------------------------------------- costs
@dataclass
class AnytimeCosts:
    """fvcore MACs of the parts of every path at one (padded) input size.

    ``prefix[e]``: the backbone up to and including the stage that yields exit ``e``'s
    feature, whole (an HRNet stage computes all its branches, also those ``e`` does not read,
    so every feature computed is an output of the trace); ``exits[e]``: exit
    ``e`` (reduce conv, resize, feature conv, segmenter) on that stage; ``answer[e]``:
    upsampling ``e``'s logits to the input size; ``final``: the plain deployed path (backbone
    as far as the head reads, head, its upsampling). fvcore counts one multiply-accumulate of
    a convolution / linear layer as one "flop" and adds its per-element counts of batch norm
    and bilinear upsampling; the softmax of a confidence is not counted.
    """

    input_hw: Tuple[int, int]
    prefix: Dict[str, float] = field(default_factory=dict)
    exits: Dict[str, float] = field(default_factory=dict)
    answer: Dict[str, float] = field(default_factory=dict)
    final: float = 0.0

    def macs(self, answer: str, evaluated: Sequence[str]) -> float:
        """MACs of a path that ran the exits ``evaluated`` and answered from ``answer``."""
        spent = sum(self.exits[e] for e in evaluated)
        if answer == FINAL:
            return self.final + spent
        return self.prefix[answer] + spent + self.answer[answer]


class _Prefix(nn.Module):
    """The backbone up to the stage that yields feature ``stage``. Every feature computed so far
    is an output, so that fvcore's trace keeps what runs: a stage of several features (HRNet's
    branches) computes them all, also those its exit does not read."""

    def __init__(self, model, stage):
        super().__init__()
        self.model, self.stage = model, stage

    def forward(self, x):
        backbone = self.model.backbone
        last = backbone.stage_outputs()[backbone.stage_of_features()[self.stage]][-1]
        feats = []
        for name, feat in backbone.forward_stages(x):
            feats.append(feat)
            if name == last:
                return tuple(feats)
        raise KeyError(self.stage)


class _ExitOnly(nn.Module):
    def __init__(self, model, name, size):
        super().__init__()
        self.model, self.name, self.size = model, name, size

    def forward(self, feat):
        return self.model.exits[self.name](feat, self.size, with_classifier=False).seg_logits


class _Upsample(nn.Module):
    """An exit's answer: its logits resized to the padded input size (as :meth:`AnytimeSegmentor.run_stages`)."""

    def __init__(self, size):
        super().__init__()
        self.size = size

    def forward(self, logits):
        return F.interpolate(logits, size=self.size, mode="bilinear", align_corners=False)


class _Path(nn.Module):
    """A forced path of the model (exits ``evaluated`` run, ``answer`` answers), for fvcore."""

    def __init__(self, model, evaluated, answer):
        super().__init__()
        self.model, self.evaluated, self.answer = model, tuple(evaluated), answer

    def forward(self, x):
        sizes = [tuple(x.shape[-2:])] * x.shape[0]
        ran = []  # every exit's logits are outputs too, so the trace keeps exits that did not answer
        features = {}  # and every feature computed (the branches of a stage no exit or head reads)

        def decide(e, logits):
            ran.append(logits)
            return e == self.answer

        return (self.model.run_stages(x, sizes, self.evaluated, decide, features)[0], *ran, *features.values())


class _HeadOnly(nn.Module):
    """The final head on the backbone features it reads, its logits resized to ``size``."""

    def __init__(self, model, size):
        super().__init__()
        self.model, self.size = model, size

    def forward(self, *feats):
        head = self.model.sem_seg_head
        return head(dict(zip(head.in_features, feats)), None, output_size=self.size)[0]


class _HeadResize(nn.Module):
    """The final head's logits brought to ``size`` by its output_resize rule (``predict_logits``)."""

    def __init__(self, model, size):
        super().__init__()
        self.model, self.size = model, size

    def forward(self, logits):
        return self.model.sem_seg_head.predict_logits(logits, self.size)


@dataclass
class PixelCosts:
    """fvcore MACs of the parts policy ``pixel`` runs dense, at one (padded) input size:
    ``stages[s]``: backbone stage ``s`` (``stage_modules()[s]``, on the previous stage's tensor
    or list of branches; keyed by the stage's name, which for a list-valued stage is not one of
    the features it yields: ``stage_outputs()``) at every pixel; ``head``: the
    final head with its resize to the input size; ``head_resize``: that resize alone (what a
    head run masked adds to masked execution's count of it). The exits and their resize are
    :class:`AnytimeCosts`' ``exits`` / ``answer``."""

    input_hw: Tuple[int, int]
    stages: Dict[str, float] = field(default_factory=dict)
    head: float = 0.0
    head_resize: float = 0.0


def _drop_masked_on_load(module, incompatible_keys) -> None:
    module._drop_masked()  # new weights: the sparse stages' folded norms are stale


def _fvcore_macs(module: nn.Module, inputs: tuple) -> float:
    from fvcore.nn import FlopCountAnalysis

    counter = FlopCountAnalysis(module, inputs)
    counter.unsupported_ops_warnings(False)
    counter.uncalled_modules_warnings(False)
    return float(counter.total())


# ----------------------------------------------------------------------------- the model
@META_ARCH_REGISTRY.register()
class AnytimeSegmentor(nn.Module, WholeImageOnly, FoldAware):
    """The deployed multi-exit segmentor: stage-by-stage inference with an exit policy."""

    @configurable
    def __init__(
        self,
        *,
        backbone: StagewiseBackbone,
        sem_seg_head: nn.Module,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        exits: Dict[str, ExitHeadBase],
        policy: str = FINAL,
        confidence: str = "mean_max_prob",
        pixel_threshold: float = 0.9,
        thresholds: Optional[Dict[str, float]] = None,
        eval_final: bool = False,
        pixel_thresholds: Optional[Dict[str, float]] = None,
        pixel_mode: str = "emulate",
        sparse_max_active: float = SPARSE_MAX_ACTIVE,
        sparse_min_pixels: int = SPARSE_MIN_PIXELS,
        pixel_cell: int = 1,
    ):
        """
        Args:
            backbone: a :class:`StagewiseBackbone` (segdistill's timm backbones).
            sem_seg_head: the final head, as the plain ``SemanticSegmentorAnySize`` has it (one of
                segdistill's heads, :class:`~segdistill.modeling.heads.SegHeadMixin`: it takes the output size).
            pixel_mean, pixel_std: as ``SemanticSegmentorAnySize``.
            exits: backbone stage name -> exit head (``sr`` or ``rh``) over the head's classes (built
                without classifier); {} for a model without exits (policy ``final`` only).
            policy: ``final``, ``exit:<name>`` or ``confidence`` (settable later: ``model.policy = ...``).
            confidence: a name in :data:`ANYTIME_CONFIDENCES`.
            pixel_threshold: the per-pixel probability of ``fraction_above``.
            thresholds: exit name -> threshold in [0, 1] (``math.inf`` or above 1: never
                answer there, the exit is not run); required by ``confidence``.
            eval_final: also return the plain path's output ``sem_seg_final`` (and its time).
            pixel_thresholds: exit name -> top-probability threshold of policy ``pixel`` (above
                1: that exit freezes nothing and is not run); required by ``pixel``.
            pixel_mode: how policy ``pixel`` runs the stages after an exit: ``emulate`` or
                ``sparse`` (:data:`segdistill.modeling.masked.MODES`).
            sparse_max_active, sparse_min_pixels: ``sparse`` runs a masked stage (or the head) on
                the sparse path only when at most this share of its input pixels is active and
                its finest input map has at least this many pixels, else as ``emulate``
                (:class:`~segdistill.modeling.masked.MaskedStage`; settable later, like ``pixel_mode``).
            pixel_cell: ``MODEL.EXITS.PIXEL.CELL``: policy ``pixel`` freezes ``c x c`` cells of
                the padded input together (:mod:`segdistill.modeling.exits.pixel_cells`; 1: each
                pixel on its own), as mask-aware training does.
        """
        super().__init__()
        if not isinstance(backbone, StagewiseBackbone):
            raise TypeError(f"AnytimeSegmentor runs the backbone stage by stage: {type(backbone).__name__} is not a "
                            "StagewiseBackbone (segdistill.modeling.stagewise); use MODEL.BACKBONE.NAME "
                            "'build_timm_backbone' or implement forward_stages / stage_shapes.")
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        stages = list(backbone.stage_shapes())
        exits = dict(exits or {})
        bad = [n for n in exits if n not in stages]
        if bad:
            heads = [n for n in bad if n.startswith(HEAD_FEATURE_PREFIX)]
            raise ValueError(
                f"Anytime exits must sit on backbone stages (an exit on the head's features {heads} answers "
                f"after the head has run); {bad} are not stages of {type(backbone).__name__}: {stages}."
                if heads else f"Exits {bad} are not stages of {type(backbone).__name__}: {stages}.")
        check_seg_head(sem_seg_head, "AnytimeSegmentor hands its head the input size (MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE)")
        if exits:
            k = sem_seg_head.predictor.out_channels
            wrong = {n: e.num_classes for n, e in exits.items() if e.num_classes != k}
            if wrong:
                raise ValueError(f"Exits {wrong} do not predict the head's {k} classes: an anytime exit answers in "
                                 "the dataset's classes (MODE ds or sr, MODEL.EXITS.NUM_CLASSES empty).")
        # shallowest first, in the order the backbone computes the stages
        self.exits = nn.ModuleDict({n: exits[n] for n in stages if n in exits})
        if confidence not in ANYTIME_CONFIDENCES:
            raise ValueError(f"Unknown MODEL.EXITS.ANYTIME.CONFIDENCE {confidence!r}; "
                             f"choose from {sorted(name for name, _ in ANYTIME_CONFIDENCES)}.")
        self.confidence = confidence
        self.pixel_threshold = float(pixel_threshold)
        self.thresholds = None if thresholds is None else dict(thresholds)
        self.eval_final = eval_final
        if pixel_mode not in MASKED_MODES:
            raise ValueError(f"Unknown MODEL.EXITS.ANYTIME.PIXEL_MODE {pixel_mode!r}; choose from {list(MASKED_MODES)}.")
        self.pixel_mode = pixel_mode
        _check_sparse_rule(sparse_max_active, sparse_min_pixels)
        self.sparse_max_active, self.sparse_min_pixels = float(sparse_max_active), int(sparse_min_pixels)
        self.pixel_cell = check_pixel_cell(pixel_cell)
        self.pixel_thresholds = None
        # stage name -> MaskedStage of policy ``pixel`` (compiled once; a sparse stage folds its
        # norms on first use, so the cache is dropped whenever the weights may have changed:
        # train() / eval(), a load_state_dict, another device)
        self._masked: Dict[str, Optional[MaskedStage]] = {}  # and the head's under HEAD, exit e's under "exits.<e>" (None: runs dense)
        self._masked_device = None
        self.register_load_state_dict_post_hook(_drop_masked_on_load)
        self._costs: Dict[Tuple[int, int], AnytimeCosts] = {}
        self._pixel_costs: Dict[Tuple[int, int], PixelCosts] = {}
        if pixel_thresholds is not None:
            self.set_pixel_thresholds(pixel_thresholds, check=False)
        self.policy = policy

    @classmethod
    def from_config(cls, cfg):
        c, a = cfg.MODEL.EXITS, cfg.MODEL.EXITS.ANYTIME
        check_whole_image_only(cfg, "MODEL.META_ARCHITECTURE AnytimeSegmentor")
        if c.MODE not in exit_modes():
            raise ValueError(f"Unknown MODEL.EXITS.MODE {c.MODE!r}; choose from {list(exit_modes())}.")
        backbone = build_backbone(cfg)
        if not isinstance(backbone, StagewiseBackbone):
            raise TypeError(f"MODEL.BACKBONE.NAME {cfg.MODEL.BACKBONE.NAME!r} builds {type(backbone).__name__}, "
                            "which cannot run stage by stage (StagewiseBackbone); use 'build_timm_backbone'.")
        head = build_sem_seg_head(cfg, backbone.output_shape())
        names = list(c.IN_FEATURES) if c.MODE != "none" else []
        heads = [n for n in names if n.startswith(HEAD_FEATURE_PREFIX)]
        if heads:
            raise ValueError(f"Anytime exits must sit on backbone stages: MODEL.EXITS.IN_FEATURES {heads} read the "
                             "head's features, so they would answer after the head has run.")
        exits = {}
        if names:
            objective_cls = EXIT_OBJECTIVES[c.MODE]  # the mode's contract says what its exits predict
            if objective_cls.build_fusion(cfg, names, backbone.output_shape()) is not None:
                raise ValueError(f"MODEL.EXITS.MODE {c.MODE!r} fuses the exits into the head's input, so the head "
                                 "cannot run without them: anytime inference needs exits the head does not read.")
            dataset = (list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN) or [None])[0]
            spaces = objective_cls.eval_label_spaces(cfg, dataset) if dataset else {}
            if spaces:
                raise ValueError(f"The exits of MODEL.EXITS.MODE {c.MODE!r} predict their own label spaces "
                                 f"({sorted(spaces)}), not the dataset's classes: an anytime exit answers in the "
                                 "dataset's classes (MODE ds or sr).")
            exits = build_exit_heads(
                input_shape=backbone.stage_shapes(), in_features=names,
                num_classes=objective_cls.exit_num_classes(cfg, names), **exit_head_kwargs(cfg),
                common_stride=c.COMMON_STRIDE, norm=resolve_norm(cfg, "head"),
                with_classifier=False, max_downsample=c.MAX_DOWNSAMPLE,
            )
        return {
            "backbone": backbone, "sem_seg_head": head,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
            "exits": exits, "policy": a.POLICY, "confidence": a.CONFIDENCE, "pixel_threshold": a.PIXEL_THRESHOLD,
            "thresholds": _thresholds_from_config(a, names), "eval_final": a.EVAL_FINAL,
            "pixel_thresholds": _pixel_thresholds_from_config(a, names, c.PIXEL.CELL), "pixel_mode": a.PIXEL_MODE,
            "sparse_max_active": a.SPARSE_MAX_ACTIVE, "sparse_min_pixels": a.SPARSE_MIN_PIXELS,
            "pixel_cell": c.PIXEL.CELL,
        }

    # ------------------------------------------------------------------ policy
    @property
    def device(self):
        return self.pixel_mean.device

    @property
    def exit_names(self) -> List[str]:
        """The exits, shallowest first."""
        return list(self.exits)

    @property
    def policy(self) -> str:
        return self._policy

    @policy.setter
    def policy(self, value: str) -> None:
        kind, name = parse_policy(value, self.exit_names)
        if kind == CONFIDENCE:
            if self.thresholds is None:
                raise ValueError("Policy 'confidence' needs thresholds: MODEL.EXITS.ANYTIME.THRESHOLDS_FILE "
                                 "(tools/calibrate_exits.py writes one) or MODEL.EXITS.ANYTIME.THRESHOLDS.")
            if sorted(self.thresholds) != sorted(self.exit_names):
                raise ValueError(f"Thresholds for {sorted(self.thresholds)} but the exits are {self.exit_names}.")
        if kind == PIXEL:
            if self.pixel_thresholds is None:
                raise ValueError("Policy 'pixel' needs MODEL.EXITS.ANYTIME.PIXEL_THRESHOLDS (one value per exit, or "
                                 "one for all, e.g. [0.998]).")
            self._masked_plans(self.pixel_thresholds)  # refuses a stage masked execution cannot run, now
        self._policy, self._kind, self._fixed_exit = value, kind, name

    def set_thresholds(self, thresholds: Dict[str, float]) -> None:
        """Replace the confidence thresholds (exit name -> value; above 1 = never)."""
        if sorted(thresholds) != sorted(self.exit_names):
            raise ValueError(f"Thresholds for {sorted(thresholds)} but the exits are {self.exit_names}.")
        self.thresholds = {k: (NEVER if float(v) > 1.0 else float(v)) for k, v in thresholds.items()}

    def set_pixel_thresholds(self, thresholds: Dict[str, float], check: bool = True) -> None:
        """Replace policy ``pixel``'s thresholds (exit name -> value; above 1 = that exit freezes
        nothing and is not run). ``check``: compile the stages the new thresholds mask now."""
        if sorted(thresholds) != sorted(self.exit_names):
            raise ValueError(f"Pixel thresholds for {sorted(thresholds)} but the exits are {self.exit_names}.")
        new = {k: (NEVER if float(v) > 1.0 else float(v)) for k, v in thresholds.items()}
        if check:
            self._masked_plans(new)
        self.pixel_thresholds = new

    def active_exits(self) -> Tuple[str, ...]:
        """The exits the current policy runs, shallowest first."""
        if self._kind == FINAL:
            return ()
        if self._kind == "exit":
            return (self._fixed_exit,)
        thresholds = self.pixel_thresholds if self._kind == PIXEL else self.thresholds
        return tuple(n for n in self.exit_names if math.isfinite(thresholds[n]))

    # ------------------------------------------------------------------ forward
    def _images(self, batched_inputs) -> ImageList:
        images = [x["image"].to(self.device) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        return ImageList.from_tensors(images, self.backbone.size_divisibility,
                                      padding_constraints=self.backbone.padding_constraints)

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _confidences(self, logits: torch.Tensor, image_sizes) -> torch.Tensor:
        """Each image's confidence over its own (unpadded) part of the exit's logits."""
        stride = next(iter(self.exits.values())).common_stride
        fn = ANYTIME_CONFIDENCES.get(self.confidence)
        out = []
        for i, (h, w) in enumerate(image_sizes):
            out.append(fn(logits[i:i + 1, :, :math.ceil(h / stride), :math.ceil(w / stride)], self.pixel_threshold))
        return torch.cat(out)

    def run_stages(self, x: torch.Tensor, image_sizes, evaluate: Sequence[str],
                   decide: Callable[[str, torch.Tensor], bool], features: Optional[Dict[str, torch.Tensor]] = None):
        """Run the stages lazily; after exit ``e`` of ``evaluate`` (shallowest first),
        ``decide(e, logits)`` True makes ``e`` answer and nothing after it runs.
        Returns (logits at the padded input size, answer, exits evaluated); ``features``, when
        given, is filled with every backbone feature computed (those of the answering exit's
        stage included: a list-valued stage computes its branches together)."""
        pending = [n for n in self.exit_names if n in set(evaluate)]
        need = set(self.sem_seg_head.in_features)
        features = {} if features is None else features
        evaluated = []
        size = exit_size(x.shape[-2:], next(iter(self.exits.values())).common_stride) if pending else None
        stages = self.backbone.forward_stages(x)
        try:
            for name, feat in stages:
                features[name] = feat
                if pending and pending[0] == name:
                    pending.pop(0)
                    logits = self.exits[name](feat, size, with_classifier=False).seg_logits
                    evaluated.append(name)
                    if decide(name, logits):
                        up = F.interpolate(logits, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
                        # the rest of this stage's features were computed with it: yielded with no more work
                        group = self.backbone.stage_outputs()[self.backbone.stage_of_features()[name]]
                        for _ in group[group.index(name) + 1:]:
                            rest, feat = next(stages)
                            features[rest] = feat
                        return up, name, tuple(evaluated)
                if not pending and need.issubset(features):
                    break
        finally:
            stages.close()  # later stages are never computed
        # the plain deployed path, as SemanticSegmentorAnySize
        results, _ = self.sem_seg_head(features, None, output_size=tuple(x.shape[-2:]))
        return results, FINAL, tuple(evaluated)

    def _decide(self, image_sizes):
        if self._kind == "exit":
            return lambda name, logits: True
        if self._kind == FINAL:
            return lambda name, logits: False

        def by_confidence(name, logits):
            return bool(self._confidences(logits, image_sizes)[0] >= self.thresholds[name])

        return by_confidence

    # ------------------------------------------------------------------ policy "pixel"
    def train(self, mode: bool = True):
        self._drop_masked()  # the weights may change while training: the folded norms are rebuilt
        return super().train(mode)

    def _drop_masked(self) -> None:
        self._masked = {}

    def after_fold(self) -> None:
        """The norms were folded into the convolutions (modeling/fold.py): the compiled masked
        stages hold the old norms, so they are compiled again from the folded modules."""
        self._drop_masked()

    def _masked_plans(self, thresholds: Dict[str, float]) -> Dict[str, MaskedStage]:
        """The stages policy ``pixel`` may run masked with ``thresholds`` (those after its first
        exit, up to the last one it needs), compiled once; an error names a stage it cannot run."""
        if self._masked_device != self.device:
            self._masked, self._masked_device = {}, self.device
        try:
            modules = self.backbone.stage_modules()
        except StageModulesUnsupported as e:
            raise StageModulesUnsupported(f"Policy 'pixel' runs the backbone's stages one by one: {e}") from e
        names, stage_of = list(modules), self.backbone.stage_of_features()
        run = [n for n in self.exit_names if math.isfinite(thresholds[n])]
        if not run:
            return {}
        last = max(names.index(stage_of[n]) for n in list(self.sem_seg_head.in_features) + run)
        plans = {}
        for name in names[names.index(stage_of[run[0]]) + 1:last + 1]:
            if name not in self._masked:
                try:
                    self._masked[name] = MaskedStage(modules[name], name)
                except UnsupportedModuleError as e:
                    raise UnsupportedModuleError(
                        f"Policy 'pixel' runs stage {name} on the pixels exit {run[0]} leaves active, but masked "
                        f"execution cannot: {e} (put the first exit later or leave this backbone's exits to the "
                        "image-level policies).") from e
            plans[name] = self._masked[name]
        return plans

    def _sparse_rule(self) -> dict:
        return {"max_active": self.sparse_max_active, "min_pixels": self.sparse_min_pixels}

    def _masked_or_dense(self, key: str, module: nn.Module) -> Optional[MaskedStage]:
        """``module`` compiled for masked execution once (cached with the stages, under ``key``),
        or None where masked execution has no implementation of it: it then runs dense, listed
        in ``dense_ops``."""
        if self._masked_device != self.device:
            self._masked, self._masked_device = {}, self.device
        if key not in self._masked:
            self._masked[key] = MaskedStage.or_dense(module, key)
        return self._masked[key]

    def _masked_head(self) -> Optional[MaskedStage]:
        """The final head compiled for masked execution, or None (it runs dense)."""
        return self._masked_or_dense(HEAD, self.sem_seg_head)

    def _masked_exit(self, name: str) -> Optional[MaskedStage]:
        """Exit ``name`` compiled for masked execution, or None (it runs dense)."""
        return self._masked_or_dense(f"{EXITS}.{name}", self.exits[name])

    @torch.no_grad()
    def pixel_costs(self, input_hw: Sequence[int]) -> PixelCosts:
        """fvcore MACs of the parts policy ``pixel`` runs dense at a padded input of ``input_hw`` (cached)."""
        hw = tuple(int(v) for v in input_hw)
        if hw not in self._pixel_costs:
            was_training = self.training
            self.eval()
            costs = PixelCosts(hw)
            x, feats = torch.zeros(1, 3, *hw, device=self.device), {}
            outputs = self.backbone.stage_outputs()
            for name, module in self.backbone.stage_modules().items():
                costs.stages[name] = _fvcore_macs(module, (x,))
                x = module(x)
                feats.update(self.backbone.stage_features(outputs[name], x))
            costs.head = _fvcore_macs(_HeadOnly(self, hw), tuple(feats[n] for n in self.sem_seg_head.in_features))
            logits = self.sem_seg_head.forward_outputs({n: feats[n] for n in self.sem_seg_head.in_features})["logits"]
            costs.head_resize = _fvcore_macs(_HeadResize(self, hw), (logits,))
            self.train(was_training)
            self._pixel_costs[hw] = costs
        return self._pixel_costs[hw]

    def run_pixel(self, x: torch.Tensor, image_size: Sequence[int]) -> Tuple[torch.Tensor, dict]:
        """Policy ``pixel`` on one (padded, normalised) image ``x`` (``1 x 3 x H x W``) whose own
        part is ``image_size``.

        The stages run one by one (``stage_modules()``; a stage may yield several named
        features, ``stage_outputs()``, e.g. HRNet's branches, and the exits on them run in that
        order once the stage has run). After an exit with a finite threshold,
        its logits, resized to ``H x W``, answer every still-active pixel whose top softmax
        probability reaches the threshold; those pixels are frozen (with ``pixel_cell`` c > 1:
        every still-active pixel of each ``c x c`` cell whose active pixels inside the image
        all reach it, :func:`~segdistill.modeling.exits.pixel_cells.freeze_decision`). Once a pixel is frozen, the
        later stages run masked (``pixel_mode``; :class:`~segdistill.modeling.masked.PixelMask`
        of the active pixels at every stride); before that they run dense, as ``forward_stages``.
        An exit run once a pixel is frozen runs masked too (its logits at the active pixels,
        ``segdistill.modeling.masked_exits``; frozen ones are 0, never used: those pixels keep
        their answers), where masked execution implements its head (``sr``, ``rh``), else dense;
        before any freeze it runs its own forward (bit for bit the other policies' exit). Its
        resize to the input runs at every pixel and is counted so (``costs().answer``), as the
        head's resize (``PixelCosts.head_resize``).
        When no pixel of the image's own part is active any more, nothing later runs. Else the
        head runs on the (masked) features and its logits answer the active pixels: masked (its
        logits at the active pixels, then its resize to the input) once a pixel is frozen, where
        masked execution implements the head (``segdistill.modeling.masked_heads``; its input:
        ``masked_head_input``, the list of the head's features for a head of several), else dense.
        ``sparse`` follows the rule ``sparse_max_active`` / ``sparse_min_pixels`` per stage and head.

        Returns ``(logits 1 x K x H x W, info)``; ``info``: ``answer`` (``final`` when the head
        ran, else the exit after which the image stopped), ``evaluated`` (exits run), ``macs``
        (counted: dense parts by fvcore, masked stages, exits and head by masked execution's
        per-convolution count), ``active_pct`` (per backbone feature, ``stage_shapes()``' names: % of the image's
        pixels active when the stage yielding it ran, 0 when not run), ``answered_pct`` (per exit run and ``final``: % of the image's pixels it
        answered) and ``masked`` (``mode``, ``sparse_stages``: those the sparse path ran,
        ``exits.<e>`` and ``sem_seg_head`` among them, ``dense_ops``: what ran at every pixel;
        ``exits.<e>`` when exit ``e`` ran its dense forward, ``sem_seg_head`` when the head did)."""
        if x.shape[0] != 1:
            raise ValueError(f"run_pixel takes one image, got a batch of {x.shape[0]}.")
        hw = tuple(x.shape[-2:])
        thresholds = self.pixel_thresholds
        costs, dense = self.costs(hw), self.pixel_costs(hw)
        plans = self._masked_plans(thresholds)
        modules, outputs = self.backbone.stage_modules(), self.backbone.stage_outputs()
        pending = [n for n in self.exit_names if math.isfinite(thresholds[n])]
        need = set(self.sem_seg_head.in_features)
        size = exit_size(hw, next(iter(self.exits.values())).common_stride)
        inside = torch.zeros(1, *hw, dtype=torch.bool, device=x.device)
        inside[:, :image_size[0], :image_size[1]] = True  # the padding's pixels never keep an image running
        pixels = float(inside.sum())
        active = torch.ones_like(inside)
        answer: Optional[torch.Tensor] = None
        frozen, macs = False, 0.0
        active_pct = {n: 0.0 for names in outputs.values() for n in names}
        answered: Dict[str, float] = {}
        dense_ops: List[str] = []
        sparse_stages: List[str] = []
        features, evaluated = {}, []

        def info(answered_by):
            return {"answer": answered_by, "evaluated": tuple(evaluated), "macs": macs, "active_pct": active_pct,
                    "answered_pct": answered,
                    "masked": {"mode": self.pixel_mode, "sparse_stages": sparse_stages, "dense_ops": dense_ops}}

        feat = x
        for name, module in modules.items():
            share = 100.0 * float((active & inside).sum()) / pixels
            if not frozen:  # every pixel active: the stage's own forward, bit for bit forward_stages'
                feat = module(feat)
                macs += dense.stages[name]
            else:
                feat, report = plans[name](feat, PixelMask(active), self.pixel_mode, **self._sparse_rule())
                macs += float(report.macs[0])
                dense_ops += [op for op in report.dense_ops if op not in dense_ops]
                if report.sparse:
                    sparse_stages.append(name)
            yielded = self.backbone.stage_features(outputs[name], feat)
            features.update(yielded)
            active_pct.update(dict.fromkeys(outputs[name], share))
            for feature in outputs[name]:  # the exits on this stage's features, in its order
                if not (pending and pending[0] == feature):
                    continue
                pending.pop(0)
                exit_plan = self._masked_exit(feature) if frozen else None
                if exit_plan is None:  # nothing frozen yet (or no masked implementation): its own forward
                    logits = self.exits[feature](yielded[feature], size, with_classifier=False).seg_logits
                    macs += costs.exits[feature]
                    dense_ops.append(f"{EXITS}.{feature}")
                else:  # its logits at the active pixels (frozen ones 0: their answers are kept below)
                    logits, report = exit_plan(yielded[feature], PixelMask(active), self.pixel_mode,
                                               **self._sparse_rule())
                    macs += float(report.macs[0])
                    dense_ops += [op for op in report.dense_ops if op not in dense_ops]
                    if report.sparse:
                        sparse_stages.append(f"{EXITS}.{feature}")
                # the resize to the input runs (and is counted) at every pixel, as the head's resize
                up = F.interpolate(logits, size=hw, mode="bilinear", align_corners=False)
                macs += costs.answer[feature]
                evaluated.append(feature)
                top = F.softmax(up.float(), dim=1).amax(dim=1)
                newly = freeze_decision(top, active, thresholds[feature], self.pixel_cell, inside)
                answer = torch.where(newly[:, None], up, torch.zeros_like(up) if answer is None else answer)
                answered[feature] = 100.0 * float((newly & inside).sum()) / pixels
                active = active & ~newly  # a new tensor: a PixelMask made of the old one stays valid
                frozen = frozen or bool(newly.any())
                if not bool((active & inside).any()):
                    return answer, info(feature)
            if not pending and need.issubset(features):
                break
        head_plan = self._masked_head() if frozen else None
        if head_plan is None:
            head, _ = self.sem_seg_head(features, None, output_size=hw)
            head = crop_logits(head, hw)  # a "stride" head's map may overshoot the input
            macs += dense.head
            dense_ops.append(HEAD)
        else:  # its logits at the active pixels (frozen ones 0, replaced by their answers below), then the resize
            logits, report = head_plan(masked_head_input(self.sem_seg_head, features), PixelMask(active),
                                       self.pixel_mode, **self._sparse_rule())
            head = crop_logits(self.sem_seg_head.predict_logits(logits, hw), hw)
            macs += float(report.macs[0]) + dense.head_resize
            dense_ops += [op for op in report.dense_ops if op not in dense_ops]
            if report.sparse:
                sparse_stages.append(HEAD)
        answered[FINAL] = 100.0 * float((active & inside).sum()) / pixels
        return (head if answer is None else torch.where(active[:, None], head, answer)), info(FINAL)

    # ------------------------------------------------------------------ outputs
    def _postprocess(self, logits, batched_inputs, images):
        return postprocess_sem_seg(logits, batched_inputs, images)

    def _infer(self, batched_inputs) -> List[dict]:
        pixel = self._kind == PIXEL
        if pixel:  # counted once per input size and compiled once, outside the timed part
            hw = self.padded_size(batched_inputs[0]["image"].shape[-2:])
            self.costs(hw), self.pixel_costs(hw), self._masked_plans(self.pixel_thresholds)
            for name in self.active_exits()[1:]:  # those that may run after a freeze
                self._masked_exit(name)
        start = self._clock()
        images = self._images(batched_inputs)
        if pixel:
            logits, extra = self.run_pixel(images.tensor, images.image_sizes[0])
            answer, evaluated = extra.pop("answer"), extra.pop("evaluated")
        else:
            logits, answer, evaluated = self.run_stages(images.tensor, images.image_sizes, self.active_exits(),
                                                        self._decide(images.image_sizes))
            extra = {}
        preds = self._postprocess(logits, batched_inputs, images)
        spent = (self._clock() - start) / len(batched_inputs)
        hw = tuple(images.tensor.shape[-2:])
        outputs = [{"sem_seg": p, "sem_seg_exit": answer,
                    "anytime": {"evaluated": evaluated, "input_hw": hw, "time_s": spent, **extra}} for p in preds]
        if self.eval_final:
            start = self._clock()
            images = self._images(batched_inputs)
            logits, _, _ = self.run_stages(images.tensor, images.image_sizes, (), lambda n, l: False)
            finals = self._postprocess(logits, batched_inputs, images)
            spent = (self._clock() - start) / len(batched_inputs)
            for o, p in zip(outputs, finals):
                o["sem_seg_final"] = p
                o["anytime"]["final_time_s"] = spent
        return outputs

    def forward(self, batched_inputs):
        if self.training:
            raise RuntimeError("AnytimeSegmentor is a deployed, inference-only model: train the MultiExitSegmentor of "
                               "the same config and deploy it (tools/deploy_model.py --target anytime).")
        if self._kind in (CONFIDENCE, PIXEL):  # each image takes its own path
            return [self._infer([inp])[0] for inp in batched_inputs]
        return self._infer(batched_inputs)

    @torch.no_grad()
    def forward_all_exits(self, batched_inputs) -> List[dict]:
        """Every exit's and the final head's prediction and every exit's confidence, per image
        (one image at a time, as the confidence policy runs): what calibration reads.

        Returns per image ``{"final": KxHxW, "exits": {name: KxHxW}, "confidence": {name: float},
        "input_hw": padded size}``."""
        out = []
        for inp in batched_inputs:
            images = self._images([inp])
            logits, confs = {}, {}

            def record(name, exit_logits):
                confs[name] = float(self._confidences(exit_logits, images.image_sizes)[0])
                logits[name] = F.interpolate(exit_logits, size=tuple(images.tensor.shape[-2:]), mode="bilinear",
                                             align_corners=False)
                return False

            final, _, _ = self.run_stages(images.tensor, images.image_sizes, self.exit_names, record)
            post = lambda t: self._postprocess(t, [inp], images)[0]  # noqa: E731
            out.append({"final": post(final), "exits": {n: post(t) for n, t in logits.items()},
                        "confidence": confs, "input_hw": tuple(images.tensor.shape[-2:])})
        return out

    # ------------------------------------------------------------------ cost
    def padded_size(self, image_hw: Sequence[int]) -> Tuple[int, int]:
        """The size an image of ``image_hw`` is padded to before the backbone."""
        return tuple(ImageList.from_tensors([torch.zeros(1, *image_hw)], self.backbone.size_divisibility,
                                            padding_constraints=self.backbone.padding_constraints).tensor.shape[-2:])

    @torch.no_grad()
    def costs(self, input_hw: Sequence[int]) -> AnytimeCosts:
        """fvcore MACs of every path's parts for a padded input of ``input_hw`` (cached)."""
        hw = tuple(int(v) for v in input_hw)
        if hw in self._costs:
            return self._costs[hw]
        was_training = self.training
        self.eval()
        x = torch.zeros(1, 3, *hw, device=self.device)
        costs = AnytimeCosts(hw)
        costs.final = _fvcore_macs(_Path(self, (), FINAL), (x,))
        if self.exits:
            feats = dict(self.backbone.forward_stages(x))
            size = exit_size(hw, next(iter(self.exits.values())).common_stride)
            for name in self.exit_names:
                costs.prefix[name] = _fvcore_macs(_Prefix(self, name), (x,))
                costs.exits[name] = _fvcore_macs(_ExitOnly(self, name, size), (feats[name],))
                logits = self.exits[name](feats[name], size, with_classifier=False).seg_logits
                costs.answer[name] = _fvcore_macs(_Upsample(hw), (logits,))
        self.train(was_training)
        self._costs[hw] = costs
        return costs

    def path_macs(self, input_hw: Sequence[int], answer: str, evaluated: Sequence[str]) -> float:
        """fvcore MACs of one path (exits ``evaluated`` run, ``answer`` answered), traced whole."""
        x = torch.zeros(1, 3, *input_hw, device=self.device)
        with torch.no_grad():
            return _fvcore_macs(_Path(self, evaluated, answer), (x,))


def anytime_state_dict(model: AnytimeSegmentor, trained: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The anytime model's weights taken from a trained ``MultiExitSegmentor``'s state dict.

    Returns (state dict with exactly ``model``'s keys, the trained keys left out: the exits'
    classifiers, the final classifier, the objective's state). A key the anytime model needs
    but the trained weights lack is an error naming it."""
    own = model.state_dict()
    missing = [k for k in own if k not in trained]
    if missing:
        raise KeyError(f"The trained weights lack {len(missing)} tensors the anytime model needs, e.g. {missing[:5]}: "
                       "were they trained with this config's MODEL.EXITS (IN_FEATURES, CHANNELS)?")
    wrong = [k for k in own if tuple(trained[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise ValueError(f"Shape mismatch for {wrong[:5]}: the trained model is not this config's.")
    return {k: trained[k] for k in own}, sorted(k for k in trained if k not in own)


def anytime_from_trained(cfg, trained: nn.Module) -> AnytimeSegmentor:
    """The deployed anytime model of a trained ``MultiExitSegmentor`` (what ``tools/deploy_model.py
    --target anytime`` writes): ``cfg``'s model with ``MODEL.META_ARCHITECTURE
    "AnytimeSegmentor"``, every tensor taken from ``trained`` (strict), in ``eval()``."""
    from detectron2.modeling import build_model

    anytime_cfg = cfg.clone()
    anytime_cfg.defrost()
    anytime_cfg.MODEL.META_ARCHITECTURE = "AnytimeSegmentor"
    model = build_model(anytime_cfg)
    model.load_state_dict(anytime_state_dict(model, trained.state_dict())[0], strict=True)
    return model.eval()


def load_anytime_weights(model: AnytimeSegmentor, path: str, *, key: str = "MODEL.WEIGHTS",
                         weights_format: str = "auto") -> List[str]:
    """Load a trained ``MultiExitSegmentor`` checkpoint (or its anytime deployment) into ``model``.

    Through the shared checked loader (``segdistill.convert.load_checked_weights``:
    detectron2's checkpointer, foreign formats converted, untrusted files read safely) with
    ``min_matched=1.0``: every tensor of the anytime model must come from the file, with its
    shape, else :class:`~segdistill.convert.WeightsMismatchError` (a plain deployed
    checkpoint has no exits, so it is refused). Returns the file's keys left out
    (classifiers, objective state)."""
    report = load_checked_weights(model, path, key=key, min_matched=1.0, weights_format=weights_format,
                                  what="the anytime model (backbone, head and the exits' segmenters)")
    dropped = sorted(report.unexpected)
    if dropped:
        logger.info("Loaded %s into the anytime model; left out %d training-only tensors (%s%s).", path, len(dropped),
                    ", ".join(dropped[:4]), ", ..." if len(dropped) > 4 else "")
    return dropped
