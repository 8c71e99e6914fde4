"""OCR head: object-contextual representations (Yuan et al., ECCV 2020), as in HRNet-OCR.

On the concatenated ``IN_FEATURES`` (HRNet's four branches upsampled to stride 4):

1. *soft object regions*: a 1x1 conv-norm-ReLU + 1x1 classifier predicts coarse class
   maps (``region_head``); it is part of the model at inference too, and in training its
   cross-entropy is the head's own auxiliary loss ``loss_ocr_aux`` (weight
   ``OCR_AUX_LOSS_WEIGHT``, 0.4 as in HRNet-OCR), separate from the optional FCN auxiliary
   head on an intermediate stage (``loss_aux``);
2. pixel representations: 3x3 conv-norm-ReLU to ``mid_channels`` (512);
3. object-region representations: the pixel representations averaged over each region,
   weighted by the region's softmax over pixels (N x C x K);
4. pixel-region relation: attention of every pixel (query) over the K regions (keys),
   in ``key_channels`` (256), giving each pixel an object context;
5. the context and the pixel representations are concatenated and fused by a 1x1
   conv-norm-ReLU + dropout: these are the head's pre-classifier features, then the 1x1
   classifier (``predictor``).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ...config import register_keys
from .base import (
    SegHeadMixin, build_classifier, common_head_config, conv_norm_relu, dropout2d, multi_in_features,
    safe_cross_entropy, upsample_logits,
)
from .hrnetv2 import concat_branches

__all__ = ["OCRHead", "ObjectContext", "add_ocr_head_config"]


# OCRHead (object-contextual representations, on the concatenated IN_FEATURES):
# 3x3 conv to MID channels, pixel-region attention with KEY channels, dropout after
# the fusion conv, the soft-object-region head's width (0 = input width, as in
# HRNet-OCR) and the weight of its loss ("loss_ocr_aux").
add_ocr_head_config = register_keys(
    "add_ocr_head_config", "MODEL.SEM_SEG_HEAD", OCR_MID_CHANNELS=512, OCR_KEY_CHANNELS=256, OCR_DROPOUT=0.05,
    OCR_REGION_CHANNELS=0, OCR_AUX_LOSS_WEIGHT=0.4)


class ObjectContext(nn.Module):
    """Steps 3-5 above: region representations, pixel-region attention, fusion.

    ``forward(feats, region_logits)`` takes N x C x H x W pixel representations and
    N x K x H x W soft-region logits and returns the fused N x C x H x W features.
    """

    def __init__(self, channels: int, key_channels: int, norm: str, dropout: float, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.key_channels = key_channels

        def proj(cin, cout, depth):
            return nn.Sequential(*[conv_norm_relu(cin if i == 0 else cout, cout, 1, norm) for i in range(depth)])

        self.query = proj(channels, key_channels, 2)   # f_pixel
        self.key = proj(channels, key_channels, 2)     # f_object
        self.value = proj(channels, key_channels, 1)   # f_down
        self.up = proj(key_channels, channels, 1)      # f_up
        self.fuse = conv_norm_relu(2 * channels, channels, 1, norm)
        self.dropout = dropout2d(dropout)

    def regions(self, feats: torch.Tensor, region_logits: torch.Tensor) -> torch.Tensor:
        """Object-region representations N x C x K x 1: feats averaged by each region's softmax over pixels."""
        n, c = feats.shape[:2]
        k = region_logits.shape[1]
        probs = F.softmax(self.scale * region_logits.reshape(n, k, -1), dim=2)  # N x K x HW
        return torch.bmm(probs, feats.reshape(n, c, -1).transpose(1, 2)).transpose(1, 2).unsqueeze(3)

    def forward(self, feats: torch.Tensor, region_logits: torch.Tensor) -> torch.Tensor:
        n, _, h, w = feats.shape
        regions = self.regions(feats, region_logits)
        q = self.query(feats).reshape(n, self.key_channels, -1).transpose(1, 2)  # N x HW x Ck
        k = self.key(regions).reshape(n, self.key_channels, -1)                  # N x Ck x K
        v = self.value(regions).reshape(n, self.key_channels, -1).transpose(1, 2)  # N x K x Ck
        relation = F.softmax(torch.bmm(q, k) * self.key_channels ** -0.5, dim=-1)  # N x HW x K
        context = torch.bmm(relation, v).transpose(1, 2).reshape(n, self.key_channels, h, w)
        context = self.up(context)
        return self.dropout(self.fuse(torch.cat([context, feats], dim=1)))


