"""DeepLabV3 and DeepLabV3+ heads on detectron2's DeepLab components, with exposed features.

``SegDeepLabV3Head`` has the same modules (and state-dict keys: ``aspp.*``, ``predictor.*``)
as ``detectron2.projects.deeplab.DeepLabV3Head``, but is ``@configurable`` (so lazy configs
can build it) and follows :class:`SegHeadMixin`. ``SegDeepLabV3PlusHead`` *is*
detectron2's ``DeepLabV3PlusHead`` with the mixin on top.

ASPP image pooling (``MODEL.SEM_SEG_HEAD.ASPP_POOLING``): ``"global"`` (default) pools over
the whole feature map at any input size, as torchvision and mmsegmentation do;
``"crop"`` is detectron2's choice, a fixed window of the training crop size, which makes
inference fail unless the test feature map is a multiple of that window.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
import fvcore.nn.weight_init as weight_init
from detectron2.layers import ASPP, Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.projects.deeplab import DeepLabV3PlusHead

from ..backbones.norm import resolve_norm
from .base import LOSS_TYPES, AuxFCNHead, SegHeadMixin, build_aux_head

__all__ = ["SegDeepLabV3Head", "SegDeepLabV3PlusHead"]

ASPP_POOLINGS = ("global", "crop")


def _aspp_pool_kernel(cfg, stride: int):
    """None for global pooling, else detectron2's training-crop window."""
    pooling = cfg.MODEL.SEM_SEG_HEAD.ASPP_POOLING
    if pooling not in ASPP_POOLINGS:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.ASPP_POOLING must be one of {ASPP_POOLINGS}, got {pooling!r}")
    if pooling == "global" or not cfg.INPUT.CROP.ENABLED:
        return None
    h, w = cfg.INPUT.CROP.SIZE
    if h % stride or w % stride:
        raise ValueError(f"INPUT.CROP.SIZE {tuple(cfg.INPUT.CROP.SIZE)} must be divisible by the output stride {stride}.")
    return (h // stride, w // stride)


def _check_loss_type(loss_type: str) -> str:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown MODEL.SEM_SEG_HEAD.LOSS_TYPE {loss_type!r}; choose from {LOSS_TYPES}.")
    return loss_type


def _single_in_feature(cfg, input_shape: Dict[str, ShapeSpec], head: str) -> str:
    in_features = list(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES)
    if len(in_features) != 1 or in_features[0] not in input_shape:
        raise ValueError(
            f"{head} takes exactly one backbone feature in MODEL.SEM_SEG_HEAD.IN_FEATURES, got "
            f"{in_features}; the backbone gives {sorted(input_shape)}."
        )
    return in_features[0]


@SEM_SEG_HEADS_REGISTRY.register()
class SegDeepLabV3Head(SegHeadMixin, nn.Module):
    """DeepLabV3: ASPP on one backbone feature, then a 1x1 classifier."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        in_feature: str,
        num_classes: int,
        aspp_channels: int = 256,
        aspp_dilations: List[int] = (12, 24, 36),
        aspp_dropout: float = 0.1,
        pool_kernel_size: Optional[tuple] = None,
        norm: str = "BN",
        use_depthwise_separable_conv: bool = False,
        bottleneck_convs: int = 0,
        bottleneck_dropout: float = 0.1,
        ignore_value: int = 255,
        loss_weight: float = 1.0,
        loss_type: str = "cross_entropy",
        aux_head: Optional[AuxFCNHead] = None,
    ):
        """``bottleneck_convs`` 3x3 conv-norm-ReLU layers (then dropout) between the ASPP and
        the classifier: CIRKD/HWD's DeepLabV3 has one; 0 keeps detectron2's layout."""
        super().__init__()
        self.in_features = [in_feature]
        self.common_stride = input_shape[in_feature].stride
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        self.loss_type = _check_loss_type(loss_type)
        self.aspp = ASPP(
            input_shape[in_feature].channels,
            aspp_channels,
            list(aspp_dilations),
            norm=norm,
            activation=F.relu,
            pool_kernel_size=pool_kernel_size,
            dropout=aspp_dropout,
            use_depthwise_separable_conv=use_depthwise_separable_conv,
        )
        self.bottleneck = None
        if bottleneck_convs > 0:
            layers = []
            for _ in range(bottleneck_convs):
                layers.append(Conv2d(aspp_channels, aspp_channels, 3, padding=1, bias=not norm,
                                     norm=get_norm(norm, aspp_channels), activation=F.relu))
                weight_init.c2_msra_fill(layers[-1])
            if bottleneck_dropout > 0:
                layers.append(nn.Dropout2d(bottleneck_dropout))
            self.bottleneck = nn.Sequential(*layers)
        self.predictor = Conv2d(aspp_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.predictor.weight, 0, 0.001)
        nn.init.constant_(self.predictor.bias, 0)
        self.aux_head = aux_head

    @classmethod
    def from_config(cls, cfg, input_shape):
        c = cfg.MODEL.SEM_SEG_HEAD
        in_feature = _single_in_feature(cfg, input_shape, cls.__name__)
        return dict(
            input_shape=input_shape,
            in_feature=in_feature,
            num_classes=c.NUM_CLASSES,
            aspp_channels=c.ASPP_CHANNELS,
            aspp_dilations=c.ASPP_DILATIONS,
            aspp_dropout=c.ASPP_DROPOUT,
            pool_kernel_size=_aspp_pool_kernel(cfg, input_shape[in_feature].stride),
            norm=resolve_norm(cfg, "head"),
            use_depthwise_separable_conv=c.USE_DEPTHWISE_SEPARABLE_CONV,
            bottleneck_convs=c.ASPP_BOTTLENECK_CONVS,
            bottleneck_dropout=c.DROPOUT,
            ignore_value=c.IGNORE_VALUE,
            loss_weight=c.LOSS_WEIGHT,
            loss_type=c.LOSS_TYPE,
            aux_head=build_aux_head(cfg, input_shape),
        )

    def forward_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.aspp(features[self.in_features[0]])
        return x if self.bottleneck is None else self.bottleneck(x)


@SEM_SEG_HEADS_REGISTRY.register()
class SegDeepLabV3PlusHead(SegHeadMixin, DeepLabV3PlusHead):
    """detectron2's DeepLabV3+ decoder; features = the decoder output before the classifier."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, aux_head: Optional[AuxFCNHead] = None, **kwargs):
        _check_loss_type(kwargs.get("loss_type", "cross_entropy"))
        if kwargs.get("num_classes") is None:
            raise ValueError("SegDeepLabV3PlusHead needs num_classes (MODEL.SEM_SEG_HEAD.NUM_CLASSES).")
        # dict(): a lazy config's DictConfig would pass for a config in the parent's @configurable
        super().__init__(dict(input_shape), **kwargs)
        self.aux_head = aux_head

    @classmethod
    def from_config(cls, cfg, input_shape):
        missing = [f for f in cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES if f not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES {missing} are not backbone outputs; the backbone "
                f"gives {sorted(input_shape)} (add them to MODEL.TIMM.OUT_FEATURES)."
            )
        ret = super().from_config(cfg, input_shape)
        ret["norm"] = resolve_norm(cfg, "head")  # MODEL.NORM, else MODEL.SEM_SEG_HEAD.NORM
        strides = sorted(v.stride for v in ret["input_shape"].values())
        if _aspp_pool_kernel(cfg, strides[-1]) is None:
            ret["train_size"] = None  # global image pooling at any input size
        # The decoder's output stride is the finest input's stride, not COMMON_STRIDE.
        ret["common_stride"] = strides[0]
        ret["aux_head"] = build_aux_head(cfg, input_shape)
        return ret

    def forward_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        # detectron2's ``layers`` without the final ``predictor``.
        y = None
        for f in self.in_features[::-1]:
            proj_x = self.decoder[f]["project_conv"](features[f])
            if self.decoder[f]["fuse_conv"] is None:
                y = proj_x  # ASPP
            else:
                y = F.interpolate(y, size=proj_x.shape[2:], mode="bilinear", align_corners=False)
                y = self.decoder[f]["fuse_conv"](torch.cat([proj_x, y], dim=1))
        return y

    def layers(self, features):
        return self.predictor(self.forward_features(features))
