"""Masked (per-pixel) execution of the exit heads: segdistill.modeling.masked_exits.

SR's exit (3x3 reduce unit, bilinear resize to the common stride, 3x3 feature unit, ReLU, 1x1
segmenter) on stages finer than and at the common stride, and ADP-C's RH exit (1-3 pooled 1x1
levels) on an odd input size (ceil-mode pooling, resizes that do not divide). The reference with
every pixel active is the exit's own ``forward(x, size, with_classifier=False).seg_logits``;
``sparse`` is checked against ``emulate`` on masks; counted MACs are fvcore's at 100 % and, on
masks, the brute-force sum over the exit's convolutions and resizes of their per-pixel cost times
the active pixels at their output size.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import segdistill.modeling  # noqa: F401  (registers the masked implementations)
from segdistill.modeling.exits.heads import ExitHead, exit_size
from segdistill.modeling.exits.rh import RHExitHead
from segdistill.modeling.masked import MaskedStage, PixelMask
from test_masked import TOL, border_masks, boundary_mask, fvcore_count, random_mask, randomise_norms

INPUT = (45, 61)  # odd: every level's size rounds up
STRIDE = 8  # the exits' common stride
CIN, CHANNELS, K = 12, 10, 5
EXITS = {  # name -> (head, options, stride of the exit's input)
    "sr_stride4": ("sr", {}, 4),  # resized down to the common stride
    "sr_stride8": ("sr", {}, 8),  # already there: no resize
    "sr_stride16": ("sr", {}, 16),  # resized up
    "rh_3_levels": ("rh", {"levels": 3}, 4),
    "rh_2_levels": ("rh", {"levels": 2}, 8),
    "rh_1_level": ("rh", {"levels": 1}, 16),
}


class Logits(nn.Module):
    """What an exit's masked implementation computes: its logits at the common stride."""

    def __init__(self, head, size):
        super().__init__()
        self.head, self.size = head, size

    def forward(self, x):
        return self.head(x, self.size, with_classifier=False).seg_logits


