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
a shortcut (MobileNetV2's first block of a stage) leaves frozen pixels at 0. A max-pool and an
upsampling compute their active output pixels only (frozen ones 0; a max-pool's out-of-image
taps read -inf, as its padding). HRNet's fuse layers (:mod:`.masked_hrnet`): a fused output
pixel frozen at its resolution keeps the identity branch's value. The heads
(:mod:`.masked_heads`): global operations (ASPP's image pooling) run at every pixel and are
listed in ``dense_ops``.

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
  the activation to those rows only and scatters them into the next buffer. A stage runs
  sparse only where the gather pays: its active share at its (finest) input exceeds neither
  ``max_active`` (default :data:`SPARSE_MAX_ACTIVE`) and that map has at least ``min_pixels``
  pixels per image (default :data:`SPARSE_MIN_PIXELS`); else it runs ``emulate`` (the same
  outputs and counted MACs, ``MaskedReport.sparse`` False).

Counted cost (``MaskedReport.macs``, per image; the same in both modes and independent of the
fallback): per convolution, active output pixels x ``k_h k_w Cin Cout / groups``; per norm,
fvcore's eval-mode convention per output element (2 with affine parameters, 1 without; a
frozen BN's multiply-add is not counted by fvcore, so 0); per upsampling, fvcore's count per
output element (:data:`UPSAMPLE_ELEMENT_MACS`: nearest 1, bilinear 4) at the active ones; a
dense operation its whole fvcore count. With every pixel active the sum is fvcore's count of
the stage (tested). Pooling, activations and additions are not counted (fvcore neither).

Supported modules (an explicit registry of exact types -> masked implementations,
:func:`register_masked`; a module of any other type is an :class:`UnsupportedModuleError`
naming it, subclasses included, since a subclass may compute something else):
``nn.Sequential`` (consecutive ``Conv2d`` -> norm -> activation fuse into one unit),
``nn.Conv2d`` (any kernel, stride, dilation, groups; zero padding), detectron2's ``Conv2d``
(with its own norm and ``relu`` activation), ``nn.Identity``, ``nn.MaxPool2d`` (the ResNet
stem's; no ``ceil_mode``), ``nn.Upsample`` (nearest, bilinear), ``nn.Dropout`` /
``nn.Dropout2d``, timm's ``BasicBlock`` / ``Bottleneck`` (ResNet; no SE, anti-aliasing,
drop-block, drop-path or avg-pool downsample) and ``InvertedResidual`` /
``DepthwiseSeparableConv`` (MobileNetV2; no SE, no space-to-depth). Registered in other files
(imported with ``segdistill.modeling``): HRNet's stages, ``HighResolutionModule`` (timm's and
mmsegmentation's fusion) and ``SequentialList`` (:mod:`.masked_hrnet`); the DeepLabV3 and FCN
heads with their ASPPs and separable convs, and the HRNetV2 head (:mod:`.masked_heads`); the ``sr``
and ``rh`` exit heads (:mod:`.masked_exits`; the mask given at the input size). Norms:
``BatchNorm2d``, ``SyncBatchNorm``, detectron2's ``NaiveSyncBatchNorm``, timm's ``BatchNormAct2d`` /
``SyncBatchNormAct`` and the frozen BNs its ``freeze_batch_norm_2d`` makes (torchvision's
``FrozenBatchNorm2d``, ``FrozenBatchNormAct2d``), detectron2's ``FrozenBatchNorm2d``.
Activations: ``ReLU``, ``ReLU6``, ``Identity``, the function ``relu``. A model whose norms were
folded (:mod:`.fold`, ``TEST.FOLD_BN``) runs too: a norm's place then holds an ``nn.Identity`` or
the activation of a timm ``*Act`` norm, and the unit is the convolution (its folded weight and bias)
with that activation.

A stage takes one tensor or a list of tensors (HRNet's branches; the HRNetV2 head's input) and
returns what its module returns. Implementations in other files build on the nodes exported
here (:class:`MaskedNode`: ``emulate`` on tensors, ``sparse`` / ``sparse_rows`` on
:class:`FlatMap` s; :func:`compile_masked` for children, :func:`compile_conv_unit` for a
convolution unit, :func:`row_indices` for windows).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import Conv2d as D2Conv2d, FrozenBatchNorm2d as D2FrozenBatchNorm2d, NaiveSyncBatchNorm
from timm.layers.norm_act import BatchNormAct2d, FrozenBatchNormAct2d, SyncBatchNormAct
from torchvision.ops.misc import FrozenBatchNorm2d  # what timm's freeze_batch_norm_2d makes of a BatchNorm2d
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models.resnet import BasicBlock, Bottleneck

from .fold import fold_conv_norm

__all__ = [
    "PixelMask", "MaskedReport", "MaskedStage", "masked_forward", "register_masked", "supported_modules",
    "UnsupportedModuleError", "MODES", "SPARSE_MAX_ACTIVE", "SPARSE_MIN_PIXELS",
    # for masked implementations registered in other files (masked_hrnet.py, masked_heads.py)
    "MaskedNode", "MaskedContext", "FlatMap", "SeqNode", "compile_masked", "compile_conv_unit", "join_name",
    "check_activation", "check_identity", "row_indices", "bilinear_rows", "UPSAMPLE_ELEMENT_MACS",
]

MODES = ("emulate", "sparse")
# Above this active share (at the stage's input) ``sparse`` runs the stage dense (``emulate``):
# the gather costs more than the skipped pixels save. Measured by benchmarks/masked_breakeven.py
# (two ResNet BasicBlocks, 1 CPU thread, docs/anytime.md): break-even at 17-50 % frozen on maps
# of 32x40 and more (64-512 channels, random and boundary masks), about 40 % in the median;
# never on 8x10 maps.
SPARSE_MAX_ACTIVE = 0.6
# Below this many pixels per image (at the stage's finest input map) ``sparse`` runs the stage
# dense (``emulate``) whatever the share: the gather's fixed cost outweighs too few pixels. From
# the same table: at 32x40 (1280 pixels) the break-even frozen share is 0.25-0.50 over widths
# and masks, at or near the 40 % frozen SPARSE_MAX_ACTIVE asks for; at 16x20 (320) it is
# 0.40-0.83 and never at 512 channels, and at 8x10 (80) never. So sparse runs from the smallest
# measured map on which it pays under SPARSE_MAX_ACTIVE, 32x40 (the stride-4 map of a padded
# 128x160 CamVid image); sizes between 16x20 and 32x40 are not measured and run emulate.
SPARSE_MIN_PIXELS = 32 * 40
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


class MaskedContext:
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


class FlatMap:
    """A sparse-path feature map: channels-last rows ``(N*H*W + 1) x C``, the last row zero
    (what out-of-image taps read)."""

    def __init__(self, data: torch.Tensor, n: int, h: int, w: int):
        self.data, self.n, self.h, self.w = data, n, h, w

    @classmethod
    def from_nchw(cls, x: torch.Tensor) -> "FlatMap":
        n, c, h, w = x.shape
        data = x.new_empty(n * h * w + 1, c)
        data[:-1].view(n, h, w, c).copy_(x.permute(0, 2, 3, 1))
        data[-1].zero_()
        return cls(data, n, h, w)

    @classmethod
    def scatter(cls, rows: torch.Tensor, idx: torch.Tensor, n: int, h: int, w: int) -> "FlatMap":
        data = rows.new_zeros(n * h * w + 1, rows.shape[1])
        data[idx] = rows
        return cls(data, n, h, w)

    @classmethod
    def cat(cls, maps: Sequence["FlatMap"]) -> "FlatMap":
        """The channel concatenation of maps of one size (``torch.cat(..., dim=1)``)."""
        if len({(m.n, m.h, m.w) for m in maps}) != 1:
            raise ValueError(f"Masked execution concatenates maps of one size, got {[(m.h, m.w) for m in maps]}.")
        return cls(torch.cat([m.data for m in maps], 1), maps[0].n, maps[0].h, maps[0].w)

    @property
    def size(self) -> Tuple[int, int]:
        return self.h, self.w

    def nchw(self) -> torch.Tensor:
        # a channels_last-strided NCHW view: no copy
        return self.data[:-1].view(self.n, self.h, self.w, -1).permute(0, 3, 1, 2)


def row_indices(x: FlatMap, out: Tuple[int, int], idx: torch.Tensor, kernel, stride, padding, dilation,
                ctx: MaskedContext, tag=None) -> torch.Tensor:
    """``P x (kh*kw)`` rows of ``x`` that the window of each output pixel ``idx`` (flat, into
    ``N*oh*ow``) reads; a tap outside the image reads the zero row (``N*H*W``). Cached per call."""
    key = ((x.h, x.w), out, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), tag)
    if key not in ctx.taps:
        oh, ow = out
        n_i, rem = idx // (oh * ow), idx % (oh * ow)
        oi, oj = rem // ow, rem % ow
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
        di = torch.arange(kh, device=idx.device) * dh - ph
        dj = torch.arange(kw, device=idx.device) * dw - pw
        r = (oi * sh)[:, None, None] + di[None, :, None]
        col = (oj * sw)[:, None, None] + dj[None, None, :]
        valid = (r >= 0) & (r < x.h) & (col >= 0) & (col < x.w)
        flat = (n_i * (x.h * x.w))[:, None, None] + r * x.w + col
        ctx.taps[key] = torch.where(valid, flat, torch.full_like(flat, x.n * x.h * x.w)).flatten(1)
    return ctx.taps[key]


def _bilinear_axis(n_in: int, n_out: int, align_corners: bool, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per output index along one axis: the two source indices and the second one's weight, by
    PyTorch's rule for a bilinear resize to a given size (``area_pixel_compute_source_index``, in
    float32 as its CPU kernel computes it for float32 maps)."""
    dst = torch.arange(n_out, dtype=torch.float32, device=device)
    if align_corners:
        src = dst * (float(n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    else:
        src = ((dst + 0.5) * (float(n_in) / n_out) - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    return i0, (i0 + 1).clamp(max=n_in - 1), (src - i0).clamp(0.0, 1.0)


def bilinear_rows(x: FlatMap, size: Tuple[int, int], idx: torch.Tensor, ctx: MaskedContext,
                  align_corners: bool = False) -> torch.Tensor:
    """``x`` resized bilinearly to ``size`` at the output pixels ``idx`` (flat, into
    ``N * size``) only: ``P x C`` rows, what ``F.interpolate(x, size, mode="bilinear",
    align_corners=align_corners)`` holds there, each read from its four source pixels (no dense
    resize; a frozen source pixel holds what ``x`` holds there). The axes' taps are cached per call."""
    key = ("bilinear", x.size, tuple(size), bool(align_corners))
    if key not in ctx.taps:
        ctx.taps[key] = (_bilinear_axis(x.h, size[0], align_corners, idx.device),
                         _bilinear_axis(x.w, size[1], align_corners, idx.device))
    (r0, r1, ly), (c0, c1, lx) = ctx.taps[key]
    per = size[0] * size[1]
    base, rem = (idx // per) * (x.h * x.w), idx % per
    oi, oj = rem // size[1], rem % size[1]
    ly, lx = ly[oi].to(x.data.dtype)[:, None], lx[oj].to(x.data.dtype)[:, None]
    top, bottom = base + r0[oi] * x.w, base + r1[oi] * x.w
    upper = x.data[top + c0[oj]] * (1 - lx) + x.data[top + c1[oj]] * lx
    lower = x.data[bottom + c0[oj]] * (1 - lx) + x.data[bottom + c1[oj]] * lx
    return upper * (1 - ly) + lower * ly


# ----------------------------------------------------------------------------- the plan nodes
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Identity)  # exact types: elementwise, f(0) = 0
_ACTIVATION_FUNCTIONS = (F.relu, torch.relu)  # detectron2's Conv2d takes its activation as a function
# fvcore's count per output element of a resampling (aten::upsample_*), by mode
UPSAMPLE_ELEMENT_MACS = {"nearest": 1, "bilinear": 4}


def _bn_elements_fvcore(norm: nn.Module) -> int:
    """fvcore's eval-mode count per output element of ``aten::batch_norm`` (affine: 2)."""
    return 2 if norm.weight is not None else 1


# norm type -> fvcore's count per output element (frozen BNs are a multiply-add fvcore ignores)
_NORMS: Dict[type, Callable[[nn.Module], int]] = {
    nn.BatchNorm2d: _bn_elements_fvcore,
    nn.SyncBatchNorm: _bn_elements_fvcore,
    NaiveSyncBatchNorm: _bn_elements_fvcore,  # detectron2's "SyncBN": plain BN at inference
    BatchNormAct2d: _bn_elements_fvcore,
    SyncBatchNormAct: _bn_elements_fvcore,
    FrozenBatchNorm2d: lambda m: 0,
    FrozenBatchNormAct2d: lambda m: 0,
    D2FrozenBatchNorm2d: lambda m: 0,
}
_NORMS_WITH_ACT = (BatchNormAct2d, SyncBatchNormAct, FrozenBatchNormAct2d)


def check_activation(act, name: str):
    """``act`` when it is a supported activation (a module of an exact type in ``_ACTIVATIONS``
    or one of ``_ACTIVATION_FUNCTIONS``), else an :class:`UnsupportedModuleError` naming it."""
    if type(act) not in _ACTIVATIONS and not any(act is f for f in _ACTIVATION_FUNCTIONS):
        raise UnsupportedModuleError(
            f"Masked execution: activation {name} is {getattr(act, '__qualname__', type(act).__qualname__)}; "
            f"supported: {[t.__name__ for t in _ACTIVATIONS]} and the functions relu (applied to active rows only, "
            "so it must map 0 to 0).")
    return act


def check_identity(module: Optional[nn.Module], name: str, what: str) -> None:
    if module is not None and type(module) is not nn.Identity:
        raise UnsupportedModuleError(
            f"Masked execution does not support {what} ({name}: {type(module).__qualname__}); it needs None or "
            "nn.Identity there.")


class MaskedNode:
    """A compiled module: ``emulate`` on dense tensors, ``sparse`` on :class:`FlatMap` s (a node
    of a list-valued module, HRNet's, takes and returns lists of them), ``sparse_rows`` the
    output's active rows only (what a residual sum or a fuse layer adds up), ``modules`` the
    torch modules it runs (the sparse path checks that none is training)."""

    name = ""

    def emulate(self, x: torch.Tensor, ctx: MaskedContext) -> torch.Tensor:
        raise NotImplementedError

    def sparse(self, x: FlatMap, ctx: MaskedContext) -> FlatMap:
        raise NotImplementedError

    def sparse_rows(self, x: FlatMap, ctx: MaskedContext):
        """``(rows, idx, (n, h, w))``: the output's active rows only (frozen rows are 0)."""
        raise UnsupportedModuleError(f"Masked execution: {self.name} cannot end a residual branch.")

    def modules(self) -> List[nn.Module]:
        return []


class _Identity(MaskedNode):
    def emulate(self, x, ctx):
        return x

    def sparse(self, x, ctx):
        return x


class _ConvUnit(MaskedNode):
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
        # detectron2's Conv2d applies its own norm and activation in its forward
        self.owns_norm_act = type(conv) is D2Conv2d
        self.folded: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        kh, kw = conv.kernel_size
        self.per_pixel = kh * kw * conv.in_channels * conv.out_channels // conv.groups
        if norm is not None:
            self.per_pixel += _NORMS[type(norm)](norm) * conv.out_channels

    def modules(self):
        return [m for m in (self.conv, self.norm, self.extra_act) if isinstance(m, nn.Module)]

    def out_size(self, h: int, w: int) -> Tuple[int, int]:
        c = self.conv
        return tuple((s + 2 * p - d * (k - 1) - 1) // st + 1
                     for s, p, d, k, st in zip((h, w), c.padding, c.dilation, c.kernel_size, c.stride))

    def emulate(self, x, ctx):
        y = self.conv(x)
        if self.norm is not None and not self.owns_norm_act:
            y = self.norm(y)
        if self.extra_act is not None and not self.owns_norm_act:
            y = self.extra_act(y)
        size = tuple(y.shape[-2:])
        ctx.count(self.name, self.per_pixel, size, self.dense)
        if self.dense:
            return y
        return y * ctx.mask_weights(size, y.dtype)

    def _taps(self, x: FlatMap, out: Tuple[int, int], idx: torch.Tensor, ctx: MaskedContext) -> torch.Tensor:
        c = self.conv
        return row_indices(x, out, idx, c.kernel_size, c.stride, c.padding, c.dilation, ctx, self.dense)

    def sparse_rows(self, x, ctx):
        out = self.out_size(x.h, x.w)
        ctx.count(self.name, self.per_pixel, out, self.dense)
        idx = ctx.active_rows(x.n, out, self.dense)
        if self.folded is None:
            self.folded = fold_conv_norm(self.conv, self.norm)
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
        return FlatMap.scatter(rows, idx, n, h, w)


class SeqNode(MaskedNode):
    def __init__(self, nodes: List[MaskedNode], name: str):
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


class _Residual(MaskedNode):
    """``act(shortcut(x) + branch(x))`` with the branch added at active pixels only."""

    def __init__(self, branch: MaskedNode, shortcut: Optional[MaskedNode], act: Optional[nn.Module], name: str):
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
        return FlatMap(data, n, h, w)


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _MaxPool(MaskedNode):
    """``nn.MaxPool2d`` at the active output pixels (frozen outputs 0, as a convolution unit's).
    Out-of-image taps read -inf, as its padding does; frozen input pixels read what the input
    holds there. fvcore counts no MACs for pooling, so neither does this."""

    def __init__(self, pool: nn.MaxPool2d, name: str):
        if pool.ceil_mode or pool.return_indices:
            raise UnsupportedModuleError(f"Masked execution: {name} (MaxPool2d) needs ceil_mode=False and "
                                         "return_indices=False.")
        self.pool, self.name = pool, name
        self.kernel, self.padding, self.dilation = _pair(pool.kernel_size), _pair(pool.padding), _pair(pool.dilation)
        self.stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size)

    def modules(self):
        return [self.pool]

    def out_size(self, h: int, w: int) -> Tuple[int, int]:
        return tuple((s + 2 * p - d * (k - 1) - 1) // st + 1
                     for s, p, d, k, st in zip((h, w), self.padding, self.dilation, self.kernel, self.stride))

    def emulate(self, x, ctx):
        y = self.pool(x)
        return y * ctx.mask_weights(tuple(y.shape[-2:]), y.dtype)

    def sparse_rows(self, x, ctx):
        out = self.out_size(x.h, x.w)
        idx = ctx.active_rows(x.n, out, False)
        c = x.data.shape[1]
        if idx.numel() == 0:
            return x.data.new_zeros(0, c), idx, (x.n, *out)
        taps = row_indices(x, out, idx, self.kernel, self.stride, self.padding, self.dilation, ctx)
        outside = (taps == x.n * x.h * x.w)[:, :, None]
        chunk = max(1, GATHER_CHUNK // (taps.shape[1] * c))
        pieces = []
        for s in range(0, idx.numel(), chunk):
            t = taps[s:s + chunk]
            cols = x.data.index_select(0, t.reshape(-1)).view(t.shape[0], t.shape[1], c)
            pieces.append(cols.masked_fill(outside[s:s + chunk], float("-inf")).amax(1))
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)), idx, (x.n, *out)

    def sparse(self, x, ctx):
        rows, idx, (n, h, w) = self.sparse_rows(x, ctx)
        return FlatMap.scatter(rows, idx, n, h, w)


