"""Masked (per-pixel) execution of backbone stages: frozen pixels are not computed.

Per-pixel anytime inference freezes the pixels an exit already answers confidently; the
later stages then only need to compute the pixels still *active*. This module runs one
stage (any module built from the supported types below) on such a mask:

* :class:`PixelMask`: the active pixels of each image, given once at one resolution, and
  derived for every other size a stage's tensors have (``at(size)``). A coarser pixel is
  active if any finer pixel its window covers is (max-pool, not nearest sampling: a pixel of
  a stride-2 output that sees one active input pixel is computed); a finer pixel takes the
  value of the coarser pixel that holds it (nearest).
* :func:`masked_forward` (``stage, x, mask, mode``) -> ``(y, MaskedReport)`` and
  :class:`MaskedStage` (the same, with the stage compiled and its BatchNorms folded once).

The contract (what a frozen pixel holds, written once for both modes)
----------------------------------------------------------------------
Every convolution unit (a ``Conv2d``, optionally followed by its norm and activation) computes
only the pixels active at *its output* size; its frozen output pixels are 0 (no halo: an
active pixel's neighbours in an intermediate map that are frozen read as 0, as the padding
does). A residual block adds the residual branch only at active pixels, so a frozen pixel of
its output is ``act(shortcut(x))``: with an identity shortcut (and a ReLU-family activation
after non-negative inputs, or none as in MobileNetV2) it keeps its input value bit for bit.
A projection shortcut (ResNet's strided 1x1 ``downsample``) is computed at every pixel, so
frozen pixels keep the shortcut; it is listed in ``MaskedReport.dense_ops``. A block without
a shortcut (MobileNetV2's first block of a stage) leaves frozen pixels at 0.

Modes
-----
* ``emulate``: dense tensors, the modules' own forwards, outputs multiplied by the mask:
  the reference semantics, differentiable (training may use it; BN then uses batch
  statistics over every pixel).
* ``sparse``: inference only (``eval()`` norms, their running statistics folded into the
  convolution). The stage's input is copied once into a channels-last buffer with one extra
  zero row; each convolution gathers the ``k x k`` patches of its active output pixels
  (out-of-image taps read the zero row, so no padded copy is made) in chunks, multiplies
  them with the folded weight in one GEMM (depthwise: a per-channel product and sum), applies
  the activation to those rows only and scatters them into the next buffer. A stage whose
  active share at its input exceeds ``max_active`` (default :data:`SPARSE_MAX_ACTIVE`) runs
  ``emulate`` instead (the same outputs; the gather does not pay there).

Counted cost (``MaskedReport.macs``, per image; the same in both modes and independent of the
fallback): per convolution, active output pixels x ``k_h k_w Cin Cout / groups``; per norm,
fvcore's eval-mode convention per output element (2 with affine parameters, 1 without; a
frozen BN's multiply-add is not counted by fvcore, so 0). With every pixel active the sum is
fvcore's count of the stage (tested). Activations and additions are not counted (fvcore
neither).

Supported modules (an explicit registry of exact types -> masked implementations,
:func:`register_masked`; a module of any other type is an :class:`UnsupportedModuleError`
naming it, subclasses included, since a subclass may compute something else):
``nn.Sequential`` (consecutive ``Conv2d`` -> norm -> activation fuse into one unit),
``nn.Conv2d`` (any kernel, stride, dilation, groups; zero padding), ``nn.Identity``, timm's
``BasicBlock`` / ``Bottleneck`` (ResNet; no SE, anti-aliasing, drop-block, drop-path or
avg-pool downsample) and ``InvertedResidual`` / ``DepthwiseSeparableConv`` (MobileNetV2; no
SE, no space-to-depth). Norms: ``BatchNorm2d``, ``SyncBatchNorm``, timm's ``BatchNormAct2d`` /
``SyncBatchNormAct`` and the frozen BNs its ``freeze_batch_norm_2d`` makes (torchvision's
``FrozenBatchNorm2d``, ``FrozenBatchNormAct2d``), detectron2's ``FrozenBatchNorm2d``. Activations: ``ReLU``, ``ReLU6``,
``Identity``. Not yet: HRNet's blocks and fuse layers, pooling, the heads' global ops.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import FrozenBatchNorm2d as D2FrozenBatchNorm2d
from timm.layers.norm_act import BatchNormAct2d, FrozenBatchNormAct2d, SyncBatchNormAct
from torchvision.ops.misc import FrozenBatchNorm2d  # what timm's freeze_batch_norm_2d makes of a BatchNorm2d
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models.resnet import BasicBlock, Bottleneck

__all__ = [
    "PixelMask", "MaskedReport", "MaskedStage", "masked_forward", "register_masked", "supported_modules",
    "UnsupportedModuleError", "MODES", "SPARSE_MAX_ACTIVE",
]

MODES = ("emulate", "sparse")
# Above this active share (at the stage's input) ``sparse`` runs the stage dense (``emulate``):
# the gather costs more than the skipped pixels save. Preliminary figure (two ResNet-18
# BasicBlocks, 64x128, 1 CPU thread: break-even at ~20 % frozen for 128-256 channels, ~39 % for
# 64); benchmarks/masked_breakeven.py measures it per width and map size.
SPARSE_MAX_ACTIVE = 0.8
# Rows x (k*k*Cin) floats gathered at once by a sparse convolution (bounds its memory: 8 MB).
GATHER_CHUNK = 1 << 21


class UnsupportedModuleError(TypeError):
    """A module that masked execution has no registered implementation for."""


# ----------------------------------------------------------------------------- the mask
class PixelMask:
    """The active pixels of a batch, at every size a stage's tensors have.

    Args:
        active: ``N x H x W`` boolean (or 0/1) tensor, True = the pixel is still computed.
    """

    def __init__(self, active: torch.Tensor):
        if active.dim() != 3:
            raise ValueError(f"PixelMask takes an N x H x W mask, got shape {tuple(active.shape)}.")
        self.active = active.bool()
        self._at: Dict[Tuple[int, int], torch.Tensor] = {tuple(active.shape[-2:]): self.active}

    @classmethod
    def full(cls, n: int, size: Sequence[int], device=None) -> "PixelMask":
        """Every pixel active."""
        return cls(torch.ones(n, *size, dtype=torch.bool, device=device))

    @property
    def batch_size(self) -> int:
        return self.active.shape[0]

    def at(self, size: Sequence[int]) -> torch.Tensor:
        """``N x h x w`` boolean: a pixel of a coarser map is active if any pixel of the given
        mask in its window is (adaptive max-pool windows, which cover every pixel and overlap
        where the sizes do not divide); a pixel of a finer map if the pixel holding it is."""
        size = (int(size[0]), int(size[1]))
        if size not in self._at:
            m = self.active[:, None].float()
            h, w = m.shape[-2:]
            up = (max(h, size[0]), max(w, size[1]))
            if up != (h, w):
                m = F.interpolate(m, size=up, mode="nearest")
            if up != size:
                m = F.adaptive_max_pool2d(m, size)
            self._at[size] = m[:, 0] > 0
        return self._at[size]

    def count(self, size: Sequence[int]) -> torch.Tensor:
        """Active pixels per image at ``size`` (``N`` int64)."""
        return self.at(size).flatten(1).sum(1)

    def share(self, size: Sequence[int]) -> float:
        """Active share of the whole batch at ``size``."""
        return float(self.at(size).float().mean())


# ----------------------------------------------------------------------------- report
@dataclass
class MaskedReport:
    """What a masked stage did.

    ``macs``: counted MACs per image (float64, ``N``; module docstring); ``dense_ops``: the
    modules computed at every pixel whatever the mask (projection shortcuts); ``sparse``: the
    sparse path ran (False for ``emulate`` and for a ``sparse`` call that fell back);
    ``active_share``: active share at the stage's input.
    """

    macs: torch.Tensor
    dense_ops: List[str] = field(default_factory=list)
    sparse: bool = False
    active_share: float = 1.0


class _Context:
    """One call's state: the mask, the cost being counted, the sparse path's index caches."""

    def __init__(self, mask: PixelMask, device):
        self.mask = mask
        self.macs = torch.zeros(mask.batch_size, dtype=torch.float64)
        self.dense_ops: List[str] = []
        self.device = device
        self.rows: Dict[Tuple, torch.Tensor] = {}
        self.taps: Dict[Tuple, torch.Tensor] = {}
        self.counts: Dict[Tuple[int, int], torch.Tensor] = {}
        self.weights: Dict[Tuple, torch.Tensor] = {}

    def count(self, name: str, per_pixel: float, size: Tuple[int, int], dense: bool) -> None:
        if dense:
            if name not in self.dense_ops:
                self.dense_ops.append(name)
            pixels = torch.full_like(self.macs, size[0] * size[1])
        else:
            if size not in self.counts:
                self.counts[size] = self.mask.count(size).to(torch.float64).cpu()
            pixels = self.counts[size]
        self.macs += pixels * per_pixel

    def mask_weights(self, size: Tuple[int, int], dtype) -> torch.Tensor:
        """``N x 1 x h x w`` 0/1 of the active pixels, to multiply an emulated output with."""
        key = (size, dtype)
        if key not in self.weights:
            self.weights[key] = self.mask.at(size).to(device=self.device, dtype=dtype)[:, None]
        return self.weights[key]

    def active_rows(self, n: int, size: Tuple[int, int], dense: bool) -> torch.Tensor:
        """Flat indices (into ``n * h * w``) of the pixels to compute at ``size``."""
        key = (size, dense)
        if key not in self.rows:
            if dense:
                self.rows[key] = torch.arange(n * size[0] * size[1], device=self.device)
            else:
                self.rows[key] = self.mask.at(size).to(self.device).flatten().nonzero()[:, 0]
        return self.rows[key]


class _Flat:
    """A sparse-path feature map: channels-last rows ``(N*H*W + 1) x C``, the last row zero
    (what out-of-image taps read)."""

    def __init__(self, data: torch.Tensor, n: int, h: int, w: int):
        self.data, self.n, self.h, self.w = data, n, h, w

    @classmethod
    def from_nchw(cls, x: torch.Tensor) -> "_Flat":
        n, c, h, w = x.shape
        data = x.new_empty(n * h * w + 1, c)
        data[:-1].view(n, h, w, c).copy_(x.permute(0, 2, 3, 1))
        data[-1].zero_()
        return cls(data, n, h, w)

    @classmethod
    def scatter(cls, rows: torch.Tensor, idx: torch.Tensor, n: int, h: int, w: int) -> "_Flat":
        data = rows.new_zeros(n * h * w + 1, rows.shape[1])
        data[idx] = rows
        return cls(data, n, h, w)

    def nchw(self) -> torch.Tensor:
        # a channels_last-strided NCHW view: no copy
        return self.data[:-1].view(self.n, self.h, self.w, -1).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- the plan nodes
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Identity)  # exact types: elementwise, f(0) = 0


def _bn_elements_fvcore(norm: nn.Module) -> int:
    """fvcore's eval-mode count per output element of ``aten::batch_norm`` (affine: 2)."""
    return 2 if norm.weight is not None else 1


