"""ISANet head: interlaced sparse self-attention (Huang et al., 2019), mmsegmentation's ``ISAHead``.

On one backbone feature:

1. ``in_conv``: 3x3 conv-norm-ReLU to ``channels`` (the residual);
2. the map is padded (evenly on both sides) to a multiple of ``down_factor`` (8 x 8) and
   split into ``down_factor`` interlaced groups: pixels ``down_factor`` apart form a global
   group, and self-attention (``global_relation``) runs within each; then every
   ``down_factor`` x ``down_factor`` block forms a local group (``local_relation``);
3. each relation is a self-attention block: query and key projections (two 1x1
   conv-norm-ReLU each, ``isa_channels`` wide), a plain 1x1 value projection (bias, no norm),
   softmax of ``q k / sqrt(isa_channels)``, then a 1x1 conv-norm-ReLU output projection;
4. the padding is removed, the result concatenated with the residual and fused by a 1x1
   conv-norm-ReLU (``out_conv``): with dropout, the pre-classifier features.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ...config import register_keys
from .base import SegHeadMixin, build_classifier, common_head_config, conv_norm_relu, dropout2d, single_in_feature

__all__ = ["ISAHead", "SelfAttention", "add_isa_head_config"]


# ISAHead (ISANet): channels of the attention's queries and keys, and the local group
# size (h, w); its width is MODEL.SEM_SEG_HEAD.CONVS_DIM and its dropout DROPOUT.
add_isa_head_config = register_keys("add_isa_head_config", "MODEL.SEM_SEG_HEAD", ISA_CHANNELS=256,
                                    ISA_DOWN_FACTOR=[8, 8])


class SelfAttention(nn.Module):
    """Self-attention of an N x C x h x w map over its h*w positions (step 3 above)."""

    def __init__(self, channels: int, key_channels: int, norm: str):
        super().__init__()
        self.key_channels = key_channels

        def proj():
            return nn.Sequential(conv_norm_relu(channels, key_channels, 1, norm),
                                 conv_norm_relu(key_channels, key_channels, 1, norm))

        self.key_project = proj()
        self.query_project = proj()
        self.value_project = nn.Conv2d(channels, channels, 1)
        self.output_project = conv_norm_relu(channels, channels, 1, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q = self.query_project(x).reshape(n, self.key_channels, -1).transpose(1, 2)  # N x hw x Ck
        k = self.key_project(x).reshape(n, self.key_channels, -1)                    # N x Ck x hw
        v = self.value_project(x).reshape(n, c, -1).transpose(1, 2)                  # N x hw x C
        attn = F.softmax(torch.bmm(q, k) * self.key_channels ** -0.5, dim=-1)
        context = torch.bmm(attn, v).transpose(1, 2).reshape(n, c, h, w)
        return self.output_project(context)


@SEM_SEG_HEADS_REGISTRY.register()
class ISAHead(SegHeadMixin, nn.Module):
    """Interlaced sparse self-attention (see the module docstring) + dropout + classifier.
    ``contract``: the head contract's arguments (:meth:`SegHeadMixin._init_contract`)."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        in_feature: str,
        num_classes: int,
        channels: int,
        isa_channels: int,
        down_factor: Sequence[int],
        dropout: float,
        norm: str,
        **contract,
    ):
        super().__init__()
        if len(down_factor) != 2 or min(down_factor) < 1:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.ISA_DOWN_FACTOR must be two positive sizes (h, w), got {list(down_factor)}")
        self._init_contract(input_shape=input_shape, in_features=[in_feature], **contract)
        self.down_factor = (int(down_factor[0]), int(down_factor[1]))
        self.in_conv = conv_norm_relu(input_shape[in_feature].channels, channels, 3, norm)
        self.global_relation = SelfAttention(channels, isa_channels, norm)
        self.local_relation = SelfAttention(channels, isa_channels, norm)
        self.out_conv = conv_norm_relu(2 * channels, channels, 1, norm)
        self.dropout = dropout2d(dropout)
        self.predictor = build_classifier(channels, num_classes)

    @classmethod
    def from_config(cls, cfg, input_shape):
        c = cfg.MODEL.SEM_SEG_HEAD
        return dict(
            common_head_config(cfg, input_shape),
            in_feature=single_in_feature(cfg, input_shape, cls.__name__),
            channels=c.CONVS_DIM,
            isa_channels=c.ISA_CHANNELS,
            down_factor=list(c.ISA_DOWN_FACTOR),
            dropout=c.DROPOUT,
        )

    def forward_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.in_conv(features[self.in_features[0]])
        residual = x
        n, c, h, w = x.shape
        lh, lw = self.down_factor  # size of a local group
        gh, gw = math.ceil(h / lh), math.ceil(w / lw)  # number of local groups = size of a global group
        ph, pw = gh * lh - h, gw * lw - w
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        # global relation: pixels lh (lw) apart, one group per position inside a local block
        x = x.reshape(n, c, gh, lh, gw, lw).permute(0, 3, 5, 1, 2, 4).reshape(n * lh * lw, c, gh, gw)
        x = self.global_relation(x)
        # local relation: within each lh x lw block
        x = x.reshape(n, lh, lw, c, gh, gw).permute(0, 4, 5, 3, 1, 2).reshape(n * gh * gw, c, lh, lw)
        x = self.local_relation(x)
        x = x.reshape(n, gh, gw, c, lh, lw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, gh * lh, gw * lw)
        if ph or pw:
            x = x[:, :, ph // 2: ph // 2 + h, pw // 2: pw // 2 + w]
        return self.dropout(self.out_conv(torch.cat([x, residual], dim=1)))