class _Upsample(MaskedNode):
    """``nn.Upsample`` (nearest or bilinear) at the active output pixels, frozen outputs 0;
    counted as fvcore counts it, per output element (:data:`UPSAMPLE_ELEMENT_MACS`), at the
    active ones. ``sparse``: nearest reads each active pixel's source row (the map PyTorch's
    own nearest rule gives, computed once per size); bilinear resizes the (scattered) input
    map densely and keeps the active rows: a frozen input pixel reads 0 in both modes."""

    def __init__(self, up: nn.Upsample, name: str):
        if up.mode not in UPSAMPLE_ELEMENT_MACS:
            raise UnsupportedModuleError(f"Masked execution: {name} upsamples with mode {up.mode!r}; supported: "
                                         f"{sorted(UPSAMPLE_ELEMENT_MACS)}.")
        self.up, self.name = up, name

    def modules(self):
        return [self.up]

    def emulate(self, x, ctx):
        y = self.up(x)
        size = tuple(y.shape[-2:])
        ctx.count(self.name, UPSAMPLE_ELEMENT_MACS[self.up.mode] * y.shape[1], size, False)
        return y * ctx.mask_weights(size, y.dtype)

    def _source(self, x: FlatMap, ctx: MaskedContext) -> torch.Tensor:
        """Per output pixel of one image, the input pixel nearest reads (PyTorch's rule)."""
        key = ("nearest", x.size, self.up.size, self.up.scale_factor)
        if key not in ctx.taps:
            grid = torch.arange(x.h * x.w, dtype=torch.float64, device=x.data.device).view(1, 1, x.h, x.w)
            ctx.taps[key] = self.up(grid)[0, 0].long()
        return ctx.taps[key]

    def sparse_rows(self, x, ctx):
        if self.up.mode == "nearest":
            src = self._source(x, ctx)
            out = tuple(src.shape)
            idx = ctx.active_rows(x.n, out, False)
            per = out[0] * out[1]
            rows = x.data[(idx // per) * (x.h * x.w) + src.flatten()[idx % per]]
        else:
            y = self.up(x.nchw())
            out = tuple(y.shape[-2:])
            idx = ctx.active_rows(x.n, out, False)
            rows = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])[idx]
        ctx.count(self.name, UPSAMPLE_ELEMENT_MACS[self.up.mode] * x.data.shape[1], out, False)
        return rows, idx, (x.n, *out)

    def sparse(self, x, ctx):
        rows, idx, (n, h, w) = self.sparse_rows(x, ctx)
        return FlatMap.scatter(rows, idx, n, h, w)


