"""The ``rh`` exit head (``MODEL.EXITS.HEAD rh``): ADP-C's "redesigned head".

Liu et al., *Anytime Dense Prediction with Confidence Adaptivity*, ICLR 2022 (RH). An exit
head of 3x3 convs at the stage's resolution costs as much as a good part of the backbone
before it; RH replaces them with 1x1 convs on a pooled pyramid, which widens the receptive
field of shallow exits (they need context more than resolution) at a fraction of the MACs.
An exit with ``L`` pooling levels on a stage's features ``x`` (C channels)::

    encoder, L times:   2x2 average pool (stride 2) -> 1x1 conv (+norm, ReLU)
                        (the first conv C -> CHANNELS, the others CHANNELS -> CHANNELS)
    decoder, L-1 times: bilinear upsample to the encoder level above -> 1x1 conv (+norm, ReLU)
    then:               bilinear upsample to 1/COMMON_STRIDE of the input = ExitOutput.features
                        -> segmenter: 1x1 conv to K logits (+ the multi-label classifier)

As ADP-C's code, the pooling comes before each encoder conv (the first conv already runs at
half resolution) and the decoder is a plain chain, with no skip connection. ADP-C's last
upsample returns to the exit's input resolution, which is its output resolution on HRNet; here
it goes to the common stride directly, so that one resize serves a stage of any stride.
Pooling uses ``ceil_mode`` (the same as ADP-C's on even sizes; an odd or 1-pixel map keeps its
last row / column instead of failing), and each decoder step upsamples to the size its
encoder level had, so every input size works.

Levels (``MODEL.EXITS.RH.LEVELS``; empty = ADP-C's rule): ADP-C's HRNet has three exits before
its final head, with 3, 2 and 1 levels, shallowest first. With ``n`` exits, the deepest gets 1,
the next 2 and every shallower one 3 (:func:`adpc_levels`): res2/res3/res4 -> 3/2/1.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import CfgNode as CN
from detectron2.layers import Conv2d

from ...config import register_config_hook
from ..heads.base import conv_norm
from .heads import ExitHeadBase, ExitOutput, MultiLabelClassifier, register_exit_head

__all__ = ["RHExitHead", "adpc_levels", "add_rh_exit_config", "RH_HEAD", "MAX_ADPC_LEVELS"]

RH_HEAD = "rh"
MAX_ADPC_LEVELS = 3  # ADP-C's shallowest exit


@register_config_hook
def add_rh_exit_config(cfg) -> None:
    """MODEL.EXITS.RH: the keys of the ``rh`` exit head (read only when MODEL.EXITS.HEAD is "rh")."""
    if "RH" in cfg.MODEL.EXITS:
        return
    cfg.MODEL.EXITS.RH = CN()
    # Width of every 1x1 conv of the encoder-decoder (ADP-C: 128 on HRNet-W48, 64 on W18).
    cfg.MODEL.EXITS.RH.CHANNELS = 128
    # Pooling levels per exit, one per MODEL.EXITS.IN_FEATURES entry; empty = ADP-C's rule:
    # the deepest exit 1, the next 2, every shallower one 3.
    cfg.MODEL.EXITS.RH.LEVELS = []


def adpc_levels(count: int) -> List[int]:
    """ADP-C's pooling levels for ``count`` exits, shallowest first: ``[..., 3, 3, 2, 1]``."""
    return [min(MAX_ADPC_LEVELS, count - i) for i in range(count)]


@register_exit_head(RH_HEAD)
class RHExitHead(ExitHeadBase):
    """ADP-C's RH exit: pooled 1x1 encoder-decoder, segmenter (+ classifier); see the module docstring."""

    def __init__(self, *, in_channels: int, num_classes: int, channels: int, common_stride: int, norm: str,
                 with_classifier: bool, levels: int):
        super().__init__()
        if int(levels) < 1:
            raise ValueError(f"An rh exit needs at least one pooling level, got {levels} "
                             "(MODEL.EXITS.RH.LEVELS).")
        self.common_stride = common_stride
        self.num_classes = num_classes
        self.channels = channels
        self.levels = int(levels)
        self.encoder = nn.ModuleList([
            conv_norm(in_channels if i == 0 else channels, channels, 1, norm, activation=F.relu)
            for i in range(self.levels)
        ])
        self.decoder = nn.ModuleList([
            conv_norm(channels, channels, 1, norm, activation=F.relu) for _ in range(self.levels - 1)
        ])
        self.segmenter = Conv2d(channels, num_classes, 1)
        self.classifier = (MultiLabelClassifier(in_channels=channels, num_classes=num_classes)
                           if with_classifier else None)

    @classmethod
    def config_kwargs(cls, cfg) -> Dict[str, Any]:
        c = cfg.MODEL.EXITS.RH
        return {"channels": c.CHANNELS, "head_options": {"levels": list(c.LEVELS)}}

    @classmethod
    def per_exit_options(cls, in_features: Sequence[str], options: Dict[str, Any]) -> List[Dict[str, Any]]:
        options = dict(options)
        levels = list(options.pop("levels", None) or [])
        if options:
            raise ValueError(f"MODEL.EXITS.HEAD 'rh' takes the option 'levels' only, got {sorted(options)}.")
        if not levels:
            levels = adpc_levels(len(in_features))
        if len(levels) != len(in_features) or any(int(v) != v or v < 1 for v in levels):
            raise ValueError(
                f"MODEL.EXITS.RH.LEVELS {levels} must give one positive integer per exit {list(in_features)} "
                f"(or be empty for ADP-C's rule, here {adpc_levels(len(in_features))}).")
        return [{"levels": int(v)} for v in levels]

    def forward(self, x: torch.Tensor, size: Tuple[int, int], with_classifier: bool = True) -> ExitOutput:
        sizes = []  # each encoder level's input size, where the decoder returns
        for conv in self.encoder:
            sizes.append(x.shape[-2:])
            x = conv(F.avg_pool2d(x, 2, 2, ceil_mode=True))
        for conv, up in zip(self.decoder, reversed(sizes[1:])):
            x = conv(F.interpolate(x, size=up, mode="bilinear", align_corners=False))
        feats = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        cls = self.classifier(feats) if (with_classifier and self.classifier is not None) else None
        return ExitOutput(feats, self.segmenter(feats), cls, self.common_stride)
