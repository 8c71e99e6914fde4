"""HRNetV2 head (Wang et al., TPAMI 2020; the HRNet and HS3 papers' segmentation head).

Every input branch (HRNet's four final branches ``res2..res5``) is bilinearly upsampled to
the finest one and concatenated (270 channels for W18, 720 for W48); a 1x1
conv-norm-ReLU mixes them (the pre-classifier features) and a 1x1 conv classifies.
:func:`concat_branches` is shared with the OCR head.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ...config import register_keys
from .base import SegHeadMixin, build_classifier, common_head_config, conv_norm_relu, multi_in_features

__all__ = ["HRNetV2Head", "concat_branches", "add_hrnetv2_head_config"]


# HRNetV2Head: width of the 1x1 conv after the concatenated branches (0 = the
# concatenated width, 270 for W18 and 720 for W48, as in HRNetV2).
add_hrnetv2_head_config = register_keys("add_hrnetv2_head_config", "MODEL.SEM_SEG_HEAD", HRNETV2_CHANNELS=0)


def concat_branches(features: Dict[str, torch.Tensor], names: List[str], align_corners: bool = False) -> torch.Tensor:
    """Upsample ``features[names[1:]]`` to the size of ``features[names[0]]`` and concatenate
    (mmsegmentation's ``resize_concat``)."""
    first = features[names[0]]
    size = first.shape[-2:]
    ups = [first] + [
        F.interpolate(features[n], size=size, mode="bilinear", align_corners=align_corners) for n in names[1:]
    ]
    return torch.cat(ups, dim=1)


@SEM_SEG_HEADS_REGISTRY.register()
class HRNetV2Head(SegHeadMixin, nn.Module):
    """HRNetV2: concatenated branches -> 1x1 conv-norm-ReLU (the features) -> 1x1 classifier."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        in_features: List[str],
        num_classes: int,
        channels: int,
        norm: str,
        **contract,
    ):
        """``channels`` 0 keeps the concatenated width (HRNetV2's choice). This is
        mmsegmentation's ``FCNHead`` with ``input_transform="resize_concat"``, one 1x1 conv and
        no dropout, layer for layer. ``contract``: the head contract's arguments
        (:meth:`SegHeadMixin._init_contract`)."""
        super().__init__()
        self._init_contract(input_shape=input_shape, in_features=in_features, **contract)
        in_channels = sum(input_shape[f].channels for f in self.in_features)
        channels = channels or in_channels
        self.fuse = conv_norm_relu(in_channels, channels, 1, norm)
        self.predictor = build_classifier(channels, num_classes)

    @classmethod
    def from_config(cls, cfg, input_shape):
        return dict(
            common_head_config(cfg, input_shape),
            in_features=multi_in_features(cfg, input_shape, cls.__name__),
            channels=cfg.MODEL.SEM_SEG_HEAD.HRNETV2_CHANNELS,
        )

    def forward_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fuse(concat_branches(features, self.in_features, self.align_corners))
