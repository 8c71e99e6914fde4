"""The contract every segdistill head follows, on top of detectron2's head contract.

detectron2's ``SemanticSegmentor`` calls ``head(features, targets)`` and gets
``(None, losses)`` in training and ``(logits at input scale, {})`` in inference. The
multi-exit segmentor and the distiller also need what the head computes *before* its
classifier, and the classifier itself (FAKD's closed-form bound reads its weight and bias).
So every head here exposes:

* ``forward_features(features) -> Tensor``: the pre-classifier features, N x C x h x w at
  ``common_stride``;
* ``predictor``: the 1x1 ``Conv2d`` classifier; ``predictor(forward_features(f))`` is
  exactly the head's logits;
* ``forward_outputs(features) -> dict``: ``{"features", "logits"}`` plus ``"aux_logits"``
  in training when an auxiliary FCN head is configured;
* ``losses(outputs, targets) -> dict``: ``loss_sem_seg`` (and ``loss_aux``).

``head_outputs(head, features)`` is how other components call it; it raises a clear error
for heads that do not follow the contract.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F

import fvcore.nn.weight_init as weight_init
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.projects.deeplab.loss import DeepLabCE

from ...convert import ConvertibleHead
from ..backbones.norm import resolve_norm

__all__ = ["SegHeadMixin", "AuxFCNHead", "build_aux_head", "head_outputs", "upsample_logits", "LOSS_TYPES",
           "build_classifier", "common_head_config", "conv_norm_relu"]

LOSS_TYPES = ("cross_entropy", "hard_pixel_mining")


def upsample_logits(logits: torch.Tensor, stride: int, align_corners: bool = False) -> torch.Tensor:
    """Bilinear upsampling by the head's stride, as detectron2's heads do (``align_corners``:
    the head's ``MODEL.SEM_SEG_HEAD.ALIGN_CORNERS``; CIRKD's models align corners)."""
    if stride == 1:
        return logits
    return F.interpolate(logits.float(), scale_factor=stride, mode="bilinear", align_corners=align_corners)


def sem_seg_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_value: int, loss_type: str):
    """Pixel CE (or DeepLab's hard pixel mining) of logits already at the targets' size."""
    if loss_type == "cross_entropy":
        # Mean over labelled pixels; a batch whose pixels are all ignored (COCO-Stuff keeps such
        # images) gives 0 with a graph, where reduction="mean" would give NaN.
        total = F.cross_entropy(logits, targets, ignore_index=ignore_value, reduction="sum")
        return total / (targets != ignore_value).sum().clamp(min=1)
    if loss_type == "hard_pixel_mining":
        return DeepLabCE(ignore_label=ignore_value, top_k_percent_pixels=0.2)(logits, targets)
    raise ValueError(f"Unknown MODEL.SEM_SEG_HEAD.LOSS_TYPE {loss_type!r}; choose from {LOSS_TYPES}.")


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
        self.conv = Conv2d(in_channels, channels, 3, padding=1, bias=not norm,
                           norm=get_norm(norm, channels), activation=F.relu)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
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


def conv_norm_relu(cin: int, cout: int, kernel_size: int, norm: str) -> Conv2d:
    """``kernel_size`` conv (no bias under a norm) + norm + ReLU, MSRA-initialised."""
    layer = Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=not norm,
                   norm=get_norm(norm, cout), activation=F.relu)
    weight_init.c2_msra_fill(layer)
    return layer


def build_classifier(channels: int, num_classes: int) -> Conv2d:
    """The 1x1 classifier of a head (``predictor``): weights N(0, 0.01), zero bias."""
    layer = Conv2d(channels, num_classes, kernel_size=1)
    nn.init.normal_(layer.weight, 0, 0.01)
    nn.init.constant_(layer.bias, 0)
    return layer


def common_head_config(cfg, input_shape: Dict[str, ShapeSpec]) -> dict:
    """``from_config`` arguments every head of the project shares (``MODEL.SEM_SEG_HEAD``)."""
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
    )


class SegHeadMixin(ConvertibleHead):
    """detectron2's head contract built on ``forward_features`` + ``predictor``.

    A head class sets ``in_features``, ``common_stride``, ``ignore_value``, ``loss_weight``,
    ``loss_type``, ``align_corners``, ``predictor`` and ``aux_head`` (or None) —
    ``_init_contract`` sets all but the predictor — and implements ``forward_features``.
    ``layout`` names the code base whose structure a head reproduces where layouts differ
    (``MODEL.SEM_SEG_HEAD.LAYOUT``; "" for heads with one structure).
    """

    # No class-level default for ``aux_head``: it would shadow the submodule that
    # nn.Module keeps in ``_modules``. Every head assigns it (None when unused).
    layout: str = ""

    def _init_contract(self, *, in_features, common_stride: int, ignore_value: int, loss_weight: float,
                       loss_type: str, align_corners: bool, aux_head: Optional["AuxFCNHead"]) -> None:
        """Set the attributes the contract reads (call after ``nn.Module.__init__``)."""
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"Unknown MODEL.SEM_SEG_HEAD.LOSS_TYPE {loss_type!r}; choose from {LOSS_TYPES}.")
        self.in_features = list(in_features)
        self.common_stride = common_stride
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        self.loss_type = loss_type
        self.align_corners = bool(align_corners)
        self.aux_head = aux_head

    def forward_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward_outputs(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        feats = self.forward_features(features)
        out = {"features": feats, "logits": self.predictor(feats)}
        if self.training and self.aux_head is not None:
            out["aux_logits"] = self.aux_head(features)
        return out

    def forward(self, features: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None):
        outputs = self.forward_outputs(features)
        if self.training:
            return None, self.losses(outputs, targets)
        return upsample_logits(outputs["logits"], self.common_stride, self.align_corners), {}

    def losses(self, outputs: Dict[str, torch.Tensor], targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = upsample_logits(outputs["logits"], self.common_stride, self.align_corners)
        losses = {
            "loss_sem_seg": self.loss_weight
            * sem_seg_loss(logits, targets, self.ignore_value, self.loss_type)
        }
        if "aux_logits" in outputs:
            aux = upsample_logits(outputs["aux_logits"], self.aux_head.stride, self.align_corners)
            losses["loss_aux"] = self.aux_head.loss_weight * sem_seg_loss(
                aux, targets, self.ignore_value, "cross_entropy"
            )
        return losses


def head_outputs(head: nn.Module, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``head.forward_outputs(features)``, with a clear error for heads that lack it."""
    if not hasattr(head, "forward_outputs") or not hasattr(head, "predictor"):
        from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

        ours = sorted(k for k, v in SEM_SEG_HEADS_REGISTRY._obj_map.items() if issubclass_safe(v))
        raise TypeError(
            f"{type(head).__name__} does not expose its pre-classifier features and classifier "
            f"(forward_outputs / predictor), which this model needs. Use one of {ours} as "
            "MODEL.SEM_SEG_HEAD.NAME, or derive your head from segdistill's SegHeadMixin."
        )
    return head.forward_outputs(features)


def issubclass_safe(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, SegHeadMixin)