class _Dropout(MaskedNode):
    """Dropout: its own forward in ``emulate`` (0 stays 0); the identity on the sparse path,
    which runs in ``eval()`` only."""

    def __init__(self, module: nn.Module, name: str):
        self.module, self.name = module, name

    def modules(self):
        return [self.module]

    def emulate(self, x, ctx):
        return self.module(x)

    def sparse(self, x, ctx):
        return x


# ----------------------------------------------------------------------------- the registry
_COMPILERS: Dict[type, Callable[[nn.Module, str], MaskedNode]] = {}


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


def compile_masked(module: nn.Module, name: str) -> MaskedNode:
    fn = _COMPILERS.get(type(module))
    if fn is None:
        raise UnsupportedModuleError(
            f"Masked execution has no implementation for {name or 'the stage'} ({type(module).__module__}."
            f"{type(module).__qualname__}); supported: {supported_modules()}, norms "
            f"{sorted(t.__name__ for t in _NORMS)} after a Conv2d. Register one with "
            "segdistill.modeling.masked.register_masked.")
    return fn(module, name)


def join_name(prefix: str, child: str) -> str:
    return f"{prefix}.{child}" if prefix else child


@register_masked(nn.Sequential)
def _compile_sequential(module: nn.Sequential, name: str, dense: bool = False) -> MaskedNode:
    items = list(module.named_children())
    nodes, i = [], 0
    while i < len(items):
        child_name, child = items[i]
        full = join_name(name, child_name)
        if type(child) is nn.Conv2d:  # peephole: Conv2d [norm] [activation] is one unit
            norm = act = None
            if i + 1 < len(items) and type(items[i + 1][1]) in _NORMS:
                i += 1
                norm = items[i][1]
            elif i + 1 < len(items) and type(items[i + 1][1]) is nn.Identity:
                i += 1  # the place of a norm folded into the convolution (modeling/fold.py)
            if i + 1 < len(items) and type(items[i + 1][1]) in _ACTIVATIONS and type(items[i + 1][1]) is not nn.Identity:
                i += 1
                act = items[i][1]
            nodes.append(compile_conv_unit(child, norm, act, full, dense))
        elif type(child) in _NORMS or type(child) in _ACTIVATIONS and type(child) is not nn.Identity:
            raise UnsupportedModuleError(
                f"Masked execution: {full} ({type(child).__qualname__}) does not follow a Conv2d; norms and "
                "activations run only inside a Conv2d unit (they would change frozen pixels).")
        elif dense:
            raise UnsupportedModuleError(f"Masked execution: a projection shortcut ({full}) must be Conv2d + norm, "
                                         f"not {type(child).__qualname__}.")
        else:
            nodes.append(compile_masked(child, full))
        i += 1
    if not nodes:
        return _Identity()
    return nodes[0] if len(nodes) == 1 else SeqNode(nodes, name)


