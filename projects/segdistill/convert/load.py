"""Converting and loading foreign files into the project's backbones and segmentors.

Two scopes:

* a backbone body (``MODEL.TIMM.CHECKPOINT``): ImageNet weights in the formats
  :data:`BACKBONE_FORMATS` (timm, torchvision, OpenMMLab, the HRNet release, CIRKD);
* a whole segmentor (``MODEL.WEIGHTS``, ``MODEL.DISTILL.TEACHER.WEIGHTS``,
  ``tools/convert_checkpoint.py``): :data:`MODEL_FORMATS` (detectron2 = this project's own
  checkpoints, mmsegmentation model-zoo files, CIRKD's checkpoints).

``"auto"`` detects the format from the file's keys. Every tensor of the target must come
from the file and every tensor of the file must have a place in the target (or be dropped
on purpose by the format's map, e.g. an ImageNet classifier); otherwise the error names
the file, the expected architecture, the first unmatched keys and a hint.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from detectron2.modeling import SemanticSegmentor

from . import cirkd, openmmlab, timm as timm_format, torchvision as tv_format
from .contracts import ConvertibleBackbone, ConvertibleHead, SegmentorWrapper, backbone_family
from .core import IGNORED_SUFFIXES, CheckpointMismatchError, Conversion, apply_rules, check_fit
from .fetch import resolve_weights
from .io import load_checkpoint_file, unwrap_state_dict
from .source_options import check_source_options, file_meta

__all__ = [
    "BACKBONE_FORMATS", "MODEL_FORMATS", "detect_backbone_format", "detect_model_format", "convert_backbone_state",
    "load_backbone_weights", "convert_model_state", "load_model_weights", "load_foreign_weights", "segmentor_of",
    "convertible_parts", "describe_target",
]

logger = logging.getLogger(__name__)

BACKBONE_FORMATS = ("auto", "timm", "torchvision", "openmmlab", "hrnet", "cirkd")
MODEL_FORMATS = ("auto", "detectron2", "mmseg", "cirkd")


def _check_format(fmt: str, choices, key: str) -> str:
    if fmt not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {fmt!r}")
    return fmt


# ---------------------------------------------------------------------------------------------
# Backbones (ImageNet weights)
# ---------------------------------------------------------------------------------------------
def _strip_backbone_prefix(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """mmcls / mmpretrain files prefix the backbone with ``backbone.`` (and keep ``head.*``)."""
    if any(k.startswith("backbone.") for k in state):
        return {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in state.items()}
    return state


def detect_backbone_format(keys) -> str:
    """The format of an ImageNet state dict's keys (``backbone.`` prefix removed), or ValueError."""
    keys = list(keys)
    for name, detect in (("openmmlab", openmmlab.detect_backbone), ("cirkd", cirkd.detect_backbone),
                         ("torchvision", tv_format.detect), ("timm", timm_format.detect)):
        if detect(keys):
            return name
    raise CheckpointMismatchError(
        f"The backbone weights are in no known format (first keys: {keys[:6]}); name it with "
        f"MODEL.TIMM.CHECKPOINT_FORMAT, one of {list(BACKBONE_FORMATS[1:])}."
    )


def _backbone_rules(fmt: str, body: nn.Module, family: str, keys):
    if fmt in ("timm", "hrnet"):
        return timm_format.backbone_rules(family)
    if fmt == "torchvision":
        return tv_format.backbone_rules(family, body)
    if fmt == "openmmlab":
        return openmmlab.backbone_rules(family, body)
    if fmt == "cirkd":
        return cirkd.backbone_rules(family, body, deep_stem="conv2.weight" in set(keys))
    raise ValueError(f"Unknown backbone weights format {fmt!r}; choose from {list(BACKBONE_FORMATS)}.")


def _describe_body(body: nn.Module) -> str:
    family = backbone_family(body)
    stem = ""
    if family == "resnet":  # timm ResNets: conv1 is the 7x7 conv or the deep stem's Sequential
        conv1 = body.conv1
        if isinstance(conv1, nn.Sequential):
            widths = [m.out_channels for m in conv1 if isinstance(m, nn.Conv2d)]
            stem = f", deep stem {'-'.join(map(str, widths))}"
        else:
            stem = f", {conv1.kernel_size[0]}x{conv1.kernel_size[1]} stem"
    n = sum(p.numel() for p in body.parameters())
    return f"a timm {family} body ({type(body).__name__}{stem}, {n / 1e6:.2f}M parameters)"


