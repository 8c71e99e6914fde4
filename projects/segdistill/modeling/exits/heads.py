"""Exits of a multi-exit segmentor and the named outputs every exit objective reads.

An exit (Self-Regulation, section 4.4) on a stage's features ``x``::

    3x3 conv -> `channels` (+norm, ReLU) -> bilinear resize to 1/common_stride of the input
    -> 3x3 conv (+norm)                         = the exit's feature map (SR-F reads it)
    -> ReLU -> segmenter: 1x1 conv to K logits  (pixel-level, MEA seg / deep supervision)
            -> classifier: global average pool + linear to K logits (image-level, MEA cls / SR-L)

This is the ``sr`` exit head (``MODEL.EXITS.HEAD``); ``rh`` (``rh.py``) is ADP-C's pooled
encoder-decoder. Every exit head implements :class:`ExitHeadBase` and registers its name with
:func:`register_exit_head`, so the segmentors, objectives, HS3-Fuse, anytime inference and the
cost counts work with either.

``K`` is per exit (HS3 gives each exit its own clustered class set). Exits are training-only
unless an :class:`ExitFusion` feeds them into the head (HS3-Fuse); the deployed model
(``MultiExitSegmentor.deploy_state_dict``) contains none of the others.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import Conv2d, ShapeSpec

from ..heads.base import conv_norm

__all__ = [
    "ExitHeadBase", "EXIT_HEADS", "register_exit_head", "exit_head_class", "exit_head_kwargs", "SR_HEAD",
    "ExitHead", "MultiLabelClassifier", "ExitOutput", "MultiExitOutputs", "ExitFusion", "build_exit_heads",
    "check_exit_features", "exit_size", "HEAD_FEATURE_PREFIX",
]

# Exit name of the head's pre-classifier features (every SegHeadMixin head exposes them):
# an exit on "head_features" reads them.
HEAD_FEATURE_PREFIX = "head_"


def exit_size(image_hw: Sequence[int], common_stride: int) -> Tuple[int, int]:
    """Spatial size of every exit's maps for a (padded) input of ``image_hw``: the ceiling of
    ``image_hw / common_stride``, in integer arithmetic, so that a trace (``torch.jit.trace``,
    where the sizes are tensors) records it as operations, not as the traced size's constant."""
    return ((image_hw[0] + common_stride - 1) // common_stride, (image_hw[1] + common_stride - 1) // common_stride)


class MultiLabelClassifier(nn.Module):
    """Image-level multi-label classifier: global average pooling + linear to class logits."""

    def __init__(self, *, in_channels: int, num_classes: int):
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


class ExitHeadBase(nn.Module):
    """The contract of an exit head (one per ``MODEL.EXITS.HEAD`` value), what the segmentors,
    the objectives, an :class:`ExitFusion` and anytime inference rely on:

    * attributes ``num_classes`` (K), ``channels`` (the channels of ``ExitOutput.features``),
      ``common_stride`` and ``classifier`` (a :class:`MultiLabelClassifier` or None);
    * ``forward(x, size, with_classifier=True) -> ExitOutput``: ``features`` and
      ``seg_logits`` at ``size`` (1/``common_stride`` of the input), the segmenter reading
      ``relu(features)``; ``cls_logits`` from the classifier (None without one or when
      ``with_classifier`` is False);
    * the constructor takes the keyword arguments ``in_channels, num_classes, channels,
      common_stride, norm, with_classifier`` and the options :meth:`per_exit_options` gives;
    * :meth:`config_kwargs`: the config keys the head reads (its ``channels`` and options).

    A subclass registers its name with :func:`register_exit_head` (``name`` is set then).
    """

    name: str = ""  # the registered MODEL.EXITS.HEAD value

    @classmethod
    def config_kwargs(cls, cfg) -> Dict[str, Any]:
        """``channels`` and ``head_options`` of :func:`build_exit_heads` from ``cfg``."""
        raise NotImplementedError(f"Exit head {cls.__name__} must define the classmethod config_kwargs(cfg).")

    @classmethod
    def per_exit_options(cls, in_features: Sequence[str], options: Dict[str, Any]) -> List[Dict[str, Any]]:
        """The constructor's extra keyword arguments for every exit of ``in_features`` (shallowest
        first), from ``options`` (:func:`build_exit_heads`' ``head_options``); none by default."""
        if options:
            raise ValueError(f"MODEL.EXITS.HEAD {cls.name!r} takes no options, got head_options {dict(options)}.")
        return [{} for _ in in_features]

    @property
    def inference_parts(self) -> Tuple[str, ...]:
        """The submodules inference needs: all but the image-level classifier."""
        return tuple(n for n, _ in self.named_children() if n != "classifier")

    def forward(self, x: torch.Tensor, size: Tuple[int, int], with_classifier: bool = True) -> ExitOutput:
        raise NotImplementedError


# MODEL.EXITS.HEAD -> exit-head class (ExitHeadBase); a class registers with @register_exit_head(name).
EXIT_HEADS: Dict[str, type] = {}


def register_exit_head(name: str):
    """Class decorator: make ``name`` a valid ``MODEL.EXITS.HEAD`` for an :class:`ExitHeadBase` subclass."""

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, ExitHeadBase)):
            raise TypeError(f"Exit head {name!r} must subclass ExitHeadBase, got {cls!r}.")
        if name in EXIT_HEADS and EXIT_HEADS[name] is not cls:
            raise ValueError(f"Exit head {name!r} is already registered ({EXIT_HEADS[name].__name__}).")
        EXIT_HEADS[name] = cls
        cls.name = name
        return cls

    return deco


