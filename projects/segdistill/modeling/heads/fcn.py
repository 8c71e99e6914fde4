"""FCN head (Long et al.; the mmsegmentation FCNHead layout): 3x3 convs on one feature."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F

import fvcore.nn.weight_init as weight_init
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ..backbones.norm import resolve_norm
from .base import AuxFCNHead, SegHeadMixin, build_aux_head
from .deeplab import _check_loss_type, _single_in_feature

__all__ = ["FCNHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class FCNHead(SegHeadMixin, nn.Module):
    """``num_convs`` 3x3 conv-norm-ReLU layers (optionally concatenated with the input and
    fused by one more 3x3 conv), dropout, then the 1x1 classifier."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        in_feature: str,
        num_classes: int,
        conv_dims: int = 512,
        num_convs: int = 2,
        concat_input: bool = True,
        dropout: float = 0.1,
        norm: str = "BN",
        ignore_value: int = 255,
        loss_weight: float = 1.0,
        loss_type: str = "cross_entropy",
        aux_head: Optional[AuxFCNHead] = None,
    ):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"FCNHead needs at least one conv (MODEL.SEM_SEG_HEAD.NUM_CONVS), got {num_convs}")
        self.in_features = [in_feature]
        in_channels = input_shape[in_feature].channels
        self.common_stride = input_shape[in_feature].stride
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        self.loss_type = _check_loss_type(loss_type)

        def conv(cin):
            layer = Conv2d(cin, conv_dims, 3, padding=1, bias=not norm,
                           norm=get_norm(norm, conv_dims), activation=F.relu)
            weight_init.c2_msra_fill(layer)
            return layer

        self.convs = nn.Sequential(*[conv(in_channels if i == 0 else conv_dims) for i in range(num_convs)])
        self.fuse = conv(in_channels + conv_dims) if concat_input else None
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.predictor = Conv2d(conv_dims, num_classes, kernel_size=1)
        nn.init.normal_(self.predictor.weight, 0, 0.01)
        nn.init.constant_(self.predictor.bias, 0)
        self.aux_head = aux_head

    @classmethod
    def from_config(cls, cfg, input_shape):
        c = cfg.MODEL.SEM_SEG_HEAD
        return dict(
            input_shape=input_shape,
            in_feature=_single_in_feature(cfg, input_shape, cls.__name__),
            num_classes=c.NUM_CLASSES,
            conv_dims=c.CONVS_DIM,
            num_convs=c.NUM_CONVS,
            concat_input=c.CONCAT_INPUT,
            dropout=c.DROPOUT,
            norm=resolve_norm(cfg, "head"),
            ignore_value=c.IGNORE_VALUE,
            loss_weight=c.LOSS_WEIGHT,
            loss_type=c.LOSS_TYPE,
            aux_head=build_aux_head(cfg, input_shape),
        )

    def forward_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        x = features[self.in_features[0]]
        y = self.convs(x)
        if self.fuse is not None:
            y = self.fuse(torch.cat([x, y], dim=1))
        return self.dropout(y)
