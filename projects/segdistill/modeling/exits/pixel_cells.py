"""Which pixels an exit freezes: the one rule of per-pixel anytime inference
(``AnytimeSegmentor`` policy ``pixel``) and of mask-aware training (:mod:`.pixel_training`),
so that training decides exactly as inference does.

Decision cells (``MODEL.EXITS.PIXEL.CELL = c``, an integer >= 1): the padded input is tiled
into ``c x c`` cells from the top-left (the last row and column of cells may be partial).
After an exit, a cell is frozen when every pixel of it that is still active and inside the
image has a top softmax probability at least the threshold (the minimum over the cell); its
still-active pixels are then frozen together. A pixel below the threshold inside the image
is therefore never frozen. The padding's pixels never hold back a cell that has image
pixels; a cell wholly in the padding is decided by its own active pixels. ``c = 1`` is the
per-pixel decision: each pixel frozen when its own top probability reaches the threshold.

Why cells: an exit's answer is decided at the input size, but the later stages run on coarse
maps, where a pixel stays active when any input pixel it covers is
(:class:`~segdistill.modeling.masked.PixelMask`'s max-pool rule). Scattered frozen pixels
therefore save little on an 8x10 or 15x20 map (CamVid DS, 120x160: 62 % of the input pixels
frozen before res5, 22 % of the counted MACs saved). With ``c`` equal to a stage's stride, a
stage's map pixel is active exactly when its cell is, as ADP-C decides at its exits' stride.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from detectron2.config import CfgNode as CN

from ...config import ConfigError, register_config_hook

__all__ = ["add_pixel_cell_config", "check_pixel_cell", "freeze_decision"]


@register_config_hook
def add_pixel_cell_config(cfg) -> None:
    """``MODEL.EXITS.PIXEL.CELL``: the side of the decision cells (module docstring)."""
    if "PIXEL" not in cfg.MODEL.EXITS:
        cfg.MODEL.EXITS.PIXEL = CN()
    if "CELL" not in cfg.MODEL.EXITS.PIXEL:
        # Policy "pixel" and mask-aware training freeze c x c cells of the input at once (every
        # active pixel of the cell confident); 1 = each pixel on its own.
        cfg.MODEL.EXITS.PIXEL.CELL = 1


def check_pixel_cell(value) -> int:
    """``value`` as an int >= 1, else a ConfigError naming the key."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"MODEL.EXITS.PIXEL.CELL is {value!r}; write an integer >= 1, e.g. MODEL.EXITS.PIXEL.CELL 16 "
                          "(a stage's stride) or 1 (each pixel decides alone).")
    return int(value)


def freeze_decision(top: torch.Tensor, active: torch.Tensor, threshold: float, cell: int = 1,
                    inside: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The pixels an exit freezes (``N x H x W`` bool, a subset of ``active``).

    Args:
        top: ``N x H x W``, each pixel's top softmax probability of the exit's answer.
        active: ``N x H x W`` bool, the pixels still active.
        threshold: a pixel is confident when ``top >= threshold``.
        cell: the side of the decision cells (module docstring); 1 = per pixel.
        inside: ``N x H x W`` (or ``1 x H x W``) bool, the image's own part (False in the
            padding); None = every pixel.
    """
    doubt = active & ~(top >= threshold)  # active pixels that would veto their cell
    if cell == 1:  # each pixel its own cell: only its own confidence counts, in or outside the image
        return active & ~doubt
    h, w = active.shape[-2:]

    def any_in_cell(m):  # N x H x W bool -> per cell (ceil(H / c) x ceil(W / c)): any pixel set
        return F.max_pool2d(m[:, None].float(), cell, cell, ceil_mode=True)[:, 0] > 0

    veto = any_in_cell(doubt)
    if inside is not None:  # a cell with active image pixels: only those decide it
        own = any_in_cell(active & inside)
        veto = torch.where(own, any_in_cell(doubt & inside), veto)
    veto = veto.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2)[:, :h, :w]
    return active & ~veto