def compile_conv_unit(conv: nn.Conv2d, norm: Optional[nn.Module], act, name: str, dense: bool = False) -> MaskedNode:
    """``act(norm(conv(x)))`` as one unit, computed at the active output pixels (``dense``: at
    every pixel, counted as such and listed in ``dense_ops``); the norm and activation checked."""
    if norm is not None:
        _norm(norm, join_name(name, "norm"))
    if isinstance(norm, _NORMS_WITH_ACT):
        check_identity(norm.drop, f"{name}.drop", "dropout in a norm")
        check_activation(norm.act, f"{name}.act")
    if act is not None:
        check_activation(act, name)
    return _ConvUnit(conv, norm, act, name, dense)


@register_masked(nn.Conv2d)
def _compile_conv(module: nn.Conv2d, name: str) -> MaskedNode:
    return compile_conv_unit(module, None, None, name)


@register_masked(D2Conv2d)
def _compile_d2_conv(module: D2Conv2d, name: str) -> MaskedNode:
    """detectron2's Conv2d: its own ``norm`` and ``activation`` (a function) are the unit's."""
    return compile_conv_unit(module, module.norm, module.activation, name)


@register_masked(nn.Identity)
def _compile_identity(module: nn.Identity, name: str) -> MaskedNode:
    return _Identity()


