"""Colour palettes for datasets without official colours."""
from __future__ import annotations

from typing import List

__all__ = ["voc_colormap", "spread_colors"]


def voc_colormap(n: int) -> List[List[int]]:
    """PASCAL VOC's colour map (the devkit's ``labelcolormap``): colour k spreads the bits of k
    over the high bits of R, G and B. Entry 0 is black (VOC's background)."""
    colors = []
    for k in range(n):
        r = g = b = 0
        c = k
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colors.append([r, g, b])
    return colors


def spread_colors(n: int) -> List[List[int]]:
    """``n`` distinct colours (VOC's colour map without black), for class-index pictures."""
    return voc_colormap(n + 1)[1:]
