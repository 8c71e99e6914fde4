"""Masked (per-pixel) execution of the exit heads: SR's ``ExitHead`` and ADP-C's ``RHExitHead``.

Under per-pixel anytime inference an exit evaluated after some pixels are frozen only has to
answer the pixels still active (ADP-C masks its exits' convolutions as it masks the backbone's).
The masked implementations here follow :mod:`.masked`'s contract and are registered with
:func:`~.masked.register_masked` (imported with ``segdistill.modeling``), so
``MaskedStage(exit_head)`` runs one.

What an exit's masked implementation computes
---------------------------------------------
It maps the exit's input feature to its segmentation logits at the common stride,
``exit(x, size, with_classifier=False).seg_logits``, computed at the pixels active at each size
it runs at (frozen logits 0); the caller resizes them to the input and keeps them where pixels
are active. ``size`` is not an argument of a masked stage: it is read from the mask, which is
given at the (padded) input size, as ``AnytimeSegmentor.run_pixel`` and mask-aware training
give it: ``size = exit_size(mask size, common_stride)``, the ``size`` both pass to the exit's
own forward. A mask smaller than the exit's input is refused (it cannot be the input's).

* ``sr`` (:class:`~.exits.heads.ExitHead`): the reduce conv unit (3x3 conv, norm, ReLU) at
  the active pixels of the stage's resolution; the bilinear resize to the common stride at the
  active output pixels, each reading its four source pixels (frozen ones hold 0), only where
  the sizes differ, as the exit's eager forward (its traced forward always resizes, an identity
  at the same size, and fvcore counts that: so is it counted here); the feature conv unit (3x3, norm), the ReLU and the
  segmenter (1x1) at the active pixels of the common stride.
* ``rh`` (:class:`~.exits.rh.RHExitHead`): every level is a local window operation (2x2
  average pooling, 1x1 convs, bilinear resizes), so every level is masked with the mask at its
  own size (max-pooled: a coarse pixel is active when any pixel it covers is); nothing is
  global, so nothing runs dense. An encoder step averages the 2x2 window of each active coarse
  pixel (its input as it is: the stage's frozen pixels hold what the stage left there; windows
  cut by the border divide by their in-image taps, as ``avg_pool2d(ceil_mode=True)``), then the
  1x1 conv unit there; a decoder step resizes (bilinear) to the level above at its active
  pixels, then the 1x1 conv unit; the last resize to the common stride and the segmenter at
  the active pixels of the common stride.

The multi-label classifier (training only, a global average) is not part of it. Counted MACs
(per image, the same in both modes): per convolution unit, per bilinear resize (4 per output
element) at the active output pixels, as :mod:`.masked` counts them; pooling and ReLU nothing
(fvcore neither). With every pixel active the count equals fvcore's of the exit's forward
(tested). ``sparse`` resizes by gathering the four source rows of each active output pixel
(no dense resize); the average pooling gathers its window's rows.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch.nn import functional as F

from .exits.heads import ExitHead, exit_size
from .exits.rh import RHExitHead
from .masked import (
    UPSAMPLE_ELEMENT_MACS, FlatMap, MaskedContext, MaskedNode, bilinear_rows, compile_masked, join_name, register_masked,
    row_indices,
)

__all__: List[str] = []


def _target_size(ctx: MaskedContext, x_size: Tuple[int, int], common_stride: int, name: str) -> Tuple[int, int]:
    """The exit's output size: ``exit_size`` of the mask's size (the padded input's)."""
    hw = tuple(ctx.mask.active.shape[-2:])
    if hw[0] < x_size[0] or hw[1] < x_size[1]:
        raise ValueError(f"Masked execution of exit {name}: the mask ({hw[0]}x{hw[1]}) must be given at the input "
                         f"size, which cannot be smaller than the exit's input ({x_size[0]}x{x_size[1]}).")
    return exit_size(hw, common_stride)


# ----------------------------------------------------------------------------- bilinear resize
def _resize_emulate(x: torch.Tensor, size: Tuple[int, int], ctx: MaskedContext, name: str) -> torch.Tensor:
    y = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    ctx.count(name, UPSAMPLE_ELEMENT_MACS["bilinear"] * x.shape[1], size, False)
    return y * ctx.mask_weights(size, y.dtype)


def _resize_sparse(x: FlatMap, size: Tuple[int, int], ctx: MaskedContext, name: str) -> FlatMap:
    idx = ctx.active_rows(x.n, size, False)
    ctx.count(name, UPSAMPLE_ELEMENT_MACS["bilinear"] * x.data.shape[1], size, False)
    return FlatMap.scatter(bilinear_rows(x, size, idx, ctx), idx, x.n, *size)


# ----------------------------------------------------------------------------- 2x2 average pooling (RH)
def _pool_emulate(x: torch.Tensor, ctx: MaskedContext) -> torch.Tensor:
    y = F.avg_pool2d(x, 2, 2, ceil_mode=True)
    return y * ctx.mask_weights(tuple(y.shape[-2:]), y.dtype)


def _pool_sparse(x: FlatMap, ctx: MaskedContext) -> FlatMap:
    out = ((x.h + 1) // 2, (x.w + 1) // 2)  # ceil_mode
    idx = ctx.active_rows(x.n, out, False)
    taps = row_indices(x, out, idx, (2, 2), (2, 2), (0, 0), (1, 1), ctx)
    inside = (taps != x.n * x.h * x.w).sum(1, keepdim=True).to(x.data.dtype)  # ceil_mode: divide by in-image taps
    total = x.data[taps[:, 0]]
    for k in range(1, 4):
        total = total + x.data[taps[:, k]]
    return FlatMap.scatter(total / inside, idx, x.n, *out)


# ----------------------------------------------------------------------------- the exit heads
class _SRExit(MaskedNode):
    """``ExitHead``: reduce unit, resize, feature unit, ReLU, segmenter (module docstring)."""

    def __init__(self, head: ExitHead, name: str):
        self.name, self.common_stride = name, head.common_stride
        self.reduce = compile_masked(head.reduce, join_name(name, "reduce"))
        self.feature = compile_masked(head.feature, join_name(name, "feature"))
        self.segmenter = compile_masked(head.segmenter, join_name(name, "segmenter"))

    def modules(self):
        return self.reduce.modules() + self.feature.modules() + self.segmenter.modules()

    def _count_identity_resize(self, channels: int, size, ctx) -> None:
        # the exit's traced forward (fvcore's count, an exported model) always resizes; eager
        # skips a resize to the same size, which would change nothing
        ctx.count(join_name(self.name, "resize"), UPSAMPLE_ELEMENT_MACS["bilinear"] * channels, size, False)

    def emulate(self, x, ctx):
        size = _target_size(ctx, tuple(x.shape[-2:]), self.common_stride, self.name)
        y = self.reduce.emulate(x, ctx)
        if tuple(y.shape[-2:]) != size:
            y = _resize_emulate(y, size, ctx, join_name(self.name, "resize"))
        else:
            self._count_identity_resize(y.shape[1], size, ctx)
        return self.segmenter.emulate(F.relu(self.feature.emulate(y, ctx)), ctx)

    def sparse(self, x, ctx):
        size = _target_size(ctx, x.size, self.common_stride, self.name)
        y = self.reduce.sparse(x, ctx)
        if y.size != size:
            y = _resize_sparse(y, size, ctx, join_name(self.name, "resize"))
        else:
            self._count_identity_resize(y.data.shape[1], size, ctx)
        y = self.feature.sparse(y, ctx)
        return self.segmenter.sparse(FlatMap(F.relu(y.data), y.n, y.h, y.w), ctx)  # relu(0) = 0: frozen rows stay 0


class _RHExit(MaskedNode):
    """``RHExitHead``: pooled 1x1 encoder, bilinear 1x1 decoder, resize, segmenter (module docstring)."""

    def __init__(self, head: RHExitHead, name: str):
        self.name, self.common_stride = name, head.common_stride
        self.encoder = [compile_masked(c, join_name(name, f"encoder.{i}")) for i, c in enumerate(head.encoder)]
        self.decoder = [compile_masked(c, join_name(name, f"decoder.{i}")) for i, c in enumerate(head.decoder)]
        self.segmenter = compile_masked(head.segmenter, join_name(name, "segmenter"))

    def modules(self):
        return [m for node in self.encoder + self.decoder + [self.segmenter] for m in node.modules()]

    def emulate(self, x, ctx):
        size = _target_size(ctx, tuple(x.shape[-2:]), self.common_stride, self.name)
        sizes = []  # each encoder level's input size, where the decoder returns
        for conv in self.encoder:
            sizes.append(tuple(x.shape[-2:]))
            x = conv.emulate(_pool_emulate(x, ctx), ctx)
        for i, (conv, up) in enumerate(zip(self.decoder, reversed(sizes[1:]))):
            x = conv.emulate(_resize_emulate(x, up, ctx, join_name(self.name, f"decoder.{i}.resize")), ctx)
        x = _resize_emulate(x, size, ctx, join_name(self.name, "resize"))
        return self.segmenter.emulate(x, ctx)

    def sparse(self, x, ctx):
        size = _target_size(ctx, x.size, self.common_stride, self.name)
        sizes = []
        for conv in self.encoder:
            sizes.append(x.size)
            x = conv.sparse(_pool_sparse(x, ctx), ctx)
        for i, (conv, up) in enumerate(zip(self.decoder, reversed(sizes[1:]))):
            x = conv.sparse(_resize_sparse(x, up, ctx, join_name(self.name, f"decoder.{i}.resize")), ctx)
        x = _resize_sparse(x, size, ctx, join_name(self.name, "resize"))
        return self.segmenter.sparse(x, ctx)


@register_masked(ExitHead)
def _compile_sr_exit(head: ExitHead, name: str) -> MaskedNode:
    return _SRExit(head, name)


@register_masked(RHExitHead)
def _compile_rh_exit(head: RHExitHead, name: str) -> MaskedNode:
    return _RHExit(head, name)