@register_masked(nn.MaxPool2d)
def _compile_max_pool(module: nn.MaxPool2d, name: str) -> MaskedNode:
    return _MaxPool(module, name)


@register_masked(nn.Upsample)
def _compile_upsample(module: nn.Upsample, name: str) -> MaskedNode:
    return _Upsample(module, name)


@register_masked(nn.Dropout, nn.Dropout2d)
def _compile_dropout(module: nn.Module, name: str) -> MaskedNode:
    return _Dropout(module, name)


def _norm(module: nn.Module, name: str) -> nn.Module:
    if type(module) not in _NORMS:
        raise UnsupportedModuleError(f"Masked execution: norm {name} is a {type(module).__qualname__}; supported: "
                                     f"{sorted(t.__name__ for t in _NORMS)}.")
    return module


def _unit(block: nn.Module, conv: str, norm: str, act, name: str) -> MaskedNode:
    """A block's ``conv -> norm -> act`` unit (its children named ``conv`` and ``norm``), where the
    norm may also be what a folded norm left in its place (modeling/fold.py): an ``nn.Identity``,
    or a timm ``*Act`` norm's activation."""
    module = getattr(block, norm)
    if type(module) is nn.Identity:
        module = None
    elif type(module) not in _NORMS and type(module) in _ACTIVATIONS and act is None:
        module, act = None, module
    else:
        _norm(module, join_name(name, norm))
    return compile_conv_unit(getattr(block, conv), module, act, join_name(name, conv))


