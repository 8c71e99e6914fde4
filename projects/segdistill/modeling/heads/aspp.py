"""ASPP in the layouts of mmsegmentation and CIRKD (detectron2's own ASPP stays in use for
``MODEL.SEM_SEG_HEAD.LAYOUT "detectron2"``).

The three layouts differ in exactly these places:

============================ ============================= ============================= =========================
                             detectron2 (``layers.ASPP``)   mmsegmentation (``ASPPHead``)  CIRKD (``_ASPP``)
============================ ============================= ============================= =========================
image pooling branch         1x1 conv with bias, ReLU       1x1 conv-BN-ReLU               1x1 conv-BN-ReLU
concatenation order          1x1, dilated..., pooling       pooling, 1x1, dilated...       1x1, dilated..., pooling
projection                   1x1 conv-BN-ReLU, dropout 0.1  3x3 conv-BN-ReLU               1x1 conv-BN-ReLU, dropout 0.5
============================ ============================= ============================= =========================

mmsegmentation's DeepLabV3+ (``DepthwiseSeparableASPPHead``) makes the dilated branches
depthwise-separable (depthwise 3x3 conv-BN-ReLU, pointwise 1x1 conv-BN-ReLU).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

import fvcore.nn.weight_init as weight_init
from detectron2.layers import Conv2d, get_norm

from .base import conv_norm_relu

__all__ = ["SegASPP", "SeparableConvNormReLU", "ASPP_LAYOUTS"]

#: MODEL.SEM_SEG_HEAD.LAYOUT values.
ASPP_LAYOUTS = ("detectron2", "mmseg", "cirkd")


class SeparableConvNormReLU(nn.Module):
    """Depthwise k x k conv-norm-ReLU (``dilation``), then pointwise 1x1 conv-norm-ReLU
    (mmcv's ``DepthwiseSeparableConvModule``)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, dilation: int = 1, *, norm: str):
        super().__init__()
        pad = dilation * (kernel_size - 1) // 2
        self.depthwise = Conv2d(cin, cin, kernel_size, padding=pad, dilation=dilation, groups=cin, bias=not norm,
                                norm=get_norm(norm, cin), activation=F.relu)
        weight_init.c2_msra_fill(self.depthwise)
        self.pointwise = conv_norm_relu(cin, cout, 1, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class SegASPP(nn.Module):
    """ASPP of mmsegmentation (``pool_first``, 3x3 projection) or CIRKD (pooling last, 1x1
    projection); see the module docstring. Modules: ``branches`` (1x1, then one per dilation),
    ``pool`` (the image-pooling conv), ``project``, ``dropout``."""

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int], *, norm: str, pool_first: bool,
                 project_kernel: int, dropout: float, separable: bool, align_corners: bool):
        super().__init__()
        self.pool_first = pool_first
        self.align_corners = align_corners
        branches = [conv_norm_relu(in_channels, channels, 1, norm)]
        for d in dilations:
            if separable:
                branches.append(SeparableConvNormReLU(in_channels, channels, 3, int(d), norm=norm))
            else:
                conv = Conv2d(in_channels, channels, 3, padding=int(d), dilation=int(d), bias=not norm,
                              norm=get_norm(norm, channels), activation=F.relu)
                weight_init.c2_msra_fill(conv)
                branches.append(conv)
        self.branches = nn.ModuleList(branches)
        self.pool = conv_norm_relu(in_channels, channels, 1, norm)
        self.project = conv_norm_relu((len(dilations) + 2) * channels, channels, project_kernel, norm)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1))
        pooled = F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        outs = [b(x) for b in self.branches]
        outs = [pooled] + outs if self.pool_first else outs + [pooled]
        return self.dropout(self.project(torch.cat(outs, dim=1)))
