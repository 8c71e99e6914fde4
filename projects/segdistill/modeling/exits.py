"""Exits of a multi-exit segmentor, the named outputs every exit objective reads, and the
registry of those objectives (deep supervision, Self-Regulation, ...).

An exit (Self-Regulation, section 4.4) on a stage's features ``x``::

    3x3 conv -> `channels` (+norm, ReLU) -> bilinear resize to 1/common_stride of the input
    -> 3x3 conv (+norm)                         = the exit's feature map (SR-F reads it)
    -> ReLU -> segmenter: 1x1 conv to K logits  (pixel-level, MEA seg / deep supervision)
            -> classifier: global average pool + linear to K logits (image-level, MEA cls / SR-L)

``K`` is per exit (HS3 gives each exit its own clustered class set). Exits are training-only:
the deployed model (``MultiExitSegmentor.deploy_state_dict``) contains none of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import Conv2d, ShapeSpec, get_norm

__all__ = [
    "ExitHead", "MultiLabelClassifier", "ExitOutput", "MultiExitOutputs", "build_exit_heads",
    "check_exit_features", "exit_size", "ExitObjective", "EXIT_OBJECTIVES", "register_exit_objective",
    "HEAD_FEATURE_PREFIX",
]

# Exit names of the head's exposed features: "head_features" (pre-classifier features of every
# SegHeadMixin head) and any name a head lists in ``exposed_features()`` (e.g. decoder levels).
HEAD_FEATURE_PREFIX = "head_"


def exit_size(image_hw: Sequence[int], common_stride: int) -> Tuple[int, int]:
    """Spatial size of every exit's maps for a (padded) input of ``image_hw``."""
    return (math.ceil(image_hw[0] / common_stride), math.ceil(image_hw[1] / common_stride))


