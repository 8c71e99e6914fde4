"""Masked (per-pixel) execution of HRNet: its stages, branches and fuse layers.

The masked implementations of timm's HRNet modules (as :class:`~.backbones.HRNetBackbone`
wraps them), registered with :func:`~.masked.register_masked`; the contract is
:mod:`.masked`'s (a frozen output pixel of a convolution unit is 0, a residual block keeps its
shortcut there). HRNet's modules map a *list* of branches (finest first) to a list, so
``masked_forward`` takes and returns lists for them; one :class:`~.masked.PixelMask` gives
every branch's resolution (a coarse pixel is active if any finer pixel it covers is).

* A branch is a chain of timm ``BasicBlock`` / ``Bottleneck`` (masked.py's residual blocks).
* A **fuse layer** sums, for output branch ``i``, the identity of branch ``i`` and each other
  branch ``j`` brought to ``i``'s resolution, then applies ReLU. The paths from ``j`` are
  computed at the active pixels of ``i``'s resolution only (upsampling path: 1x1 conv + BN at
  the active pixels of ``j``'s resolution, then nearest upsampling at those of ``i``'s;
  downsampling path: strided 3x3 conv units, each at the active pixels of its own output).
  So a fused output pixel frozen at ``i``'s resolution is ``relu(x_i)``: it keeps the
  identity branch's value (bit for bit, since ``x_i`` comes out of a ReLU).
  ``SizeFusingHRModule`` (mmsegmentation's fusion) then resizes an upsampled path bilinearly
  to branch ``i``'s size where the two differ, at the active pixels (counted as fvcore counts
  a bilinear resize, 4 per output element).
* A **transition** (:class:`HRNetStage`) keeps the existing branches and makes a new one from
  the last with strided conv units: the new branch's frozen pixels are 0 (no shortcut).

:class:`~.backbones.timm_backbone.HRNetStage` is one stage as ``HRNetBackbone.forward_stages``
runs it (transition, then the stage's modules); ``HRNetBackbone.stage_modules()`` returns them
(``layer1``, ``stage2`` .. ``stage4``) and ``stage_outputs()`` names each stage's branches, the
list-valued stages of :mod:`.stagewise`'s contract, so policy ``pixel`` and mask-aware
training run HRNet through it.
"""
from __future__ import annotations

from typing import List, Optional

from torch import nn
from torch.nn import functional as F

from timm.models.hrnet import HighResolutionModule, SequentialList

from .backbones.timm_backbone import HRNetStage, SizeFusingHRModule
from .masked import (
    UPSAMPLE_ELEMENT_MACS, FlatMap, MaskedContext, MaskedNode, SeqNode, UnsupportedModuleError, check_activation,
    compile_masked, join_name, register_masked,
)

__all__: List[str] = []


class _Stage(MaskedNode):
    """:class:`HRNetStage`: the transition (identity or a new branch from the last), then the stage."""

    def __init__(self, transition: List[Optional[MaskedNode]], stage: MaskedNode, name: str):
        self.transition, self.stage, self.name = transition, stage, name

    def modules(self):
        return [m for t in self.transition if t is not None for m in t.modules()] + self.stage.modules()

    def _branches(self, x, run):
        yl = list(x) if isinstance(x, (list, tuple)) else [x]
        return [yl[i] if t is None else run(t, yl[-1]) for i, t in enumerate(self.transition)]

    def emulate(self, x, ctx):
        return self.stage.emulate(self._branches(x, lambda t, y: t.emulate(y, ctx)), ctx)

    def sparse(self, x, ctx):
        return self.stage.sparse(self._branches(x, lambda t, y: t.sparse(y, ctx)), ctx)


