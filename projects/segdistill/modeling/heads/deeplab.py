"""DeepLabV3 and DeepLabV3+ heads, with exposed features, in three layouts.

``MODEL.SEM_SEG_HEAD.LAYOUT`` picks the structure (see :mod:`.aspp` for the ASPP's):

* ``"detectron2"`` (default): ``SegDeepLabV3Head`` has the same modules (and state-dict
  keys: ``aspp.*``, ``predictor.*``) as ``detectron2.projects.deeplab.DeepLabV3Head``, but
  is ``@configurable`` and follows :class:`SegHeadMixin`; ``SegDeepLabV3PlusHead`` *is*
  detectron2's ``DeepLabV3PlusHead`` with the mixin on top.
* ``"mmseg"``: mmsegmentation's ``ASPPHead`` (image pooling first, 3x3 bottleneck, dropout,
  classifier; ``ASPP_DROPOUT`` must be 0, the one dropout is ``DROPOUT``) and ``DepthwiseSeparableASPPHead`` (separable dilated branches; the ASPP output
  upsampled to the low-level feature, concatenated after its 1x1 projection
  (``c1_bottleneck``), two separable 3x3 convs (``sep_bottleneck``), dropout, classifier).
* ``"cirkd"`` (DeepLabV3 only): CIRKD's ``_DeepLabHead`` (pooling last, 1x1 projection with
  dropout ``ASPP_DROPOUT`` 0.5, then ``ASPP_BOTTLENECK_CONVS`` 3x3 convs, dropout, classifier).

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
from detectron2.layers import ASPP, Conv2d, ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.projects.deeplab import DeepLabV3PlusHead

from ...config import ConfigError, register_keys
from .aspp import ASPP_LAYOUTS, SegASPP, SeparableConvNormReLU
from .base import (
    AuxFCNHead, SegHeadMixin, build_classifier, check_loss_type, common_head_config, conv_norm_relu, dropout2d,
    single_in_feature,
)

__all__ = ["SegDeepLabV3Head", "SegDeepLabV3PlusHead", "add_deeplab_head_config"]


# The DeepLab heads' own keys (detectron2's ASPP keys, ASPP_CHANNELS, ASPP_DILATIONS, ...,
# come from add_deeplab_config). ASPP image pooling (both heads): "global" (any input size) or
# "crop" (detectron2's window of the crop). SegDeepLabV3Head: 3x3 conv-norm-ReLU layers between
# the ASPP and the classifier (CIRKD/HWD's DeepLabV3 has one; detectron2's and the default none).
add_deeplab_head_config = register_keys("add_deeplab_head_config", "MODEL.SEM_SEG_HEAD", ASPP_POOLING="global",
                                        ASPP_BOTTLENECK_CONVS=0)


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


def _check_layout(layout: str, head: str, allowed=ASPP_LAYOUTS, aspp_dropout: float = 0.0) -> str:
    if layout not in allowed:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.LAYOUT {layout!r} is not a layout of {head}; choose from {list(allowed)}.")
    if layout == "mmseg" and aspp_dropout > 0:
        # mmsegmentation's ASPP heads drop out once, before the classifier (DROPOUT); a second
        # dropout inside the ASPP would change the training silently.
        raise ConfigError(
            f"MODEL.SEM_SEG_HEAD.ASPP_DROPOUT {aspp_dropout} under MODEL.SEM_SEG_HEAD.LAYOUT mmseg adds a dropout "
            f"that mmsegmentation's ASPP heads (ASPPHead, DepthwiseSeparableASPPHead, which {head} "
            "reproduces) do not have: their only dropout is before the classifier (MODEL.SEM_SEG_HEAD.DROPOUT, 0.1 in "
            "their configs). Set MODEL.SEM_SEG_HEAD.ASPP_DROPOUT 0.0."
        )
    return layout


@SEM_SEG_HEADS_REGISTRY.register()
class SegDeepLabV3Head(SegHeadMixin, nn.Module):
    """DeepLabV3: ASPP on one backbone feature, optional 3x3 convs, then a 1x1 classifier."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        in_feature: str,
        num_classes: int,
        layout: str,
        aspp_channels: int,
        aspp_dilations: List[int],
        aspp_dropout: float,
        pool_kernel_size: Optional[tuple],
        norm: str,
        use_depthwise_separable_conv: bool,
        bottleneck_convs: int,
        dropout: float,
        **contract,
    ):
        """``bottleneck_convs`` 3x3 conv-norm-ReLU layers between the ASPP and the classifier
        (CIRKD/HWD's DeepLabV3 has one). ``dropout`` is applied before the classifier: after
        the bottleneck convs, and in the mmseg and cirkd layouts always (detectron2's layout
        without bottleneck convs has only the ASPP's own dropout). ``contract``: the head
        contract's arguments (:meth:`SegHeadMixin._init_contract`)."""
        super().__init__()
        self.layout = _check_layout(layout, type(self).__name__, aspp_dropout=aspp_dropout)
        in_channels = input_shape[in_feature].channels
        if layout == "detectron2":
            self.aspp = ASPP(
                in_channels,
                aspp_channels,
                list(aspp_dilations),
                norm=norm,
                activation=F.relu,
                pool_kernel_size=pool_kernel_size,
                dropout=aspp_dropout,
                use_depthwise_separable_conv=use_depthwise_separable_conv,
            )
        else:
            if pool_kernel_size is not None:
                raise ValueError(f"MODEL.SEM_SEG_HEAD.ASPP_POOLING 'crop' is detectron2's; the {layout} layout pools globally.")
            self.aspp = SegASPP(
                in_channels, aspp_channels, list(aspp_dilations), norm=norm, pool_first=layout == "mmseg",
                project_kernel=3 if layout == "mmseg" else 1, dropout=aspp_dropout,
                separable=use_depthwise_separable_conv, align_corners=contract["align_corners"],
            )
        self.bottleneck = None
        if bottleneck_convs > 0 or layout != "detectron2":
            layers = [conv_norm_relu(aspp_channels, aspp_channels, 3, norm) for _ in range(bottleneck_convs)]
            if dropout > 0:
                layers.append(nn.Dropout2d(dropout))
            self.bottleneck = nn.Sequential(*layers) if layers else None
        self.predictor = Conv2d(aspp_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.predictor.weight, 0, 0.001)
        nn.init.constant_(self.predictor.bias, 0)
        # The contract last, so that the auxiliary head follows detectron2's DeepLabV3Head
        # modules (aspp, predictor) in the state dict, as it always has.
        self._init_contract(input_shape=input_shape, in_features=[in_feature], **contract)

    @classmethod
    def from_config(cls, cfg, input_shape):
        c = cfg.MODEL.SEM_SEG_HEAD
        in_feature = single_in_feature(cfg, input_shape, cls.__name__)
        return dict(
            common_head_config(cfg, input_shape),
            in_feature=in_feature,
            layout=c.LAYOUT,
            aspp_channels=c.ASPP_CHANNELS,
            aspp_dilations=c.ASPP_DILATIONS,
            aspp_dropout=c.ASPP_DROPOUT,
            pool_kernel_size=_aspp_pool_kernel(cfg, input_shape[in_feature].stride),
            use_depthwise_separable_conv=c.USE_DEPTHWISE_SEPARABLE_CONV,
            bottleneck_convs=c.ASPP_BOTTLENECK_CONVS,
            dropout=c.DROPOUT,
        )

    def forward_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.aspp(features[self.in_features[0]])
        return x if self.bottleneck is None else self.bottleneck(x)