@SEM_SEG_HEADS_REGISTRY.register()
class OCRHead(SegHeadMixin, nn.Module):
    """Object-contextual representations on concatenated backbone features (see the module docstring).

    ``forward_outputs`` adds ``"ocr_aux_logits"`` (the soft object regions) in training;
    ``losses`` adds ``loss_ocr_aux``. ``forward_features_and_regions`` returns both at any time.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        in_features: List[str],
        num_classes: int,
        mid_channels: int,
        key_channels: int,
        region_channels: int,
        dropout: float,
        ocr_aux_loss_weight: float,
        norm: str,
        **contract,
    ):
        """``region_channels`` 0 keeps the input width in the soft-region head (HRNet-OCR).
        With ``dropout`` 0 this is mmsegmentation's OCRNet (``CascadeEncoderDecoder``: an
        ``FCNHead`` for the soft regions, then ``OCRHead``) layer for layer. ``contract``: the
        head contract's arguments (:meth:`SegHeadMixin._init_contract`)."""
        super().__init__()
        self._init_contract(input_shape=input_shape, in_features=in_features, **contract)
        self.ocr_aux_loss_weight = ocr_aux_loss_weight
        in_channels = sum(input_shape[f].channels for f in self.in_features)
        region_channels = region_channels or in_channels
        self.region_head = nn.Sequential(
            conv_norm_relu(in_channels, region_channels, 1, norm),
            build_classifier(region_channels, num_classes),
        )
        self.pixel_conv = conv_norm_relu(in_channels, mid_channels, 3, norm)
        self.context = ObjectContext(mid_channels, key_channels, norm, dropout=dropout)
        self.predictor = build_classifier(mid_channels, num_classes)

    @classmethod
    def from_config(cls, cfg, input_shape):
        c = cfg.MODEL.SEM_SEG_HEAD
        return dict(
            common_head_config(cfg, input_shape),
            in_features=multi_in_features(cfg, input_shape, cls.__name__),
            mid_channels=c.OCR_MID_CHANNELS,
            key_channels=c.OCR_KEY_CHANNELS,
            region_channels=c.OCR_REGION_CHANNELS,
            dropout=c.OCR_DROPOUT,
            ocr_aux_loss_weight=c.OCR_AUX_LOSS_WEIGHT,
        )

    def forward_features_and_regions(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(pre-classifier features, soft object-region logits), both at ``common_stride``."""
        x = concat_branches(features, self.in_features, self.align_corners)
        regions = self.region_head(x)
        return self.context(self.pixel_conv(x), regions), regions

    def forward_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_features_and_regions(features)[0]

    def forward_outputs(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        feats, regions = self.forward_features_and_regions(features)
        out = {"features": feats, "logits": self.predictor(feats)}
        if self.training:
            out["ocr_aux_logits"] = regions
            if self.aux_head is not None:
                out["aux_logits"] = self.aux_head(features)
        return out

    def losses(self, outputs: Dict[str, torch.Tensor], targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        losses = super().losses(outputs, targets)
        if "ocr_aux_logits" in outputs and self.ocr_aux_loss_weight > 0:
            regions = upsample_logits(outputs["ocr_aux_logits"], self.common_stride, self.align_corners)
            losses["loss_ocr_aux"] = self.ocr_aux_loss_weight * safe_cross_entropy(regions, targets, self.ignore_value,
                                                                                    self.class_weights)
        return losses