# norm type -> fvcore's count per output element (frozen BNs are a multiply-add fvcore ignores)
_NORMS: Dict[type, Callable[[nn.Module], int]] = {
    nn.BatchNorm2d: _bn_elements_fvcore,
    nn.SyncBatchNorm: _bn_elements_fvcore,
    BatchNormAct2d: _bn_elements_fvcore,
    SyncBatchNormAct: _bn_elements_fvcore,
    FrozenBatchNorm2d: lambda m: 0,
    FrozenBatchNormAct2d: lambda m: 0,
    D2FrozenBatchNorm2d: lambda m: 0,
}
_NORMS_WITH_ACT = (BatchNormAct2d, SyncBatchNormAct, FrozenBatchNormAct2d)


def _check_activation(act: nn.Module, name: str) -> nn.Module:
    if type(act) not in _ACTIVATIONS:
        raise UnsupportedModuleError(
            f"Masked execution: activation {name} is a {type(act).__qualname__}; supported: "
            f"{[t.__name__ for t in _ACTIVATIONS]} (applied to active rows only, so it must map 0 to 0).")
    return act


def _check_identity(module: Optional[nn.Module], name: str, what: str) -> None:
    if module is not None and type(module) is not nn.Identity:
        raise UnsupportedModuleError(
            f"Masked execution does not support {what} ({name}: {type(module).__qualname__}); it needs None or "
            "nn.Identity there.")


