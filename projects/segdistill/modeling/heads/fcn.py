"""FCN head (Long et al.; the mmsegmentation FCNHead layout): 3x3 convs on one feature."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ...config import register_keys
from .base import SegHeadMixin, build_classifier, common_head_config, conv_norm_relu, dropout2d, single_in_feature

__all__ = ["FCNHead", "add_fcn_head_config"]


# FCNHead: number of 3x3 convs, concatenation of the input before the classifier (its
# dropout is the heads' MODEL.SEM_SEG_HEAD.DROPOUT).
add_fcn_head_config = register_keys("add_fcn_head_config", "MODEL.SEM_SEG_HEAD", NUM_CONVS=2, CONCAT_INPUT=True)


@SEM_SEG_HEADS_REGISTRY.register()
class FCNHead(SegHeadMixin, nn.Module):
    """``num_convs`` 3x3 conv-norm-ReLU layers (optionally concatenated with the input and
    fused by one more 3x3 conv), dropout, then the 1x1 classifier. ``contract``: the head
    contract's arguments (:meth:`SegHeadMixin._init_contract`)."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        in_feature: str,
        num_classes: int,
        conv_dims: int,
        num_convs: int,
        concat_input: bool,
        dropout: float,
        norm: str,
        **contract,
    ):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"FCNHead needs at least one conv (MODEL.SEM_SEG_HEAD.NUM_CONVS), got {num_convs}")
        self._init_contract(input_shape=input_shape, in_features=[in_feature], **contract)
        in_channels = input_shape[in_feature].channels

        def conv(cin):
            return conv_norm_relu(cin, conv_dims, 3, norm)

        self.convs = nn.Sequential(*[conv(in_channels if i == 0 else conv_dims) for i in range(num_convs)])
        self.fuse = conv(in_channels + conv_dims) if concat_input else None
        self.dropout = dropout2d(dropout)
        self.predictor = build_classifier(conv_dims, num_classes)

    @classmethod
    def from_config(cls, cfg, input_shape):
        c = cfg.MODEL.SEM_SEG_HEAD
        return dict(
            common_head_config(cfg, input_shape),
            in_feature=single_in_feature(cfg, input_shape, cls.__name__),
            conv_dims=c.CONVS_DIM,
            num_convs=c.NUM_CONVS,
            concat_input=c.CONCAT_INPUT,
            dropout=c.DROPOUT,
        )

    def forward_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        x = features[self.in_features[0]]
        y = self.convs(x)
        if self.fuse is not None:
            y = self.fuse(torch.cat([x, y], dim=1))
        return self.dropout(y)
