"""HS3-Fuse (HS3 paper, section 3.2, Figure 3): OCR-refined exit features fed to the final head.

For each exit i (shallowest first), an OCR block on the exit's segmentation features
(``relu(ExitOutput.features)``, what its segmenter reads):

    3x3 conv-norm-ReLU -> mid_i channels (pixel representations)
    soft object regions = the exit's own K_i-cluster logits (``ExitOutput.seg_logits``)
    ObjectContext (segdistill.modeling.heads.ocr): region representations, pixel-region
    relation in key_i channels, fusion -> mid_i channels

The deepest exit's block has ``mid_channels`` / ``key_channels`` (x ``channel_scale``), each
shallower one half of the next deeper one's. The blocks' outputs are resized to the stride of
the final head's finest input feature (``target``) and concatenated to it, so the head is built
with ``target`` ``sum(mid_i)`` channels wider. Parameter names: ``hs3_fuse.blocks.<exit>.*``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import ShapeSpec

from .exits import ExitOutput
from .heads.ocr import ObjectContext
from .heads.psp import conv_norm_relu

__all__ = ["HS3Fuse", "fuse_channels", "fuse_target"]


def fuse_channels(num_exits: int, mid_channels: int, key_channels: int, scale: float = 1.0) -> List[tuple]:
    """(mid_i, key_i) per exit, shallowest first: the deepest gets ``mid/key x scale``, each
    shallower one half of the next deeper one's (at least 1)."""
    if num_exits < 1:
        raise ValueError("HS3-Fuse needs at least one exit (MODEL.EXITS.IN_FEATURES).")
    if scale <= 0 or mid_channels < 1 or key_channels < 1:
        raise ValueError(
            f"MODEL.EXITS.HS3.FUSE: OCR_MID_CHANNELS ({mid_channels}), OCR_KEY_CHANNELS ({key_channels}) and "
            f"CHANNEL_SCALE ({scale}) must be positive."
        )
    out = []
    for depth in range(num_exits):  # 0 = deepest
        f = scale / 2 ** depth
        out.append((max(1, int(round(mid_channels * f))), max(1, int(round(key_channels * f)))))
    return out[::-1]


def fuse_target(head_in_features: Sequence[str], shapes: Dict[str, ShapeSpec]) -> str:
    """The final head's finest input feature, where the fused features are concatenated."""
    feats = [f for f in head_in_features if f in shapes]
    if not feats:
        raise ValueError(f"HS3-Fuse: MODEL.SEM_SEG_HEAD.IN_FEATURES {list(head_in_features)} are not backbone "
                         f"outputs ({sorted(shapes)}).")
    return min(feats, key=lambda f: shapes[f].stride)


class HS3FuseBlock(nn.Module):
    """One exit's OCR block: pixel conv + object context on the exit's own soft regions."""

    def __init__(self, in_channels: int, mid_channels: int, key_channels: int, norm: str):
        super().__init__()
        self.pixel_conv = conv_norm_relu(in_channels, mid_channels, 3, norm)
        self.context = ObjectContext(mid_channels, key_channels, norm, dropout=0.0)

    def forward(self, exit_out: ExitOutput) -> torch.Tensor:
        return self.context(self.pixel_conv(F.relu(exit_out.features)), exit_out.seg_logits)


class HS3Fuse(nn.Module):
    """Every exit's OCR block; ``forward(features, exits)`` returns the head's input features
    with the blocks' outputs concatenated to ``features[target]``."""

    def __init__(self, exit_channels: Dict[str, int], target: str, target_stride: int, *,
                 mid_channels: int = 256, key_channels: int = 128, channel_scale: float = 1.0, norm: str = "BN"):
        super().__init__()
        self.target = target
        self.target_stride = target_stride
        sizes = fuse_channels(len(exit_channels), mid_channels, key_channels, channel_scale)
        self.blocks = nn.ModuleDict({
            name: HS3FuseBlock(c, mid, key, norm) for (name, c), (mid, key) in zip(exit_channels.items(), sizes)
        })
        self.out_channels = sum(mid for mid, _ in sizes)

    def widened_shapes(self, shapes: Dict[str, ShapeSpec]) -> Dict[str, ShapeSpec]:
        """The backbone's output shapes as the head sees them (``target`` widened)."""
        out = dict(shapes)
        t = out[self.target]
        out[self.target] = ShapeSpec(channels=t.channels + self.out_channels, height=t.height, width=t.width,
                                     stride=t.stride)
        return out

    def forward(self, features: Dict[str, torch.Tensor], exits: Dict[str, ExitOutput]) -> Dict[str, torch.Tensor]:
        base = features[self.target]
        size = base.shape[-2:]
        fused = [base]
        for name, block in self.blocks.items():
            y = block(exits[name])
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            fused.append(y)
        out = dict(features)
        out[self.target] = torch.cat(fused, dim=1)
        return out
