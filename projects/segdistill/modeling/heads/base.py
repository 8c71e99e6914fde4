"""The contract every segdistill head follows, on top of detectron2's head contract.

detectron2's ``SemanticSegmentor`` calls ``head(features, targets)`` and gets
``(None, losses)`` in training and ``(logits at input scale, {})`` in inference. Here the
call takes the size of the logits at inference too: ``head(features, targets, output_size=(H, W))``
with ``H x W`` the size of the (padded) tensor that entered the backbone; the project's
meta-architectures (``SemanticSegmentorAnySize``, ``MultiExitSegmentor``, ``AnytimeSegmentor``)
pass it. What the head makes of it is its ``output_resize`` rule
(``MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE``, :data:`OUTPUT_RESIZE_RULES`):

* ``"stride"`` (the default): the logits are upsampled by ``common_stride`` (bilinear, the
  head's ``align_corners``) and the meta-architecture's postprocessing crops the excess, as
  detectron2's heads do. Feature ``i`` keeps covering the input rows the network computed it
  over (``stride * i`` onwards), also where the input is not a multiple of the stride.
* ``"input"``: the logits are resized to ``H x W``, as mmsegmentation's ``EncoderDecoder``
  and CIRKD's evaluation resize theirs: a file from those code bases gives their output at
  every input size only under this rule (the file's source pins it:
  ``segdistill.convert.source_options``). Without ``output_size`` (detectron2's own
  ``SemanticSegmentor``) it falls back to the stride rule with a warning (once) naming the
  meta-architecture that passes the size.

The two rules agree bit for bit where the (padded) input is a multiple of the stride.
Training losses resize by the stride, to the (padded) targets' size, under either rule.
The multi-exit segmentor and the distiller also need what the head computes *before* its
classifier, and the classifier itself (FAKD's closed-form bound reads its weight and bias).
So every head here exposes:

* ``forward_features(features) -> Tensor``: the pre-classifier features, N x C x h x w at
  ``common_stride``;
* ``predictor``: the 1x1 ``Conv2d`` classifier; ``predictor(forward_features(f))`` is
  exactly the head's logits;
* ``forward_outputs(features) -> dict``: ``{"features", "logits"}`` plus ``"aux_logits"``
  in training when an auxiliary FCN head is configured;
* ``losses(outputs, targets) -> dict``: ``loss_sem_seg`` (and ``loss_aux``);
  ``input_size_loss(logits, targets)``: ``loss_sem_seg`` of logits already at the targets' size;
* ``predict_logits(logits, output_size)``: the logits as inference returns them (by the
  ``output_resize`` rule); ``forward(features, targets, output_size=...)``
  is ``forward_outputs`` then ``losses`` (training) or ``predict_logits`` (inference).

Other components call ``head.forward_outputs(features)`` directly, after checking the head
once, when they are built, with :func:`check_seg_head` (an ``isinstance`` test against
:class:`SegHeadMixin`, with an error naming the heads that follow the contract).
"""
from __future__ import annotations

import inspect
import logging
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

import fvcore.nn.weight_init as weight_init
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.projects.deeplab.loss import DeepLabCE

from ...convert import ConvertibleHead
from ...data import config_class_weights
from ..backbones.norm import resolve_norm

__all__ = ["SegHeadMixin", "AuxFCNHead", "build_aux_head", "check_seg_head", "seg_head_names", "upsample_logits",
           "resize_logits", "crop_logits",
           "LOSS_TYPES", "OUTPUT_RESIZE_RULES", "CONTRACT_ARGS", "check_loss_type", "safe_cross_entropy", "sem_seg_loss", "build_classifier", "common_head_config",
           "single_in_feature", "multi_in_features", "conv_norm", "conv_norm_relu", "dropout2d", "HRNET_BRANCHES"]

logger = logging.getLogger(__name__)

LOSS_TYPES = ("cross_entropy", "hard_pixel_mining")
# How inference brings the logits to the input (MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE; module docstring).
OUTPUT_RESIZE_RULES = ("stride", "input")
# The keyword arguments of the head contract every head passes to SegHeadMixin._init_contract.
CONTRACT_ARGS = ("ignore_value", "loss_weight", "loss_type", "align_corners", "aux_head", "class_weights",
                 "output_resize")
