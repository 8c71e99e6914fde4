"""HRNetV2 head (Wang et al., TPAMI 2020; the HRNet and HS3 papers' segmentation head).

Every input branch (HRNet's four final branches ``res2..res5``) is bilinearly upsampled to
the finest one and concatenated (270 channels for W18, 720 for W48); a 1x1
conv-norm-ReLU mixes them (the pre-classifier features) and a 1x1 conv classifies.
:func:`concat_branches` is shared with the OCR head.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from .base import AuxFCNHead, SegHeadMixin, build_classifier, common_head_config, conv_norm_relu

__all__ = ["HRNetV2Head", "concat_branches", "multi_in_features"]

HRNET_BRANCHES = ["res2", "res3", "res4", "res5"]


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
        ignore_value: int,
        loss_weight: float,
        loss_type: str,
        align_corners: bool,
        aux_head: Optional[AuxFCNHead],
    ):
        """``channels`` 0 keeps the concatenated width (HRNetV2's choice). This is
        mmsegmentation's ``FCNHead`` with ``input_transform="resize_concat"``, one 1x1 conv and
        no dropout, layer for layer."""
        super().__init__()
        in_features = sorted(in_features, key=lambda f: input_shape[f].stride)
        self._init_contract(in_features=in_features, common_stride=input_shape[in_features[0]].stride,
                            ignore_value=ignore_value, loss_weight=loss_weight, loss_type=loss_type,
                            align_corners=align_corners, aux_head=aux_head)
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