def _describe_backbone_keys(keys) -> str:
    """The family a backbone state dict's names suggest (for the error message)."""
    keys = set(keys)
    if any(k.startswith("transition1.") for k in keys):
        return "an HRNet"
    if "conv_stem.weight" in keys or "features.18.0.weight" in keys or any(k.startswith("layer1.0.conv.0.") for k in keys):
        return "a MobileNetV2"
    if "layer1.0.conv1.weight" in keys:
        stem = "deep stem" if {"stem.0.weight", "conv1.0.weight", "conv2.weight"} & keys else "7x7 stem"
        return f"a ResNet ({stem}, {'Bottleneck' if 'layer1.0.conv3.weight' in keys else 'BasicBlock'} blocks)"
    return "an unknown network"


def convert_backbone_state(state: Dict[str, torch.Tensor], body: nn.Module, fmt: str = "auto", *,
                           source: str = "<state dict>", key: str = "MODEL.TIMM.CHECKPOINT") -> Conversion:
    """Rename ``state`` to ``body``'s names and check that it fits (else CheckpointMismatchError)."""
    _check_format(fmt, BACKBONE_FORMATS, f"{key}_FORMAT" if key.endswith("CHECKPOINT") else "format")
    state = _strip_backbone_prefix(state)
    if fmt == "auto":
        fmt = detect_backbone_format(state)
    family = backbone_family(body)
    conv = apply_rules(state, _backbone_rules(fmt, body, family, state), source=source, source_format=fmt)
    hint = (f"is {key} a {family} ImageNet checkpoint in the {fmt} format? For ResNets the stem must match: "
            "MODEL.TIMM.STEM_TYPE deep with STEM_WIDTH 32 for OpenMMLab's ResNetV1c, 64 for CIRKD's; '' for "
            "torchvision/timm's 7x7 stem.")
    check_fit(conv, body.state_dict(), expected=f"{_describe_body(body)} ({key})",
              looks_like=_describe_backbone_keys(state), hint=hint)
    return conv


def load_backbone_weights(body: nn.Module, path: str, fmt: str = "auto", *, key: str = "MODEL.TIMM.CHECKPOINT",
                          unsafe_unpickle: bool = False) -> Conversion:
    """Convert the ImageNet weights in ``path`` (a file, or a URL fetched into the cache) and load
    them into ``body`` (all or nothing)."""
    path = resolve_weights(path, key, missing_hint=(
        "docs/reproduce.md lists the official files and their URLs. (An evaluation with MODEL.WEIGHTS / "
        "train.init_checkpoint skips this file; training loads it, then MODEL.WEIGHTS over it.)"))
    obj = load_checkpoint_file(path, key=key, unsafe_unpickle=unsafe_unpickle)
    state, where = unwrap_state_dict(obj)
    conv = convert_backbone_state(state, body, fmt, source=path, key=key)
    _load_all(body, conv.state)
    logger.info("%s\n(tensors found at the %s of the file)", conv.summary(), where)
    return conv


# ---------------------------------------------------------------------------------------------
# Whole segmentors
# ---------------------------------------------------------------------------------------------
def segmentor_of(model: nn.Module) -> Tuple[nn.Module, str]:
    """(the segmentor a whole-model checkpoint is for, its prefix in ``model``'s state dict):
    the model itself, or the segmentor a :class:`~.contracts.SegmentorWrapper` (a Distiller) wraps."""
    if isinstance(model, SegmentorWrapper):
        return model.wrapped_segmentor()
    if not isinstance(model, SemanticSegmentor):
        raise TypeError(f"Foreign checkpoints load into SemanticSegmentor-based models, not {type(model).__name__}.")
    return model, ""


def convertible_parts(segmentor: nn.Module, fmt: str = "foreign", key: str = "MODEL.WEIGHTS"):
    """(backbone, head) of ``segmentor``, checked against the contracts the key maps read
    (:class:`~.contracts.ConvertibleBackbone`, :class:`~.contracts.ConvertibleHead`)."""
    backbone, head = segmentor.backbone, segmentor.sem_seg_head
    if not isinstance(backbone, ConvertibleBackbone) or not isinstance(head, ConvertibleHead):
        raise TypeError(
            f"{fmt} checkpoints load into the project's timm backbones and heads, not "
            f"{type(backbone).__name__} + {type(head).__name__} ({key})."
        )
    return backbone, head


def describe_target(segmentor: nn.Module) -> str:
    backbone, head = convertible_parts(segmentor)
    layout = f", layout {head.layout}" if head.layout else ""
    aux = f", auxiliary FCN head on {head.aux_head.in_feature}" if head.aux_head is not None else ""
    return f"{type(head).__name__}{layout}{aux} on {_describe_body(backbone.body)}"


def detect_model_format(keys) -> str:
    keys = list(keys)
    if openmmlab.detect_model(keys):
        return "mmseg"
    if cirkd.detect_model(keys):
        return "cirkd"
    return "detectron2"