def make_exit(kind):
    head, options, stride = EXITS[kind]
    cls = ExitHead if head == "sr" else RHExitHead
    torch.manual_seed(0)
    ex = cls(in_channels=CIN, num_classes=K, channels=CHANNELS, common_stride=STRIDE, norm="BN",
             with_classifier=True, **options)
    with torch.no_grad():  # logits of order 1, so that 1e-5 means something
        nn.init.normal_(ex.segmenter.weight, 0, 1.0 / CHANNELS ** 0.5)
    x = torch.randn(2, CIN, *(-(-s // stride) for s in INPUT), generator=torch.Generator().manual_seed(1))
    return randomise_norms(ex), x


def blocky_mask(n, seed, share=0.4, block=8):
    """Frozen regions in blocks of ``block`` input pixels: frozen pixels survive the max-pool to
    the coarse levels (a thin random mask leaves every coarse pixel active)."""
    coarse = torch.rand(n, 1, -(-INPUT[0] // block), -(-INPUT[1] // block), generator=torch.Generator().manual_seed(seed))
    return F.interpolate((coarse < share).float(), scale_factor=block, mode="nearest")[:, 0, :INPUT[0], :INPUT[1]] > 0


def brute_force_macs(ex, x, mask: PixelMask):
    """Per image: every convolution's ``k^2 Cin Cout`` (+ 2 Cout for its BN) and every bilinear
    resize's 4 per output element, times the active pixels at its output size."""
    size = exit_size(INPUT, STRIDE)
    count = lambda hw: mask.count(hw).double()  # noqa: E731

    def conv(c, hw):
        k = c.kernel_size[0] * c.kernel_size[1]
        return (k * c.in_channels * c.out_channels + (2 * c.out_channels if c.norm is not None else 0)) * count(hw)

    hw = tuple(x.shape[-2:])
    if isinstance(ex, ExitHead):
        total = conv(ex.reduce, hw) + 4 * CHANNELS * count(size)  # the resize, also at the same size (fvcore's trace)
        return total + conv(ex.feature, size) + conv(ex.segmenter, size)
    sizes, total = [], 0
    for c in ex.encoder:
        sizes.append(hw)
        hw = (-(-hw[0] // 2), -(-hw[1] // 2))
        total = total + conv(c, hw)
    for c, up in zip(ex.decoder, reversed(sizes[1:])):
        total = total + 4 * CHANNELS * count(up) + conv(c, up)
    return total + 4 * CHANNELS * count(size) + conv(ex.segmenter, size)


@pytest.mark.parametrize("kind", sorted(EXITS))
def test_every_pixel_active_sparse_equals_emulate_equals_the_exits_logits_with_fvcores_macs(kind):
    ex, x = make_exit(kind)
    size = exit_size(INPUT, STRIDE)
    with torch.no_grad():
        ref = Logits(ex, size)(x)
    assert ref.abs().amax() > 0.1 and tuple(ref.shape[-2:]) == size
    full = PixelMask.full(2, INPUT)
    plan = MaskedStage(ex, "exits.e")
    with torch.no_grad():
        emu, r_emu = plan(x, full, "emulate")
    sparse, r_sparse = plan(x, full, "sparse", max_active=1.0, min_pixels=0)
    assert r_sparse.sparse and not r_emu.sparse
    torch.testing.assert_close(emu, ref, **TOL)
    torch.testing.assert_close(sparse, ref, **TOL)
    assert torch.equal(r_emu.macs, r_sparse.macs)
    assert float(r_sparse.macs[0]) == fvcore_count(Logits(ex, size), x[:1]).total()
    assert r_sparse.dense_ops == [] and r_emu.dense_ops == []  # nothing of either exit is global


@pytest.mark.parametrize("kind", sorted(EXITS))
def test_sparse_equals_emulate_on_masks_frozen_logits_zero_and_macs_counted_at_the_active_pixels(kind):
    ex, x = make_exit(kind)
    size = exit_size(INPUT, STRIDE)
    with torch.no_grad():
        dense = Logits(ex, size)(x)
    plan = MaskedStage(ex, "exits.e")
    right = torch.zeros(2, *INPUT, dtype=torch.bool)
    right[:, :, 40:] = True  # the left two thirds frozen: a frozen pixel at every level, also the coarsest
    masks = [blocky_mask(2, 1), blocky_mask(2, 2, share=0.8, block=16), random_mask(2, INPUT, 0.02, seed=3),
             boundary_mask(2, INPUT, seed=3), right] + border_masks(2, INPUT) + [torch.zeros(2, *INPUT, dtype=torch.bool)]
    differs = False
    for m in masks:
        mask = PixelMask(m)
        with torch.no_grad():
            emu, r_emu = plan(x, mask, "emulate")
        sparse, r_sparse = plan(x, mask, "sparse", max_active=1.0, min_pixels=0)
        torch.testing.assert_close(sparse, emu, **TOL)
        assert torch.equal(r_emu.macs, r_sparse.macs)
        torch.testing.assert_close(r_sparse.macs, brute_force_macs(ex, x, mask), rtol=1e-12, atol=0)
        at = mask.at(size)[:, None].expand_as(emu)
        assert torch.equal(emu[~at], torch.zeros(int((~at).sum())))  # frozen logits are 0
        # no halo: an active pixel next to frozen ones reads 0 there, so the exit's answer changes
        differs = differs or not torch.allclose(emu[at], dense[at], **TOL)
    assert differs
    assert float(r_sparse.macs.max()) == 0.0  # the last mask freezes everything: nothing is computed


def test_a_mask_smaller_than_the_exits_input_is_refused():
    ex, x = make_exit("sr_stride4")
    with pytest.raises(ValueError, match="must be given at the input size"):
        MaskedStage(ex, "exits.res2")(x, PixelMask.full(2, (4, 4)), "emulate")


def test_emulate_trains_the_exit_and_sparse_refuses_training_mode():
    ex, x = make_exit("rh_2_levels")
    ex.train()
    y, _ = MaskedStage(ex, "exits.e")(x, PixelMask(blocky_mask(2, 4)), "emulate")
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in ex.named_parameters()
               if not n.startswith("classifier"))
    with pytest.raises(RuntimeError, match="call eval"):
        MaskedStage(ex, "exits.e")(x, PixelMask(blocky_mask(2, 4)), "sparse", max_active=1.0, min_pixels=0)