class MultiLabelClassifier(nn.Module):
    """Image-level multi-label classifier: global average pooling + linear to class logits."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


@dataclass
class ExitOutput:
    """What one exit (or the final head) produced in a training step.

    ``features``: N x C x h x w (an exit: at the common stride; the final head: its own stride);
    ``seg_logits``: N x K x h x w at the same stride; ``cls_logits``: N x K, or None when the
    exit has no classifier; ``stride``: the maps' stride w.r.t. the input.
    """

    features: torch.Tensor
    seg_logits: torch.Tensor
    cls_logits: Optional[torch.Tensor]
    stride: int


@dataclass
class MultiExitOutputs:
    """The named intermediate outputs of one training step, read by every exit objective.

    ``exits`` is ordered shallowest first; ``final`` is the deployed head (its ``cls_logits``
    come from the final classifier when one is built); ``head`` is the head's own
    ``forward_outputs`` dict; ``backbone`` the backbone's features; ``image_size`` the padded
    input size (the targets' size).
    """

    exits: Dict[str, ExitOutput]
    final: ExitOutput
    head: Dict[str, torch.Tensor] = field(default_factory=dict)
    backbone: Dict[str, torch.Tensor] = field(default_factory=dict)
    image_size: Tuple[int, int] = (0, 0)

    @property
    def names(self) -> List[str]:
        return list(self.exits)


class ExitHead(nn.Module):
    """One exit: reduce conv, resize to the common stride, feature conv, segmenter (+ classifier)."""

    def __init__(
        self,
        in_channels: int,
        in_stride: int,
        *,
        num_classes: int,
        channels: int = 256,
        common_stride: int = 8,
        norm: str = "BN",
        with_classifier: bool = True,
    ):
        super().__init__()
        self.in_stride = in_stride
        self.common_stride = common_stride
        self.num_classes = num_classes
        self.channels = channels
        self.reduce = Conv2d(in_channels, channels, 3, padding=1, bias=not norm,
                             norm=get_norm(norm, channels), activation=F.relu)
        self.feature = Conv2d(channels, channels, 3, padding=1, bias=not norm, norm=get_norm(norm, channels))
        self.segmenter = Conv2d(channels, num_classes, 1)
        self.classifier = MultiLabelClassifier(channels, num_classes) if with_classifier else None

    def forward(self, x: torch.Tensor, size: Tuple[int, int], with_classifier: bool = True) -> ExitOutput:
        x = self.reduce(x)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        feats = self.feature(x)
        act = F.relu(feats)
        cls = self.classifier(act) if (with_classifier and self.classifier is not None) else None
        return ExitOutput(feats, self.segmenter(act), cls, self.common_stride)


def check_exit_features(
    in_features: Sequence[str],
    shapes: Dict[str, ShapeSpec],
    common_stride: int,
    max_downsample: int = 2,
) -> None:
    """Raise a clear ValueError for unknown exit names or stages too fine for the common stride.

    ``shapes`` holds every place an exit may attach (backbone stages and head features).
    """
    if not in_features:
        raise ValueError("MODEL.EXITS.IN_FEATURES is empty; name at least one stage, e.g. ['res3', 'res4'].")
    if common_stride < 1:
        raise ValueError(f"MODEL.EXITS.COMMON_STRIDE must be a positive integer, got {common_stride}.")
    dup = sorted({n for n in in_features if list(in_features).count(n) > 1})
    if dup:
        raise ValueError(f"MODEL.EXITS.IN_FEATURES lists {dup} more than once.")
    bad = [n for n in in_features if n not in shapes]
    if bad:
        raise ValueError(
            f"Unknown MODEL.EXITS.IN_FEATURES {bad}; valid choices for this backbone and head: {list(shapes)}."
        )
    min_stride = common_stride / max(max_downsample, 1)
    fine = [n for n in in_features if shapes[n].stride < min_stride]
    if fine:
        ok = [n for n, s in shapes.items() if s.stride >= min_stride]
        raise ValueError(
            f"MODEL.EXITS.IN_FEATURES {fine} (stride {[shapes[n].stride for n in fine]}) are finer than "
            f"MODEL.EXITS.COMMON_STRIDE {common_stride} allows: bilinear resizing down by more than "
            f"MODEL.EXITS.MAX_DOWNSAMPLE={max_downsample}x skips pixels. Valid choices: {ok} "
            "(or lower COMMON_STRIDE / raise MAX_DOWNSAMPLE)."
        )


def build_exit_heads(
    input_shape: Dict[str, ShapeSpec],
    in_features: Sequence[str],
    num_classes,
    *,
    channels: int = 256,
    common_stride: int = 8,
    norm: str = "BN",
    with_classifier: bool = True,
    max_downsample: int = 2,
) -> nn.ModuleDict:
    """Exits on ``in_features`` (shallowest first), checked against ``input_shape``.

    ``num_classes`` is one int for all exits or a list with one entry per exit. Also usable
    from lazy configs.
    """
    in_features = list(in_features)
    check_exit_features(in_features, input_shape, common_stride, max_downsample)
    if isinstance(num_classes, int):
        num_classes = [num_classes] * len(in_features)
    num_classes = list(num_classes)
    if len(num_classes) != len(in_features):
        raise ValueError(
            f"MODEL.EXITS.NUM_CLASSES has {len(num_classes)} entries for {len(in_features)} exits "
            f"{in_features}; give one per exit (or none to use MODEL.SEM_SEG_HEAD.NUM_CLASSES)."
        )
    return nn.ModuleDict({
        name: ExitHead(input_shape[name].channels, input_shape[name].stride, num_classes=int(k),
                       channels=channels, common_stride=common_stride, norm=norm,
                       with_classifier=with_classifier)
        for name, k in zip(in_features, num_classes)
    })


class ExitObjective(nn.Module):
    """Base of the exit objectives: ``forward(outputs, targets) -> {loss name: tensor}``.

    ``targets`` are the padded N x H x W labels of the dataset's classes; an objective reads
    each exit's own targets through :meth:`exit_targets`, which maps them through
    ``label_luts[exit_name]`` (a LongTensor from dataset class to the exit's class, ignore
    kept) when the mode gives one (HS3), else returns them unchanged. Subclasses set
    ``needs_classifiers`` (an attribute or property) when they read ``cls_logits``, so the
    model builds the classifiers only then (no unused parameters under DDP).
    """

    needs_classifiers = False

    def __init__(self, ignore_value: int = 255, label_luts: Optional[Dict[str, torch.Tensor]] = None):
        super().__init__()
        self.ignore_value = ignore_value
        self.label_luts: Dict[str, torch.Tensor] = dict(label_luts or {})
        self.iteration: Optional[int] = None
        self.max_iter: Optional[int] = None

    def exit_targets(self, exit_name: str, targets: torch.Tensor) -> torch.Tensor:
        lut = self.label_luts.get(exit_name)
        if lut is None:
            return targets
        lut = lut.to(targets.device)
        valid = targets != self.ignore_value
        mapped = lut[targets.clamp(0, lut.numel() - 1)]
        return torch.where(valid, mapped, targets)

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
        if name in EXIT_OBJECTIVES and EXIT_OBJECTIVES[name] is not cls:
            raise ValueError(f"Exit objective {name!r} is already registered ({EXIT_OBJECTIVES[name].__name__}).")
        EXIT_OBJECTIVES[name] = cls
        return cls

    return deco