def _has_own_names(state: Dict[str, torch.Tensor], model: nn.Module) -> bool:
    """Whether most tensors of ``state`` (BatchNorm counters aside) already have the names of
    ``model`` or of the segmentor it wraps: a file in this project's own format."""
    names = set(model.state_dict())
    if isinstance(model, SegmentorWrapper):  # a Distiller: a file of its student
        names |= set(model.wrapped_segmentor()[0].state_dict())
    keys = [k for k in state if not k.endswith(IGNORED_SUFFIXES)]
    return bool(keys) and sum(k in names for k in keys) >= 0.5 * len(keys)


def convert_model_state(state: Dict[str, torch.Tensor], model: nn.Module, fmt: str = "auto", *,
                        source: str = "<state dict>", key: str = "MODEL.WEIGHTS",
                        meta: Optional[dict] = None) -> Optional[Conversion]:
    """Rename a whole-model ``state`` (mmseg / CIRKD) to ``model``'s names, checked; None for
    the project's own (detectron2) format, which needs no conversion. The shapes must fit,
    and the model's shape-free options must be those the file's source computed with
    (:func:`.source_options.check_source_options`; ``meta``: the file's ``meta`` dict, which
    may hold its config text)."""
    _check_format(fmt, MODEL_FORMATS, "MODEL.WEIGHTS_FORMAT")
    detected = detect_model_format(state)
    if fmt == "auto":
        fmt = detected
    elif fmt != "detectron2" and detected == "detectron2" and _has_own_names(state, model):
        # a file converted once (tools/convert_checkpoint.py) for a config that names the
        # source's format: the config must keep loading it, and the checked loader checks it
        logger.info("%s is already in this project's format (e.g. written by tools/convert_checkpoint.py): it loads "
                    "as it is; MODEL.WEIGHTS_FORMAT %r applies to the original %s file only.", source, fmt, fmt)
        return None
    if fmt == "detectron2":
        return None
    segmentor, _ = segmentor_of(model)
    backbone, head = convertible_parts(segmentor, fmt, key)
    family = backbone.family
    if fmt == "mmseg":
        rules = openmmlab.model_rules(backbone.body, family, head)
        looks_like, hint = openmmlab.describe_model(state), openmmlab.suggest_config(state)
    else:
        rules = cirkd.model_rules(backbone.body, family, head, state)
        looks_like, hint = cirkd.describe_model(state), cirkd.suggest_config(state)
    conv = apply_rules(state, rules, source=source, source_format=fmt)
    target = {k: v for k, v in segmentor.state_dict().items()}
    check_fit(conv, target, expected=f"{describe_target(segmentor)} ({key})", looks_like=looks_like, hint=hint)
    check_source_options(fmt, backbone, head, source=source, meta=meta, key=key)
    return conv


def _load_all(module: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Load a checked state; only BatchNorm counters may be absent."""
    incompatible = module.load_state_dict(state, strict=False)
    missing = [k for k in incompatible.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or incompatible.unexpected_keys:  # check_fit ran first: a bug if reached
        raise RuntimeError(f"Partial load after a successful check: missing {missing[:5]}, "
                           f"unexpected {incompatible.unexpected_keys[:5]}")


def load_model_weights(model: nn.Module, path: str, fmt: str = "auto", *, key: str = "MODEL.WEIGHTS",
                       unsafe_unpickle: bool = False) -> Optional[Conversion]:
    """Convert a foreign whole-model file and load it into ``model`` (its segmentor: a
    Distiller's student), all or nothing. Returns None, loading nothing, for the project's
    own format (the caller loads those with detectron2's checkpointer). ``path``: a file, or a
    URL fetched into the cache."""
    path = resolve_weights(path, key)
    obj = load_checkpoint_file(path, key=key, unsafe_unpickle=unsafe_unpickle)
    state, where = unwrap_state_dict(obj)
    conv = convert_model_state(state, model, fmt, source=path, key=key, meta=file_meta(obj))
    if conv is None:
        return None
    segmentor, _ = segmentor_of(model)
    _load_all(segmentor, conv.state)
    logger.info("%s\n(tensors found at the %s of the file)", conv.summary(), where)
    return conv


def load_foreign_weights(model: nn.Module, path: str, fmt: str = "auto", *,
                         key: str = "MODEL.DISTILL.TEACHER.WEIGHTS") -> bool:
    """For callers with their own loader for native files (the Distiller's teacher):
    True when ``path`` was a foreign file, now converted and loaded into ``model``; False
    (nothing loaded) when it is a detectron2 checkpoint of this project."""
    return load_model_weights(model, path, fmt, key=key) is not None