def _shortcut(downsample: Optional[nn.Module], name: str) -> Optional[MaskedNode]:
    if downsample is None:
        return None
    if type(downsample) is not nn.Sequential:
        raise UnsupportedModuleError(f"Masked execution: shortcut {name} is a {type(downsample).__qualname__}; "
                                     "it needs a Sequential(Conv2d, norm).")
    return _compile_sequential(downsample, name, dense=True)


@register_masked(BasicBlock)
def _compile_basic(b: BasicBlock, name: str) -> MaskedNode:
    for attr, what in (("drop_block", "drop-block"), ("aa", "anti-aliasing"), ("se", "squeeze-excitation"),
                       ("drop_path", "drop-path")):
        check_identity(getattr(b, attr), join_name(name, attr), what)
    branch = SeqNode([_unit(b, "conv1", "bn1", b.act1, name),
                      _unit(b, "conv2", "bn2", None, name)], name)
    return _Residual(branch, _shortcut(b.downsample, join_name(name, "downsample")),
                     check_activation(b.act2, join_name(name, "act2")), name)


@register_masked(Bottleneck)
def _compile_bottleneck(b: Bottleneck, name: str) -> MaskedNode:
    for attr, what in (("drop_block", "drop-block"), ("aa", "anti-aliasing"), ("se", "squeeze-excitation"),
                       ("drop_path", "drop-path")):
        check_identity(getattr(b, attr), join_name(name, attr), what)
    branch = SeqNode([_unit(b, "conv1", "bn1", b.act1, name),
                      _unit(b, "conv2", "bn2", b.act2, name),
                      _unit(b, "conv3", "bn3", None, name)], name)
    return _Residual(branch, _shortcut(b.downsample, join_name(name, "downsample")),
                     check_activation(b.act3, join_name(name, "act3")), name)