@SEM_SEG_HEADS_REGISTRY.register()
class SegDeepLabV3PlusHead(SegHeadMixin, DeepLabV3PlusHead):
    """DeepLabV3+: detectron2's decoder (layout "detectron2"), or mmsegmentation's
    ``DepthwiseSeparableASPPHead`` (layout "mmseg"); features = the decoder output (after the
    dropout, in the mmseg layout) before the classifier."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        layout: str,
        project_channels: List[int],
        aspp_dilations: List[int],
        aspp_dropout: float,
        decoder_channels: List[int],
        common_stride: int,
        norm: str,
        train_size: Optional[tuple],
        loss_weight: float,
        loss_type: str,
        ignore_value: int,
        num_classes: int,
        use_depthwise_separable_conv: bool,
        dropout: float,
        align_corners: bool,
        aux_head: Optional[AuxFCNHead],
        class_weights: Optional[List[float]] = None,
        output_resize: str = "stride",
    ):
        check_loss_type(loss_type)
        if num_classes is None:
            raise ValueError("SegDeepLabV3PlusHead needs num_classes (MODEL.SEM_SEG_HEAD.NUM_CLASSES).")
        layout = _check_layout(layout, type(self).__name__, ("detectron2", "mmseg"), aspp_dropout)
        shapes = dict(input_shape)  # a lazy config's DictConfig would pass for a config in the parent's @configurable
        if layout == "detectron2":
            super().__init__(
                shapes, project_channels=project_channels, aspp_dilations=aspp_dilations, aspp_dropout=aspp_dropout,
                decoder_channels=decoder_channels, common_stride=common_stride, norm=norm, train_size=train_size,
                loss_weight=loss_weight, loss_type=loss_type, ignore_value=ignore_value, num_classes=num_classes,
                use_depthwise_separable_conv=use_depthwise_separable_conv,
            )
        else:
            nn.Module.__init__(self)
            self._build_mmseg(shapes, project_channels, aspp_dilations, aspp_dropout, decoder_channels, norm,
                              train_size, num_classes, dropout, align_corners)
        self.layout = layout
        in_features = [k for k, _ in sorted(shapes.items(), key=lambda kv: kv[1].stride)]
        self._init_contract(input_shape=shapes, in_features=in_features, common_stride=common_stride,
                            ignore_value=ignore_value, loss_weight=loss_weight, loss_type=loss_type,
                            align_corners=align_corners, aux_head=aux_head, class_weights=class_weights,
                            output_resize=output_resize)

    def _build_mmseg(self, shapes, project_channels, aspp_dilations, aspp_dropout, decoder_channels, norm,
                     train_size, num_classes, dropout, align_corners):
        if len(shapes) != 2 or len(project_channels) != 1:
            raise ValueError(
                "The mmseg layout of SegDeepLabV3PlusHead takes two features (low-level, ASPP input) in "
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES and one PROJECT_CHANNELS, got {sorted(shapes)} and {list(project_channels)}."
            )
        if train_size is not None:
            raise ValueError("MODEL.SEM_SEG_HEAD.ASPP_POOLING 'crop' is detectron2's; the mmseg layout pools globally.")
        low, high = sorted(shapes.values(), key=lambda s: s.stride)
        aspp_channels, channels = decoder_channels[-1], decoder_channels[0]
        self.aspp = SegASPP(high.channels, aspp_channels, list(aspp_dilations), norm=norm, pool_first=True,
                            project_kernel=3, dropout=aspp_dropout, separable=True, align_corners=align_corners)
        self.c1_bottleneck = conv_norm_relu(low.channels, project_channels[0], 1, norm)
        self.sep_bottleneck = nn.Sequential(
            SeparableConvNormReLU(aspp_channels + project_channels[0], channels, 3, norm=norm),
            SeparableConvNormReLU(channels, channels, 3, norm=norm),
        )
        self.dropout = dropout2d(dropout)
        self.predictor = build_classifier(channels, num_classes)

    @classmethod
    def from_config(cls, cfg, input_shape):
        c = cfg.MODEL.SEM_SEG_HEAD
        missing = [f for f in c.IN_FEATURES if f not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES {missing} are not backbone outputs; the backbone "
                f"gives {sorted(input_shape)} (add them to MODEL.TIMM.OUT_FEATURES)."
            )
        shapes = {k: v for k, v in input_shape.items() if k in c.IN_FEATURES}
        strides = sorted(v.stride for v in shapes.values())
        pool = _aspp_pool_kernel(cfg, strides[-1])
        return dict(
            common_head_config(cfg, input_shape),  # the auxiliary head may read any backbone output
            input_shape=shapes,
            layout=c.LAYOUT,
            project_channels=c.PROJECT_CHANNELS,
            aspp_dilations=c.ASPP_DILATIONS,
            aspp_dropout=c.ASPP_DROPOUT,
            decoder_channels=[c.CONVS_DIM] * (len(c.IN_FEATURES) - 1) + [c.ASPP_CHANNELS],
            # The decoder's output stride is the finest input's stride, not COMMON_STRIDE.
            common_stride=strides[0],
            train_size=None if pool is None else tuple(cfg.INPUT.CROP.SIZE),  # None: global image pooling
            use_depthwise_separable_conv=c.USE_DEPTHWISE_SEPARABLE_CONV,
            dropout=c.DROPOUT,
        )

    def forward_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        if self.layout == "mmseg":
            out = self.aspp(features[self.in_features[-1]])
            c1 = self.c1_bottleneck(features[self.in_features[0]])
            out = F.interpolate(out, size=c1.shape[-2:], mode="bilinear", align_corners=self.align_corners)
            return self.dropout(self.sep_bottleneck(torch.cat([out, c1], dim=1)))
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
