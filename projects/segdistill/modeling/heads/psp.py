"""PSPNet head (Zhao et al., CVPR 2017): pyramid pooling module on one backbone feature.

The input is average-pooled to ``bins`` x ``bins`` grids (1, 2, 3, 6), each grid goes
through a 1x1 conv-norm-ReLU, is upsampled back and concatenated with the input; a 3x3
conv-norm-ReLU (the bottleneck, ``channels`` wide) and dropout give the pre-classifier
features, then the 1x1 classifier. The widths are configurable so that both common
layouts build: CIRKD/HWD's (branches ``in/4``, bottleneck 128 for ResNet-18 and 256 for
ResNet-101; ``ALIGN_CORNERS`` True) and mmsegmentation's (branches and bottleneck 512, 128
on ResNet-18). The structure is theirs layer for layer (``convert/`` maps their checkpoints).
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ...config import register_keys
from .base import SegHeadMixin, build_classifier, common_head_config, conv_norm_relu, dropout2d, single_in_feature

__all__ = ["PSPHead", "PyramidPooling", "add_psp_head_config"]


# PSPHead: pyramid pooling bins; channels of each pooling branch (0 = in_channels /
# len(bins)); the bottleneck 3x3 conv's width is MODEL.SEM_SEG_HEAD.CONVS_DIM and its
# dropout MODEL.SEM_SEG_HEAD.DROPOUT.
add_psp_head_config = register_keys("add_psp_head_config", "MODEL.SEM_SEG_HEAD", PSP_BINS=[1, 2, 3, 6],
                                    PSP_POOL_CHANNELS=0)


class PyramidPooling(nn.Module):
    """Concatenation of the input with its pooled-and-upsampled pyramid (in + len(bins) * pool)."""

    def __init__(self, in_channels: int, bins: Sequence[int], pool_channels: int, norm: str, align_corners: bool):
        super().__init__()
        self.align_corners = align_corners
        if not bins or any(int(b) < 1 for b in bins):
            raise ValueError(f"MODEL.SEM_SEG_HEAD.PSP_BINS must be positive grid sizes, got {list(bins)}")
        self.bins = [int(b) for b in bins]
        self.stages = nn.ModuleList(conv_norm_relu(in_channels, pool_channels, 1, norm) for _ in self.bins)
        self.out_channels = in_channels + len(self.bins) * pool_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pyramid = [x]
        for b, stage in zip(self.bins, self.stages):
            y = stage(F.adaptive_avg_pool2d(x, b))
            pyramid.append(F.interpolate(y, size=size, mode="bilinear", align_corners=self.align_corners))
        return torch.cat(pyramid, dim=1)


@SEM_SEG_HEADS_REGISTRY.register()
class PSPHead(SegHeadMixin, nn.Module):
    """PSPNet: pyramid pooling + 3x3 bottleneck + dropout (= the features) + 1x1 classifier."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        in_feature: str,
        num_classes: int,
        bins: Sequence[int],
        pool_channels: int,
        channels: int,
        dropout: float,
        norm: str,
        **contract,
    ):
        """``pool_channels`` 0 means ``in_channels // len(bins)`` (the PSPNet paper's choice).
        ``contract``: the head contract's arguments (:meth:`SegHeadMixin._init_contract`)."""
        super().__init__()
        self._init_contract(input_shape=input_shape, in_features=[in_feature], **contract)
        in_channels = input_shape[in_feature].channels
        pool_channels = pool_channels or max(1, in_channels // len(bins))
        self.ppm = PyramidPooling(in_channels, bins, pool_channels, norm, self.align_corners)
        self.bottleneck = conv_norm_relu(self.ppm.out_channels, channels, 3, norm)
        self.dropout = dropout2d(dropout)
        self.predictor = build_classifier(channels, num_classes)

    @classmethod
    def from_config(cls, cfg, input_shape):
        c = cfg.MODEL.SEM_SEG_HEAD
        return dict(
            common_head_config(cfg, input_shape),
            in_feature=single_in_feature(cfg, input_shape, cls.__name__),
            bins=list(c.PSP_BINS),
            pool_channels=c.PSP_POOL_CHANNELS,
            channels=c.CONVS_DIM,
            dropout=c.DROPOUT,
        )

    def forward_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.dropout(self.bottleneck(self.ppm(features[self.in_features[0]])))