HRNET_BRANCHES = ["res2", "res3", "res4", "res5"]


def upsample_logits(logits: torch.Tensor, stride: int, align_corners: bool = False) -> torch.Tensor:
    """Bilinear upsampling by the head's stride, as detectron2's heads do (``align_corners``:
    the head's ``MODEL.SEM_SEG_HEAD.ALIGN_CORNERS``; CIRKD's models align corners)."""
    if stride == 1:
        return logits
    return F.interpolate(logits.float(), scale_factor=stride, mode="bilinear", align_corners=align_corners)


def crop_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Logits from :meth:`SegHeadMixin.predict_logits` at the (padded) input size ``size``: under
    ``output_resize "stride"`` they are the head's map upsampled by its stride, which overshoots
    an input that is not a multiple of the stride (e.g. 120 rows at stride 16: 128); the rows and
    columns past the input, which postprocessing drops with the padding, are dropped here, so the
    logits line up pixel for pixel with maps of the input's size (per-pixel answers)."""
    return logits[..., :size[0], :size[1]]


def resize_logits(logits: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize of N x K x h x w logits to ``size`` (H, W), as mmsegmentation's heads
    resize theirs to the input; the logits as they are when they already have that size.
    When ``size`` is ``stride`` times the logits' size this is :func:`upsample_logits`, bit for bit."""
    if torch.jit.is_tracing():
        # an export traces the input's size as a value of the graph (int() or a Python comparison
        # would freeze the traced size into it); resizing to the same size is exact
        return F.interpolate(logits.float(), size=(size[0], size[1]), mode="bilinear", align_corners=align_corners)
    size = (int(size[0]), int(size[1]))
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=align_corners)


def safe_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_value: int,
                       weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pixel cross-entropy of logits at the targets' size, averaged over the labelled pixels.

    A batch whose pixels are all ignored (COCO-Stuff keeps such images; a crop can miss every
    labelled pixel) gives 0 with a graph, where ``reduction="mean"`` would give NaN and poison
    the step. Every pixel loss of the project (heads, auxiliary heads, exits) uses this one.
    With class weights ``weight`` (``MODEL.SEM_SEG_HEAD.CLASS_WEIGHTS``) it is
    ``sum_i w[y_i] * CE_i / sum_i w[y_i]`` over the labelled pixels, as PyTorch's weighted mean.
    """
    total = F.cross_entropy(logits, targets, weight=weight, ignore_index=ignore_value, reduction="sum")
    labelled = targets != ignore_value
    if weight is None:
        return total / labelled.sum().clamp(min=1)
    norm = weight.to(logits.dtype)[targets[labelled]].sum()
    return total / norm.clamp(min=torch.finfo(norm.dtype).tiny)


def sem_seg_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_value: int, loss_type: str,
                 weight: Optional[torch.Tensor] = None):
    """Pixel CE (or DeepLab's hard pixel mining, on the class-weighted pixel losses) of logits
    already at the targets' size."""
    if check_loss_type(loss_type) == "hard_pixel_mining":
        return DeepLabCE(ignore_label=ignore_value, top_k_percent_pixels=0.2, weight=weight)(logits, targets)
    return safe_cross_entropy(logits, targets, ignore_value, weight)


def check_loss_type(loss_type: str) -> str:
    """``loss_type`` when it is one of :data:`LOSS_TYPES`, else a ValueError naming them."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown MODEL.SEM_SEG_HEAD.LOSS_TYPE {loss_type!r}; choose from {LOSS_TYPES}.")
    return loss_type


class AuxFCNHead(nn.Module):
    """Auxiliary FCN head on an intermediate stage (training only), as in the papers' baselines:
    3x3 conv-norm-ReLU, dropout, 1x1 classifier (mmsegmentation's auxiliary ``FCNHead`` with
    one conv and no concatenation; CIRKD's ``auxlayer``)."""

    def __init__(self, *, in_channels: int, stride: int, in_feature: str, channels: int,
                 num_classes: int, norm: str, loss_weight: float, dropout: float):
        super().__init__()
        self.in_feature = in_feature
        self.stride = stride
        self.loss_weight = loss_weight
        self.conv = conv_norm(in_channels, channels, 3, norm, activation=F.relu)
        self.dropout = dropout2d(dropout)
        self.predictor = Conv2d(channels, num_classes, 1)

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.predictor(self.dropout(self.conv(features[self.in_feature])))


def build_aux_head(cfg, input_shape: Dict[str, ShapeSpec]) -> Optional[AuxFCNHead]:
    """The auxiliary FCN head of ``MODEL.SEM_SEG_HEAD.AUX_IN_FEATURE`` ('' disables it)."""
    c = cfg.MODEL.SEM_SEG_HEAD
    if not c.AUX_IN_FEATURE:
        return None
    if c.AUX_IN_FEATURE not in input_shape:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.AUX_IN_FEATURE {c.AUX_IN_FEATURE!r} is not a backbone output; "
            f"the backbone gives {sorted(input_shape)} (add it to MODEL.TIMM.OUT_FEATURES)."
        )
    shape = input_shape[c.AUX_IN_FEATURE]
    return AuxFCNHead(
        in_channels=shape.channels, stride=shape.stride, in_feature=c.AUX_IN_FEATURE, channels=c.AUX_CHANNELS,
        num_classes=c.NUM_CLASSES, norm=resolve_norm(cfg, "head"), loss_weight=c.AUX_LOSS_WEIGHT,
        dropout=c.AUX_DROPOUT,
    )


def conv_norm(cin: int, cout: int, kernel_size: int, norm: str, activation=None) -> Conv2d:
    """``kernel_size`` conv ("same" padding, no bias under a norm) + norm (+ ``activation``),
    with PyTorch's default initialisation."""
    return Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=not norm,
                  norm=get_norm(norm, cout), activation=activation)