def exit_head_class(name: str) -> type:
    """The exit-head class of ``MODEL.EXITS.HEAD`` ``name``, or a ValueError naming the choices."""
    if name not in EXIT_HEADS:
        raise ValueError(f"Unknown MODEL.EXITS.HEAD {name!r}; choose from {sorted(EXIT_HEADS)} "
                         "(lazy configs: build_exit_heads(head=...)).")
    return EXIT_HEADS[name]


def exit_head_kwargs(cfg) -> Dict[str, Any]:
    """``head``, ``channels`` and ``head_options`` of :func:`build_exit_heads` for ``cfg``'s
    ``MODEL.EXITS.HEAD`` (each head reads its own keys)."""
    name = cfg.MODEL.EXITS.HEAD
    kwargs = {"head": name, "head_options": {}}
    kwargs.update(exit_head_class(name).config_kwargs(cfg))
    return kwargs


SR_HEAD = "sr"


@register_exit_head(SR_HEAD)
class ExitHead(ExitHeadBase):
    """One exit (``MODEL.EXITS.HEAD sr``, Self-Regulation's): reduce conv, resize to the common
    stride, feature conv, segmenter (+ classifier)."""

    def __init__(self, *, in_channels: int, num_classes: int, channels: int, common_stride: int, norm: str,
                 with_classifier: bool):
        super().__init__()
        self.common_stride = common_stride
        self.num_classes = num_classes
        self.channels = channels
        self.reduce = conv_norm(in_channels, channels, 3, norm, activation=F.relu)
        self.feature = conv_norm(channels, channels, 3, norm)
        self.segmenter = Conv2d(channels, num_classes, 1)
        self.classifier = (MultiLabelClassifier(in_channels=channels, num_classes=num_classes)
                           if with_classifier else None)

    @classmethod
    def config_kwargs(cls, cfg) -> Dict[str, Any]:
        return {"channels": cfg.MODEL.EXITS.CHANNELS}

    def forward(self, x: torch.Tensor, size: Tuple[int, int], with_classifier: bool = True) -> ExitOutput:
        x = self.reduce(x)
        # a trace records one branch of a Python ``if``: it always resizes (a resize to the same
        # size is the identity: bilinear, align_corners=False), eager resizes only when needed
        if torch.jit.is_tracing() or tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        feats = self.feature(x)
        act = F.relu(feats)
        cls = self.classifier(act) if (with_classifier and self.classifier is not None) else None
        return ExitOutput(feats, self.segmenter(act), cls, self.common_stride)


class ExitFusion(nn.Module):
    """Exits that feed the final head (HS3-Fuse): the contract ``MultiExitSegmentor`` relies on.

    An objective whose mode fuses its exits into the head builds one in
    :meth:`ExitObjective.build_fusion`. Then the exits run before the head, also in
    ``eval()``, and are part of the deployed model. A subclass sets:

    * ``name``: the attribute (and state-dict prefix) the segmentor keeps it under;
    * ``exit_names``: the exits it reads (every exit, backbone stages only);
    * ``exit_parts``: the exits' submodules it needs at inference (kept by deploy); None (the
      default): every part but the classifier (:attr:`ExitHeadBase.inference_parts`), whatever
      the exit head;
    * :meth:`head_input_shapes`: the backbone's output shapes as the head sees them;
    * ``forward(features, exits) -> features``: the head's input from the backbone's
      features and the exits' :class:`ExitOutput`.
    """

    name = "exit_fusion"
    exit_parts: Optional[Tuple[str, ...]] = None

    @property
    def exit_names(self) -> List[str]:
        raise NotImplementedError

    def head_input_shapes(self, shapes: Dict[str, ShapeSpec]) -> Dict[str, ShapeSpec]:
        raise NotImplementedError

    def forward(self, features: Dict[str, torch.Tensor], exits: Dict[str, ExitOutput]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


def check_exit_features(
    in_features: Sequence[str],
    shapes: Dict[str, ShapeSpec],
    common_stride: int,
    max_downsample: int,
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
    *,
    input_shape: Dict[str, ShapeSpec],
    in_features: Sequence[str],
    num_classes: Union[int, Sequence[int]],
    channels: int,
    common_stride: int,
    norm: str,
    with_classifier: bool,
    max_downsample: int,
    head: str = SR_HEAD,
    head_options: Optional[Dict[str, Any]] = None,
) -> nn.ModuleDict:
    """Exits on ``in_features`` (shallowest first), checked against ``input_shape``.

    ``num_classes`` is one int for all exits or a list with one entry per exit. ``head``: the
    exit head (``MODEL.EXITS.HEAD``: ``sr``, :class:`ExitHead`; ``rh``, ADP-C's pooled
    encoder-decoder) and ``head_options`` its options (``rh``: ``{"levels": [...]}``);
    ``channels`` is the head's width. Also usable from lazy configs.
    """
    cls = exit_head_class(head)
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
    options = cls.per_exit_options(in_features, dict(head_options or {}))
    return nn.ModuleDict({
        name: cls(in_channels=input_shape[name].channels, num_classes=int(k), channels=channels,
                  common_stride=common_stride, norm=norm, with_classifier=with_classifier, **opts)
        for name, k, opts in zip(in_features, num_classes, options)
    })
