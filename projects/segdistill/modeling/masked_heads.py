"""Masked (per-pixel) execution of the heads: DeepLabV3 (its ASPP), FCN and HRNetV2.

The masked implementations of segdistill's heads, registered with
:func:`~.masked.register_masked`; the contract is :mod:`.masked`'s. A head's masked
implementation maps its input, :func:`masked_head_input` (``features[head.in_features[0]]`` for
a head of one feature, the list ``[features[n] for n in head.in_features]`` for a head of
several, in that order: HRNetV2's branches, finest first), to its logits before the resize to
the input, ``head.forward_outputs(features)["logits"]`` (= ``predictor(forward_features(
features))``), computed at the active pixels of the head's stride (that of its first input;
frozen logits are 0); the caller resizes them (``head.predict_logits``) and keeps them where
pixels are active. Heads:

* :class:`~.heads.SegDeepLabV3Head` in every layout (detectron2's ``ASPP``, and
  :class:`~.heads.aspp.SegASPP` of mmsegmentation / CIRKD): the 1x1 and dilated 3x3 branches
  (depthwise-separable too), the projection, the bottleneck convs and the classifier are
  convolution units at the active pixels. The image pooling is global: the average over
  *every* pixel (frozen ones hold what the backbone kept there) and its 1x1 conv run dense and
  are listed in ``MaskedReport.dense_ops``; its broadcast back to the map (a bilinear resize of
  a 1x1 map, constant) is written at the active pixels and counted there as fvcore counts a
  bilinear resize (4 per output element). detectron2's ``crop`` pooling (a fixed window) is
  refused;
* :class:`~.heads.FCNHead`: its 3x3 convs, the concatenation of the input (as it is, frozen
  pixels included) with their output and the fuse conv, the classifier;
* :class:`~.heads.HRNetV2Head`: the coarser branches resized bilinearly (the head's
  ``align_corners``) to the first branch's size at its active pixels only (frozen ones 0;
  counted as fvcore counts a bilinear resize, 4 per output element, at the active ones), the
  concatenation with the first branch (as it is), the 1x1 conv-norm-ReLU and the classifier
  at the active pixels. The sparse path interpolates each active pixel from its four source
  pixels (PyTorch's source-index rule), so nothing is resized at frozen pixels.

Dropout is its own forward in ``emulate`` and the identity on the (``eval()``-only) sparse path.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import ASPP, DepthwiseSeparableConv2d

from .heads import FCNHead, HRNetV2Head, SegDeepLabV3Head
from .heads.aspp import SegASPP, SeparableConvNormReLU
from .masked import (
    UPSAMPLE_ELEMENT_MACS, FlatMap, MaskedContext, MaskedNode, SeqNode, UnsupportedModuleError, bilinear_rows,
    compile_conv_unit, compile_masked, join_name, register_masked,
)

__all__ = ["masked_head_input"]


def masked_head_input(head: nn.Module, features: Dict[str, torch.Tensor]) -> Union[torch.Tensor, List[torch.Tensor]]:
    """What a head's masked implementation takes (module docstring): its one input feature, or
    the list of its ``in_features`` (in that order) when it reads several."""
    names = list(head.in_features)
    return features[names[0]] if len(names) == 1 else [features[n] for n in names]


class _ASPP(MaskedNode):
    """ASPP: masked branches, the dense global image pooling broadcast at the active pixels,
    concatenation (pooling first or last), masked projection, dropout (module docstring)."""

    def __init__(self, branches: List[MaskedNode], pool_conv: MaskedNode, pool_first: bool, align_corners: bool,
                 project: MaskedNode, dropout: Optional[MaskedNode], dropout_p: float, module, name: str):
        self.branches, self.pool_conv, self.pool_first = branches, pool_conv, pool_first
        self.align_corners, self.project, self.dropout, self.dropout_p = align_corners, project, dropout, dropout_p
        self.module, self.name = module, name  # module: whose training flag detectron2's functional dropout reads

    def modules(self):
        out = [m for b in self.branches for m in b.modules()] + self.pool_conv.modules() + self.project.modules()
        return out + (self.dropout.modules() if self.dropout is not None else []) + [self.module]

    def _pooled(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """The global average (every pixel) and its conv, dense: ``N x C x 1 x 1``."""
        ctx.count(join_name(self.name, "image_pool"), x.shape[1], tuple(x.shape[-2:]), True)  # fvcore: input elements
        return self.pool_conv.emulate(F.adaptive_avg_pool2d(x, 1), ctx)

    def _count_broadcast(self, ctx, channels: int, size) -> None:
        ctx.count(join_name(self.name, "image_pool.resize"), UPSAMPLE_ELEMENT_MACS["bilinear"] * channels, size, False)

    def _order(self, outs, pooled):
        return [pooled] + outs if self.pool_first else outs + [pooled]

    def _dropout_emulate(self, y, ctx):
        if self.dropout is not None:
            return self.dropout.emulate(y, ctx)
        return F.dropout(y, self.dropout_p, training=self.module.training) if self.dropout_p > 0 else y

    def emulate(self, x, ctx):
        size = tuple(x.shape[-2:])
        pooled = self._pooled(x, ctx)
        pooled = F.interpolate(pooled, size=size, mode="bilinear", align_corners=self.align_corners)
        self._count_broadcast(ctx, pooled.shape[1], size)
        pooled = pooled * ctx.mask_weights(size, pooled.dtype)
        outs = [b.emulate(x, ctx) for b in self.branches]
        return self._dropout_emulate(self.project.emulate(torch.cat(self._order(outs, pooled), dim=1), ctx), ctx)

    def sparse(self, x, ctx):
        pooled = self._pooled(x.nchw(), ctx)[:, :, 0, 0]
        idx = ctx.active_rows(x.n, x.size, False)
        self._count_broadcast(ctx, pooled.shape[1], x.size)
        pooled = FlatMap.scatter(pooled[idx // (x.h * x.w)], idx, x.n, x.h, x.w)
        outs = [b.sparse(x, ctx) for b in self.branches]
        y = self.project.sparse(FlatMap.cat(self._order(outs, pooled)), ctx)
        return y  # dropout: the identity in eval()


def _d2_unit(conv, name: str, dense: bool = False) -> MaskedNode:
    return compile_conv_unit(conv, conv.norm, conv.activation, name, dense)


@register_masked(ASPP)
def _compile_d2_aspp(module: ASPP, name: str) -> MaskedNode:
    if module.pool_kernel_size is not None:
        raise UnsupportedModuleError(
            f"Masked execution: {name} pools a fixed window (MODEL.SEM_SEG_HEAD.ASPP_POOLING 'crop'); it supports the "
            "global image pooling (ASPP_POOLING 'global').")
    *convs, pool = module.convs
    branches = [compile_masked(c, join_name(name, f"convs.{i}")) for i, c in enumerate(convs)]
    pool_conv = _d2_unit(pool[1], join_name(name, f"convs.{len(convs)}.1"), dense=True)
    return _ASPP(branches, pool_conv, False, False, _d2_unit(module.project, join_name(name, "project")), None,
                 module.dropout, module, name)


@register_masked(SegASPP)
def _compile_seg_aspp(module: SegASPP, name: str) -> MaskedNode:
    branches = [compile_masked(b, join_name(name, f"branches.{i}")) for i, b in enumerate(module.branches)]
    return _ASPP(branches, _d2_unit(module.pool, join_name(name, "pool"), dense=True), module.pool_first,
                 module.align_corners, compile_masked(module.project, join_name(name, "project")),
                 compile_masked(module.dropout, join_name(name, "dropout")), 0.0, module, name)


@register_masked(DepthwiseSeparableConv2d, SeparableConvNormReLU)
def _compile_separable(module, name: str) -> MaskedNode:
    return SeqNode([compile_masked(module.depthwise, join_name(name, "depthwise")),
                    compile_masked(module.pointwise, join_name(name, "pointwise"))], name)


@register_masked(SegDeepLabV3Head)
def _compile_deeplabv3(head: SegDeepLabV3Head, name: str) -> MaskedNode:
    nodes = [compile_masked(head.aspp, join_name(name, "aspp"))]
    if head.bottleneck is not None:
        nodes.append(compile_masked(head.bottleneck, join_name(name, "bottleneck")))
    nodes.append(compile_masked(head.predictor, join_name(name, "predictor")))
    return SeqNode(nodes, name)


class _FCN(MaskedNode):
    """FCNHead: convs, [concatenation with the input, fuse conv], dropout, classifier."""

    def __init__(self, convs: MaskedNode, fuse: Optional[MaskedNode], tail: MaskedNode, name: str):
        self.convs, self.fuse, self.tail, self.name = convs, fuse, tail, name

    def modules(self):
        return self.convs.modules() + (self.fuse.modules() if self.fuse else []) + self.tail.modules()

    def emulate(self, x, ctx):
        y = self.convs.emulate(x, ctx)
        if self.fuse is not None:
            y = self.fuse.emulate(torch.cat([x, y], dim=1), ctx)
        return self.tail.emulate(y, ctx)

    def sparse(self, x, ctx):
        y = self.convs.sparse(x, ctx)
        if self.fuse is not None:
            y = self.fuse.sparse(FlatMap.cat([x, y]), ctx)
        return self.tail.sparse(y, ctx)


@register_masked(FCNHead)
def _compile_fcn(head: FCNHead, name: str) -> MaskedNode:
    fuse = None if head.fuse is None else compile_masked(head.fuse, join_name(name, "fuse"))
    tail = SeqNode([compile_masked(head.dropout, join_name(name, "dropout")),
                    compile_masked(head.predictor, join_name(name, "predictor"))], name)
    return _FCN(compile_masked(head.convs, join_name(name, "convs")), fuse, tail, name)


class _HRNetV2(MaskedNode):
    """HRNetV2Head: the branches resized to the first one's size at its active pixels and
    concatenated with it, then the 1x1 units (module docstring). Takes the list of branches."""

    def __init__(self, fuse: MaskedNode, predictor: MaskedNode, align_corners: bool, name: str):
        self.fuse, self.predictor, self.align_corners, self.name = fuse, predictor, align_corners, name

    def modules(self):
        return self.fuse.modules() + self.predictor.modules()

    @staticmethod
    def _branches(x) -> list:
        if not isinstance(x, (list, tuple)):
            raise TypeError("HRNetV2Head's masked implementation takes the list of its in_features' maps "
                            "(segdistill.modeling.masked_heads.masked_head_input), got one tensor.")
        return list(x)

    def _count_resize(self, ctx: MaskedContext, j: int, channels: int, size) -> None:
        ctx.count(join_name(self.name, f"resize.{j}"), UPSAMPLE_ELEMENT_MACS["bilinear"] * channels, size, False)

    def emulate(self, x, ctx):
        first, *rest = self._branches(x)
        size = tuple(first.shape[-2:])
        ups = [first]
        for j, t in enumerate(rest, 1):  # the head's own resize (concat_branches), kept at the active pixels
            up = F.interpolate(t, size=size, mode="bilinear", align_corners=self.align_corners)
            self._count_resize(ctx, j, up.shape[1], size)
            ups.append(up * ctx.mask_weights(size, up.dtype))
        return self.predictor.emulate(self.fuse.emulate(torch.cat(ups, dim=1), ctx), ctx)

    def sparse(self, x, ctx):
        first, *rest = self._branches(x)
        idx = ctx.active_rows(first.n, first.size, False)
        widths = [first.data.shape[1]] + [t.data.shape[1] for t in rest]
        data = first.data.new_zeros(first.data.shape[0], sum(widths))
        data[:, :widths[0]] = first.data  # the first branch as it is, frozen pixels included (emulate's)
        start = widths[0]
        for j, t in enumerate(rest, 1):
            self._count_resize(ctx, j, t.data.shape[1], first.size)
            data[idx, start:start + widths[j]] = bilinear_rows(t, first.size, idx, ctx, self.align_corners)
            start += widths[j]
        return self.predictor.sparse(self.fuse.sparse(FlatMap(data, first.n, first.h, first.w), ctx), ctx)


@register_masked(HRNetV2Head)
def _compile_hrnetv2(head: HRNetV2Head, name: str) -> MaskedNode:
    return _HRNetV2(compile_masked(head.fuse, join_name(name, "fuse")),
                    compile_masked(head.predictor, join_name(name, "predictor")), head.align_corners, name)