class _FusedBranches(MaskedNode):
    """``HighResolutionModule`` (and mmsegmentation's ``SizeFusingHRModule``): the branches,
    then the fuse layers, each output pixel frozen at its resolution keeping the identity
    branch's value (module docstring)."""

    def __init__(self, branches: List[MaskedNode], fuse: List[List[Optional[MaskedNode]]], act,
                 resize: bool, name: str):
        self.branches, self.fuse, self.act, self.resize, self.name = branches, fuse, act, resize, name

    def modules(self):
        out = [m for b in self.branches for m in b.modules()]
        out += [m for row in self.fuse for f in row if f is not None for m in f.modules()]
        return out + ([self.act] if self.act is not None else [])

    def _count_resize(self, ctx: MaskedContext, channels: int, size) -> None:
        ctx.count(join_name(self.name, "resize"), UPSAMPLE_ELEMENT_MACS["bilinear"] * channels, size, False)

    def emulate(self, x, ctx):
        xs = [b.emulate(t, ctx) for b, t in zip(self.branches, x)]
        if not self.fuse:
            return xs
        out = []
        for i, row in enumerate(self.fuse):
            size = tuple(xs[i].shape[-2:])
            y = None
            for j, f in enumerate(row):  # timm's order of the sum
                if f is None:
                    t = xs[j]
                else:
                    t = f.emulate(xs[j], ctx)
                    if self.resize and j > i and tuple(t.shape[-2:]) != size:
                        t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
                        self._count_resize(ctx, t.shape[1], size)
                        t = t * ctx.mask_weights(size, t.dtype)
                y = t if y is None else y + t
            out.append(self.act(y))
        return out

    def sparse(self, x, ctx):
        xs = [b.sparse(t, ctx) for b, t in zip(self.branches, x)]
        if not self.fuse:
            return xs
        out = []
        for i, row in enumerate(self.fuse):
            short = xs[i]
            idx = ctx.active_rows(short.n, short.size, False)
            rows = short.data[idx]
            for j, f in enumerate(row):
                if f is None:
                    continue
                if self.resize and j > i:
                    up = f.sparse(xs[j], ctx)
                    if up.size != short.size:
                        y = F.interpolate(up.nchw(), size=short.size, mode="bilinear", align_corners=False)
                        self._count_resize(ctx, y.shape[1], short.size)
                        rows = rows + y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])[idx]
                        continue
                    r, r_idx, shape = up.data[idx], idx, (up.n, up.h, up.w)
                else:
                    r, r_idx, shape = f.sparse_rows(xs[j], ctx)
                if shape != (short.n, short.h, short.w):
                    raise ValueError(f"Masked execution: fuse layer {self.name} {i}<-{j} gives {shape[1]}x{shape[2]}, "
                                     f"branch {i} is {short.h}x{short.w}.")
                rows = rows + r
            data = self.act(short.data.clone())
            data[-1].zero_()
            data[idx] = self.act(rows)
            out.append(FlatMap(data, short.n, short.h, short.w))
        return out


@register_masked(SequentialList)
def _compile_sequential_list(module: SequentialList, name: str) -> MaskedNode:
    # list -> list modules applied in turn: the chain node of nn.Sequential serves (its nodes take lists)
    return SeqNode([compile_masked(m, join_name(name, n)) for n, m in module.named_children()], name)


@register_masked(HRNetStage)
def _compile_stage(module: HRNetStage, name: str) -> MaskedNode:
    transition = [None if type(t) is nn.Identity else compile_masked(t, join_name(name, f"transition.{i}"))
                  for i, t in enumerate(module.transition)]
    return _Stage(transition, compile_masked(module.stage, join_name(name, "stage")), name)


@register_masked(HighResolutionModule, SizeFusingHRModule)
def _compile_hr_module(module: HighResolutionModule, name: str) -> MaskedNode:
    branches = [compile_masked(b, join_name(name, f"branches.{i}")) for i, b in enumerate(module.branches)]
    if module.num_branches == 1:  # no fuse layer, no activation (timm's forward)
        return _FusedBranches(branches, [], None, False, name)
    fuse = []
    for i, row in enumerate(module.fuse_layers):
        if type(row[i]) is not nn.Identity:
            raise UnsupportedModuleError(f"Masked execution: fuse layer {name}.fuse_layers.{i}.{i} must be the "
                                         f"identity, not {type(row[i]).__qualname__}.")
        fuse.append([None if j == i else compile_masked(f, join_name(name, f"fuse_layers.{i}.{j}"))
                     for j, f in enumerate(row)])
    act = check_activation(module.fuse_act, join_name(name, "fuse_act"))
    return _FusedBranches(branches, fuse, act, type(module) is SizeFusingHRModule, name)