def conv_norm_relu(cin: int, cout: int, kernel_size: int, norm: str) -> Conv2d:
    """:func:`conv_norm` + ReLU, MSRA-initialised."""
    layer = conv_norm(cin, cout, kernel_size, norm, activation=F.relu)
    weight_init.c2_msra_fill(layer)
    return layer


def dropout2d(p: float) -> nn.Module:
    """Channel dropout before a classifier; the identity when ``p`` is 0."""
    return nn.Dropout2d(p) if p > 0 else nn.Identity()


def build_classifier(channels: int, num_classes: int) -> Conv2d:
    """The 1x1 classifier of a head (``predictor``): weights N(0, 0.01), zero bias."""
    layer = Conv2d(channels, num_classes, kernel_size=1)
    nn.init.normal_(layer.weight, 0, 0.01)
    nn.init.constant_(layer.bias, 0)
    return layer


def single_in_feature(cfg, input_shape: Dict[str, ShapeSpec], head: str) -> str:
    """The one backbone feature of ``MODEL.SEM_SEG_HEAD.IN_FEATURES``, checked against the backbone's outputs."""
    in_features = list(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES)
    if len(in_features) != 1 or in_features[0] not in input_shape:
        raise ValueError(
            f"{head} takes exactly one backbone feature in MODEL.SEM_SEG_HEAD.IN_FEATURES, got "
            f"{in_features}; the backbone gives {sorted(input_shape)}."
        )
    return in_features[0]


def multi_in_features(cfg, input_shape: Dict[str, ShapeSpec], head: str) -> List[str]:
    """``MODEL.SEM_SEG_HEAD.IN_FEATURES``, checked against the backbone's outputs, finest first."""
    in_features = list(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES)
    missing = [f for f in in_features if f not in input_shape]
    if not in_features or missing:
        raise ValueError(
            f"{head} concatenates the backbone features in MODEL.SEM_SEG_HEAD.IN_FEATURES, got "
            f"{in_features}{f' ({missing} missing)' if missing else ''}; the backbone gives "
            f"{sorted(input_shape)}. On HRNet use {HRNET_BRANCHES} (add them to MODEL.TIMM.OUT_FEATURES)."
        )
    return sorted(in_features, key=lambda f: input_shape[f].stride)