def _check_efficientnet_block(b: nn.Module, name: str) -> None:
    if b.conv_s2d is not None:
        raise UnsupportedModuleError(f"Masked execution does not support space-to-depth ({name}.conv_s2d).")
    for attr, what in (("aa", "anti-aliasing"), ("se", "squeeze-excitation"), ("drop_path", "drop-path")):
        check_identity(getattr(b, attr), join_name(name, attr), what)


@register_masked(InvertedResidual)
def _compile_inverted_residual(b: InvertedResidual, name: str) -> MaskedNode:
    _check_efficientnet_block(b, name)
    branch = SeqNode([_unit(b, "conv_pw", "bn1", None, name),
                      _unit(b, "conv_dw", "bn2", None, name),
                      _unit(b, "conv_pwl", "bn3", None, name)], name)
    return _Residual(branch, None, None, name) if b.has_skip else branch


@register_masked(DepthwiseSeparableConv)
def _compile_depthwise_separable(b: DepthwiseSeparableConv, name: str) -> MaskedNode:
    _check_efficientnet_block(b, name)
    branch = SeqNode([_unit(b, "conv_dw", "bn1", None, name),
                      _unit(b, "conv_pw", "bn2", None, name)], name)
    return _Residual(branch, None, None, name) if b.has_skip else branch