def _fold(conv: nn.Conv2d, norm: Optional[nn.Module]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``norm(conv(x))`` as one convolution (running statistics)."""
    w = conv.weight.detach()
    b = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    if norm is None:
        return w, b
    scale = torch.rsqrt(norm.running_var.detach() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.detach()
    shift = -norm.running_mean.detach() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach()
    return w * scale.view(-1, 1, 1, 1), b * scale + shift


class _Node:
    name = ""

    def emulate(self, x: torch.Tensor, ctx: _Context) -> torch.Tensor:
        raise NotImplementedError

    def sparse(self, x: _Flat, ctx: _Context) -> _Flat:
        raise NotImplementedError

    def sparse_rows(self, x: _Flat, ctx: _Context):
        """``(rows, idx, (n, h, w))``: the output's active rows only (frozen rows are 0)."""
        raise UnsupportedModuleError(f"Masked execution: {self.name} cannot end a residual branch.")

    def modules(self) -> List[nn.Module]:
        return []


class _Identity(_Node):
    def emulate(self, x, ctx):
        return x

    def sparse(self, x, ctx):
        return x


class _ConvUnit(_Node):
    """``act(norm(conv(x)))`` computed at the active output pixels (``dense``: at every pixel)."""

    def __init__(self, conv: nn.Conv2d, norm: Optional[nn.Module], act: Optional[nn.Module], name: str,
                 dense: bool = False):
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise UnsupportedModuleError(
                f"Masked execution: {name} pads {conv.padding!r} / {conv.padding_mode!r}; it needs numeric zero padding.")
        self.conv, self.norm, self.name, self.dense = conv, norm, name, dense
        # the activation applied to rows: a BatchNormAct2d's own, or the module after the norm
        self.row_act = norm.act if isinstance(norm, _NORMS_WITH_ACT) else act
        self.extra_act = None if isinstance(norm, _NORMS_WITH_ACT) else act  # emulate calls it after the norm
        self.folded: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        kh, kw = conv.kernel_size
        self.per_pixel = kh * kw * conv.in_channels * conv.out_channels // conv.groups
        if norm is not None:
            self.per_pixel += _NORMS[type(norm)](norm) * conv.out_channels

    def modules(self):
        return [m for m in (self.conv, self.norm, self.extra_act) if m is not None]

    def out_size(self, h: int, w: int) -> Tuple[int, int]:
        c = self.conv
        return tuple((s + 2 * p - d * (k - 1) - 1) // st + 1
                     for s, p, d, k, st in zip((h, w), c.padding, c.dilation, c.kernel_size, c.stride))

    def emulate(self, x, ctx):
        y = self.conv(x)
        if self.norm is not None:
            y = self.norm(y)
        if self.extra_act is not None:
            y = self.extra_act(y)
        size = tuple(y.shape[-2:])
        ctx.count(self.name, self.per_pixel, size, self.dense)
        if self.dense:
            return y
        return y * ctx.mask_weights(size, y.dtype)

    def _taps(self, x: _Flat, out: Tuple[int, int], idx: torch.Tensor, ctx: _Context) -> torch.Tensor:
        """``P x (kh*kw)`` input rows each output pixel's taps read (the zero row outside)."""
        c = self.conv
        key = ((x.h, x.w), out, c.kernel_size, c.stride, c.padding, c.dilation, self.dense)
        if key not in ctx.taps:
            oh, ow = out
            n_i, rem = idx // (oh * ow), idx % (oh * ow)
            oi, oj = rem // ow, rem % ow
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = c.kernel_size, c.stride, c.padding, c.dilation
            di = torch.arange(kh, device=idx.device) * dh - ph
            dj = torch.arange(kw, device=idx.device) * dw - pw
            r = (oi * sh)[:, None, None] + di[None, :, None]
            col = (oj * sw)[:, None, None] + dj[None, None, :]
            valid = (r >= 0) & (r < x.h) & (col >= 0) & (col < x.w)
            flat = (n_i * (x.h * x.w))[:, None, None] + r * x.w + col
            ctx.taps[key] = torch.where(valid, flat, torch.full_like(flat, x.n * x.h * x.w)).flatten(1)
        return ctx.taps[key]

    def sparse_rows(self, x, ctx):
        out = self.out_size(x.h, x.w)
        ctx.count(self.name, self.per_pixel, out, self.dense)
        idx = ctx.active_rows(x.n, out, self.dense)
        if self.folded is None:
            self.folded = _fold(self.conv, self.norm)
        w, b = self.folded
        cout, cin_g, kh, kw = w.shape
        groups, taps_n = self.conv.groups, kh * kw
        cin = x.data.shape[1]
        if idx.numel() == 0:
            return x.data.new_zeros(0, cout), idx, (x.n, *out)
        if taps_n == 1 and self.conv.stride == (1, 1) and self.conv.padding == (0, 0):
            taps = idx[:, None]  # a 1x1 conv reads its own pixel
        else:
            taps = self._taps(x, out, idx, ctx)
        chunk = max(1, GATHER_CHUNK // (taps_n * cin))
        pieces = []
        if groups == 1:
            wmat = w.permute(2, 3, 1, 0).reshape(taps_n * cin, cout)  # (tap, cin) x cout
        elif groups == cin and cout == cin:
            wdw = w.reshape(cout, taps_n).t()  # depthwise: tap x channel
        else:
            wg = w.reshape(groups, cout // groups, cin_g, taps_n)
        for s in range(0, idx.numel(), chunk):
            t = taps[s:s + chunk]
            if taps_n == 1 and groups == 1 and t.numel() == x.n * x.h * x.w and out == (x.h, x.w):
                cols = x.data[:-1]  # every pixel of a 1x1 conv: no gather
            else:
                cols = x.data.index_select(0, t.reshape(-1))
            p = t.shape[0]
            if groups == 1:
                rows = torch.addmm(b, cols.view(p, taps_n * cin), wmat)
            elif groups == cin and cout == cin:
                rows = (cols.view(p, taps_n, cin) * wdw).sum(1) + b
            else:
                rows = torch.einsum("ptgc,goct->pgo", cols.view(p, taps_n, groups, cin_g), wg).reshape(p, cout) + b
            if self.row_act is not None:
                rows = self.row_act(rows)
            pieces.append(rows)
        rows = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return rows, idx, (x.n, *out)

    def sparse(self, x, ctx):
        rows, idx, (n, h, w) = self.sparse_rows(x, ctx)
        return _Flat.scatter(rows, idx, n, h, w)


class _Seq(_Node):
    def __init__(self, nodes: List[_Node], name: str):
        self.nodes, self.name = nodes, name

    def modules(self):
        return [m for node in self.nodes for m in node.modules()]

    def emulate(self, x, ctx):
        for node in self.nodes:
            x = node.emulate(x, ctx)
        return x

    def sparse(self, x, ctx):
        for node in self.nodes:
            x = node.sparse(x, ctx)
        return x

    def sparse_rows(self, x, ctx):
        for node in self.nodes[:-1]:
            x = node.sparse(x, ctx)
        return self.nodes[-1].sparse_rows(x, ctx)


class _Residual(_Node):
    """``act(shortcut(x) + branch(x))`` with the branch added at active pixels only."""

    def __init__(self, branch: _Node, shortcut: Optional[_Node], act: Optional[nn.Module], name: str):
        self.branch, self.shortcut, self.act, self.name = branch, shortcut, act, name

    def modules(self):
        return self.branch.modules() + (self.shortcut.modules() if self.shortcut else []) + (
            [self.act] if self.act is not None else [])

    def emulate(self, x, ctx):
        short = x if self.shortcut is None else self.shortcut.emulate(x, ctx)
        y = self.branch.emulate(x, ctx) + short  # the branch is already 0 at frozen pixels
        return y if self.act is None else self.act(y)

    def sparse(self, x, ctx):
        short = x if self.shortcut is None else self.shortcut.sparse(x, ctx)
        rows, idx, (n, h, w) = self.branch.sparse_rows(x, ctx)
        if (short.n, short.h, short.w) != (n, h, w):
            raise ValueError(f"Masked execution: the shortcut of {self.name} gives {short.h}x{short.w}, "
                             f"its branch {h}x{w}.")
        data = short.data.clone() if self.act is None else self.act(short.data.clone())
        data[-1].zero_()
        rows = rows + short.data[idx]
        data[idx] = rows if self.act is None else self.act(rows)
        return _Flat(data, n, h, w)


# ----------------------------------------------------------------------------- the registry
_COMPILERS: Dict[type, Callable[[nn.Module, str], _Node]] = {}


def register_masked(*types: type):
    """Register ``fn(module, name) -> node`` as the masked implementation of exactly ``types``."""
    def deco(fn):
        for t in types:
            _COMPILERS[t] = fn
        return fn
    return deco


def supported_modules() -> List[str]:
    """The module types masked execution implements (norms and activations only inside units)."""
    return sorted({t.__qualname__ for t in _COMPILERS})


def _compile(module: nn.Module, name: str) -> _Node:
    fn = _COMPILERS.get(type(module))
    if fn is None:
        raise UnsupportedModuleError(
            f"Masked execution has no implementation for {name or 'the stage'} ({type(module).__module__}."
            f"{type(module).__qualname__}); supported: {supported_modules()}, norms "
            f"{sorted(t.__name__ for t in _NORMS)} after a Conv2d. Register one with "
            "segdistill.modeling.masked.register_masked.")
    return fn(module, name)


def _join(prefix: str, child: str) -> str:
    return f"{prefix}.{child}" if prefix else child


@register_masked(nn.Sequential)
def _compile_sequential(module: nn.Sequential, name: str, dense: bool = False) -> _Node:
    items = list(module.named_children())
    nodes, i = [], 0
    while i < len(items):
        child_name, child = items[i]
        full = _join(name, child_name)
        if type(child) is nn.Conv2d:  # peephole: Conv2d [norm] [activation] is one unit
            norm = act = None
            if i + 1 < len(items) and type(items[i + 1][1]) in _NORMS:
                i += 1
                norm = items[i][1]
            if i + 1 < len(items) and type(items[i + 1][1]) in _ACTIVATIONS and type(items[i + 1][1]) is not nn.Identity:
                i += 1
                act = items[i][1]
            nodes.append(_conv_unit(child, norm, act, full, dense))
        elif type(child) in _NORMS or type(child) in _ACTIVATIONS and type(child) is not nn.Identity:
            raise UnsupportedModuleError(
                f"Masked execution: {full} ({type(child).__qualname__}) does not follow a Conv2d; norms and "
                "activations run only inside a Conv2d unit (they would change frozen pixels).")
        elif dense:
            raise UnsupportedModuleError(f"Masked execution: a projection shortcut ({full}) must be Conv2d + norm, "
                                         f"not {type(child).__qualname__}.")
        else:
            nodes.append(_compile(child, full))
        i += 1
    if not nodes:
        return _Identity()
    return nodes[0] if len(nodes) == 1 else _Seq(nodes, name)


def _conv_unit(conv, norm, act, name, dense=False) -> _ConvUnit:
    if isinstance(norm, _NORMS_WITH_ACT):
        _check_identity(norm.drop, f"{name}.drop", "dropout in a norm")
        _check_activation(norm.act, f"{name}.act")
    if act is not None:
        _check_activation(act, name)
    return _ConvUnit(conv, norm, act, name, dense)


@register_masked(nn.Conv2d)
def _compile_conv(module: nn.Conv2d, name: str) -> _Node:
    return _conv_unit(module, None, None, name)


@register_masked(nn.Identity)
def _compile_identity(module: nn.Identity, name: str) -> _Node:
    return _Identity()


def _norm(module: nn.Module, name: str) -> nn.Module:
    if type(module) not in _NORMS:
        raise UnsupportedModuleError(f"Masked execution: norm {name} is a {type(module).__qualname__}; supported: "
                                     f"{sorted(t.__name__ for t in _NORMS)}.")
    return module


def _shortcut(downsample: Optional[nn.Module], name: str) -> Optional[_Node]:
    if downsample is None:
        return None
    if type(downsample) is not nn.Sequential:
        raise UnsupportedModuleError(f"Masked execution: shortcut {name} is a {type(downsample).__qualname__}; "
                                     "it needs a Sequential(Conv2d, norm).")
    return _compile_sequential(downsample, name, dense=True)


@register_masked(BasicBlock)
def _compile_basic(b: BasicBlock, name: str) -> _Node:
    for attr, what in (("drop_block", "drop-block"), ("aa", "anti-aliasing"), ("se", "squeeze-excitation"),
                       ("drop_path", "drop-path")):
        _check_identity(getattr(b, attr), _join(name, attr), what)
    branch = _Seq([_conv_unit(b.conv1, _norm(b.bn1, _join(name, "bn1")), b.act1, _join(name, "conv1")),
                   _conv_unit(b.conv2, _norm(b.bn2, _join(name, "bn2")), None, _join(name, "conv2"))], name)
    return _Residual(branch, _shortcut(b.downsample, _join(name, "downsample")),
                     _check_activation(b.act2, _join(name, "act2")), name)


@register_masked(Bottleneck)
def _compile_bottleneck(b: Bottleneck, name: str) -> _Node:
    for attr, what in (("drop_block", "drop-block"), ("aa", "anti-aliasing"), ("se", "squeeze-excitation"),
                       ("drop_path", "drop-path")):
        _check_identity(getattr(b, attr), _join(name, attr), what)
    branch = _Seq([_conv_unit(b.conv1, _norm(b.bn1, _join(name, "bn1")), b.act1, _join(name, "conv1")),
                   _conv_unit(b.conv2, _norm(b.bn2, _join(name, "bn2")), b.act2, _join(name, "conv2")),
                   _conv_unit(b.conv3, _norm(b.bn3, _join(name, "bn3")), None, _join(name, "conv3"))], name)
    return _Residual(branch, _shortcut(b.downsample, _join(name, "downsample")),
                     _check_activation(b.act3, _join(name, "act3")), name)


def _check_efficientnet_block(b: nn.Module, name: str) -> None:
    if b.conv_s2d is not None:
        raise UnsupportedModuleError(f"Masked execution does not support space-to-depth ({name}.conv_s2d).")
    for attr, what in (("aa", "anti-aliasing"), ("se", "squeeze-excitation"), ("drop_path", "drop-path")):
        _check_identity(getattr(b, attr), _join(name, attr), what)


@register_masked(InvertedResidual)
def _compile_inverted_residual(b: InvertedResidual, name: str) -> _Node:
    _check_efficientnet_block(b, name)
    branch = _Seq([_conv_unit(b.conv_pw, _norm(b.bn1, _join(name, "bn1")), None, _join(name, "conv_pw")),
                   _conv_unit(b.conv_dw, _norm(b.bn2, _join(name, "bn2")), None, _join(name, "conv_dw")),
                   _conv_unit(b.conv_pwl, _norm(b.bn3, _join(name, "bn3")), None, _join(name, "conv_pwl"))], name)
    return _Residual(branch, None, None, name) if b.has_skip else branch


@register_masked(DepthwiseSeparableConv)
def _compile_depthwise_separable(b: DepthwiseSeparableConv, name: str) -> _Node:
    _check_efficientnet_block(b, name)
    branch = _Seq([_conv_unit(b.conv_dw, _norm(b.bn1, _join(name, "bn1")), None, _join(name, "conv_dw")),
                   _conv_unit(b.conv_pw, _norm(b.bn2, _join(name, "bn2")), None, _join(name, "conv_pw"))], name)
    return _Residual(branch, None, None, name) if b.has_skip else branch


# ----------------------------------------------------------------------------- entry points
class MaskedStage:
    """A stage compiled for masked execution (its BatchNorms folded on the first sparse call:
    build a new one after its weights change)."""

    def __init__(self, stage: nn.Module, name: str = ""):
        self.stage = stage
        self.plan = _compile(stage, name)

    def __call__(self, x: torch.Tensor, mask: PixelMask, mode: str = "sparse",
                 max_active: float = SPARSE_MAX_ACTIVE) -> Tuple[torch.Tensor, MaskedReport]:
        if mode not in MODES:
            raise ValueError(f"Unknown masked execution mode {mode!r}; choose from {list(MODES)}.")
        if mask.batch_size != x.shape[0]:
            raise ValueError(f"The mask has {mask.batch_size} images, the input {x.shape[0]}.")
        share = mask.share(x.shape[-2:])
        ctx = _Context(mask, x.device)
        if mode == "sparse" and share <= max_active:
            training = [m for m in self.plan.modules() if m.training]
            if training:
                raise RuntimeError(
                    f"Masked mode 'sparse' folds the norms' running statistics, but {len(training)} modules of the "
                    "stage are in training mode: call eval() first (mode 'emulate' trains).")
            with torch.no_grad():
                y = self.plan.sparse(_Flat.from_nchw(x), ctx).nchw()
            ran_sparse = True
        else:
            y = self.plan.emulate(x, ctx)
            ran_sparse = False
        return y, MaskedReport(ctx.macs, ctx.dense_ops, ran_sparse, share)


def masked_forward(stage: nn.Module, x: torch.Tensor, mask: PixelMask, mode: str = "sparse", *,
                   max_active: float = SPARSE_MAX_ACTIVE) -> Tuple[torch.Tensor, MaskedReport]:
    """Run ``stage`` on ``x`` computing only ``mask``'s active pixels (module docstring).

    Returns ``(y, MaskedReport)``. ``mode``: ``emulate`` or ``sparse``; ``sparse`` runs the
    stage as ``emulate`` when the active share at its input exceeds ``max_active``.
    Compiles ``stage`` on every call; hold a :class:`MaskedStage` to compile once."""
    return MaskedStage(stage)(x, mask, mode, max_active)