def common_head_config(cfg, input_shape: Dict[str, ShapeSpec]) -> dict:
    """``from_config`` arguments every head of the project shares (``MODEL.SEM_SEG_HEAD``):
    ``input_shape``, ``num_classes``, ``norm`` and the contract's (:meth:`SegHeadMixin._init_contract`)."""
    c = cfg.MODEL.SEM_SEG_HEAD
    return dict(
        input_shape=input_shape,
        num_classes=c.NUM_CLASSES,
        norm=resolve_norm(cfg, "head"),
        ignore_value=c.IGNORE_VALUE,
        loss_weight=c.LOSS_WEIGHT,
        loss_type=c.LOSS_TYPE,
        align_corners=c.ALIGN_CORNERS,
        aux_head=build_aux_head(cfg, input_shape),
        class_weights=config_class_weights(cfg),
        output_resize=c.OUTPUT_RESIZE,
    )


class SegHeadMixin(ConvertibleHead):
    """detectron2's head contract built on ``forward_features`` + ``predictor``.

    A head class sets ``in_features``, ``common_stride``, ``ignore_value``, ``loss_weight``,
    ``loss_type``, ``align_corners``, ``output_resize``, ``predictor`` and ``aux_head`` (or None) —
    ``_init_contract`` sets all but the predictor — and implements ``forward_features``.
    ``layout`` names the code base whose structure a head reproduces where layouts differ
    (``MODEL.SEM_SEG_HEAD.LAYOUT``; "" for heads with one structure).

    A head's constructor takes its own arguments and passes the contract's keyword arguments
    (:data:`CONTRACT_ARGS`; see :meth:`_init_contract`) through ``**contract``, so that they
    are written once, here. The constructor's signature lists them all the same
    (``__init_subclass__``), so that ``inspect.signature``, ``help()`` and the checks of lazy
    config overrides see every argument a head takes.
    """

    # No class-level default for ``aux_head``: it would shadow the submodule that
    # nn.Module keeps in ``_modules``. Every head assigns it (None when unused).
    layout: str = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        sig = inspect.signature(init)
        params = list(sig.parameters.values())
        if not params or params[-1].kind is not inspect.Parameter.VAR_KEYWORD or params[-1].name != "contract":
            return
        contract = inspect.signature(SegHeadMixin._init_contract).parameters
        init.__signature__ = sig.replace(parameters=params[:-1] + [contract[n] for n in CONTRACT_ARGS])

    def _init_contract(self, *, input_shape: Dict[str, ShapeSpec], in_features: Sequence[str], ignore_value: int,
                       loss_weight: float, loss_type: str, align_corners: bool, aux_head: Optional[AuxFCNHead],
                       class_weights: Optional[Sequence[float]] = None, common_stride: Optional[int] = None,
                       output_resize: str = "stride") -> None:
        """Set the attributes the contract reads (call after ``nn.Module.__init__``).

        ``in_features`` must be in ``input_shape``; they are kept finest first, and
        ``common_stride`` (the stride of the head's output) defaults to the finest one's.
        ``ignore_value``: the label of ignored pixels; ``loss_weight``: the weight of
        ``loss_sem_seg``; ``loss_type``: one of :data:`LOSS_TYPES`; ``align_corners``: of
        every bilinear resize of the head; ``aux_head``: an :class:`AuxFCNHead` or None;
        ``class_weights``: one weight per class of the pixel cross-entropies (head and auxiliary
        head), or None (``MODEL.SEM_SEG_HEAD.CLASS_WEIGHTS`` / ``CLASS_WEIGHTING``);
        ``output_resize``: how inference brings the logits to the input, one of
        :data:`OUTPUT_RESIZE_RULES` (``MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE``; the module docstring).
        """
        check_loss_type(loss_type)
        if output_resize not in OUTPUT_RESIZE_RULES:
            raise ValueError(f"Unknown MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE {output_resize!r}; choose from "
                             f"{OUTPUT_RESIZE_RULES} ('stride': upsample by the head's stride, then crop; "
                             "'input': resize to the input size, as mmsegmentation and CIRKD do).")
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ValueError(f"{type(self).__name__}'s in_features {missing} are not in the backbone outputs "
                             f"{sorted(input_shape)}")
        self.in_features = sorted(in_features, key=lambda f: input_shape[f].stride)
        self.common_stride = input_shape[self.in_features[0]].stride if common_stride is None else common_stride
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        self.loss_type = loss_type
        self.align_corners = bool(align_corners)
        self.output_resize = output_resize
        self.aux_head = aux_head
        self._warned_no_size = False  # see predict_logits
        # not persistent: a loss setting, so checkpoints stay the same with or without it
        self.register_buffer("class_weights", None if class_weights is None else
                             torch.tensor([float(w) for w in class_weights]), persistent=False)

    def forward_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward_outputs(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        feats = self.forward_features(features)
        out = {"features": feats, "logits": self.predictor(feats)}
        if self.training and self.aux_head is not None:
            out["aux_logits"] = self.aux_head(features)
        return out

    def forward(self, features: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None, *,
                output_size: Optional[Sequence[int]] = None):
        """detectron2's head call: ``(None, losses)`` in training; ``(logits, {})`` in
        inference, brought to the input by the ``output_resize`` rule (``output_size``: H, W,
        the size of the padded tensor that entered the backbone; see :meth:`predict_logits`)."""
        outputs = self.forward_outputs(features)
        if self.training:
            # detectron2's SemanticSegmentor hands over the mapper's labels (uint8) as they were
            # copied; the losses index with int64
            return None, self.losses(outputs, targets.long())
        return self.predict_logits(outputs["logits"], output_size), {}

    def predict_logits(self, logits: torch.Tensor, output_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The head's logits (``forward_outputs(...)["logits"]``) as inference returns them.

        ``output_resize "stride"``: upsampled by ``common_stride`` (bilinear, ``align_corners``),
        whatever ``output_size``; the caller's postprocessing crops them to the image.
        ``"input"``: resized to ``output_size``; when it is None (detectron2's
        ``SemanticSegmentor``, which does not pass it) upsampled by the stride, with a warning
        (once per head) that the output then differs from the rule the config asks for where
        the input is not a multiple of the stride."""
        if self.output_resize == "input":
            if output_size is not None:
                return resize_logits(logits, output_size, self.align_corners)
            if not self._warned_no_size:
                self._warned_no_size = True
                logger.warning(
                    "%s has MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE 'input' but was called without output_size (detectron2's "
                    "SemanticSegmentor): its logits are upsampled by the head's stride (%d), then cropped, which "
                    "differs from resizing them to the input size where the input is not a multiple of the stride. "
                    "Use MODEL.META_ARCHITECTURE 'SemanticSegmentorAnySize' (segdistill's, which passes the input "
                    "size).", type(self).__name__, self.common_stride)
        return upsample_logits(logits, self.common_stride, self.align_corners)

    def losses(self, outputs: Dict[str, torch.Tensor], targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = upsample_logits(outputs["logits"], self.common_stride, self.align_corners)
        losses = {"loss_sem_seg": self.input_size_loss(logits, targets)}
        if "aux_logits" in outputs:
            aux = upsample_logits(outputs["aux_logits"], self.aux_head.stride, self.align_corners)
            losses["loss_aux"] = self.aux_head.loss_weight * safe_cross_entropy(aux, targets, self.ignore_value,
                                                                                self.class_weights)
        return losses

    def input_size_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``loss_sem_seg`` of logits already at the targets' size (weighted, the head's loss
        type and class weights): what :meth:`losses` takes after upsampling the head's logits,
        and what mask-aware training takes of the aggregated final logits."""
        return self.loss_weight * sem_seg_loss(logits, targets, self.ignore_value, self.loss_type, self.class_weights)


def seg_head_names() -> List[str]:
    """The ``MODEL.SEM_SEG_HEAD.NAME`` values whose heads follow the contract."""
    return sorted(name for name, obj in SEM_SEG_HEADS_REGISTRY if isinstance(obj, type) and issubclass(obj, SegHeadMixin))


def check_seg_head(head: nn.Module, refusal: str, alternative: str = "") -> SegHeadMixin:
    """``head`` when it follows the contract (is a :class:`SegHeadMixin`), else a TypeError
    that starts with ``refusal`` (what cannot be done without it), names the heads that
    follow it, and ends with ``alternative`` (another way out, if any)."""
    if not isinstance(head, SegHeadMixin):
        raise TypeError(
            f"{refusal}: its head {type(head).__name__} does not follow segdistill's head contract (SegHeadMixin: "
            f"forward_features, a 1x1 predictor, forward_outputs, losses). Use one of {seg_head_names()} as "
            f"MODEL.SEM_SEG_HEAD.NAME{alternative}."
        )
    return head