# ----------------------------------------------------------------------------- entry points
Features = Union[torch.Tensor, List[torch.Tensor]]  # one map, or HRNet's branches (finest first)


class MaskedStage:
    """A stage compiled for masked execution (its BatchNorms folded on the first sparse call:
    build a new one after its weights change). A stage takes one ``N x C x H x W`` tensor, or a
    list of them (HRNet's branches), and returns what its module returns."""

    def __init__(self, stage: nn.Module, name: str = ""):
        self.stage = stage
        self.plan = compile_masked(stage, name)

    @classmethod
    def or_dense(cls, module: nn.Module, name: str = "") -> Optional["MaskedStage"]:
        """``module`` compiled, or None where masked execution has no implementation of it (a
        head or an exit the caller then runs dense, listed in its ``dense_ops``)."""
        try:
            return cls(module, name)
        except UnsupportedModuleError:
            return None

    def __call__(self, x: Features, mask: PixelMask, mode: str = "sparse",
                 max_active: float = SPARSE_MAX_ACTIVE,
                 min_pixels: int = SPARSE_MIN_PIXELS) -> Tuple[Features, MaskedReport]:
        if mode not in MODES:
            raise ValueError(f"Unknown masked execution mode {mode!r}; choose from {list(MODES)}.")
        maps = list(x) if isinstance(x, (list, tuple)) else [x]
        if any(mask.batch_size != t.shape[0] for t in maps):
            raise ValueError(f"The mask has {mask.batch_size} images, the input {[t.shape[0] for t in maps]}.")
        # the share and size at the finest input map (a list's coarser branches cover the same pixels)
        finest = max((tuple(t.shape[-2:]) for t in maps), key=lambda hw: hw[0] * hw[1])
        share = mask.share(finest)
        ctx = MaskedContext(mask, maps[0].device)
        if mode == "sparse" and share <= max_active and finest[0] * finest[1] >= min_pixels:
            training = [m for m in self.plan.modules() if m.training]
            if training:
                raise RuntimeError(
                    f"Masked mode 'sparse' folds the norms' running statistics, but {len(training)} modules of the "
                    "stage are in training mode: call eval() first (mode 'emulate' trains).")
            with torch.no_grad():  # a list in (HRNet's branches) gives a list (a stage) or one map (its head)
                flat = [FlatMap.from_nchw(t) for t in maps] if isinstance(x, (list, tuple)) else FlatMap.from_nchw(x)
                y = self.plan.sparse(flat, ctx)
                y = [f.nchw() for f in y] if isinstance(y, list) else y.nchw()
            ran_sparse = True
        else:
            y = self.plan.emulate(list(x) if isinstance(x, (list, tuple)) else x, ctx)
            ran_sparse = False
        return y, MaskedReport(ctx.macs, ctx.dense_ops, ran_sparse, share)


def masked_forward(stage: nn.Module, x: Features, mask: PixelMask, mode: str = "sparse", *,
                   max_active: float = SPARSE_MAX_ACTIVE,
                   min_pixels: int = SPARSE_MIN_PIXELS) -> Tuple[Features, MaskedReport]:
    """Run ``stage`` on ``x`` (a tensor, or a list of HRNet branches) computing only ``mask``'s
    active pixels (module docstring).

    Returns ``(y, MaskedReport)``. ``mode``: ``emulate`` or ``sparse``; ``sparse`` runs the
    stage as ``emulate`` when the active share at its (finest) input exceeds ``max_active`` or
    that map has fewer than ``min_pixels`` pixels per image (``max_active`` 1, ``min_pixels`` 0:
    always sparse). Compiles ``stage`` on every call; hold a :class:`MaskedStage` to compile once."""
    return MaskedStage(stage)(x, mask, mode, max_active, min_pixels)
