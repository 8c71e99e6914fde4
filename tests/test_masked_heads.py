"""Masked (per-pixel) execution of the heads: segdistill.modeling.masked_heads.

DeepLabV3 in its layouts (detectron2's ASPP, depthwise-separable too; mmsegmentation's and
CIRKD's SegASPP, with bottleneck convs) and FCN (with and without the concatenated input), on
a tiny feature map. The reference with every pixel active is the head's own
``forward_outputs(...)["logits"]``; ``sparse`` is checked against ``emulate`` on masks; counted
MACs are fvcore's at 100 % and affine in the active count (the dense image pooling the constant).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_cfg
from detectron2.layers import ASPP, ShapeSpec
from detectron2.modeling import build_sem_seg_head
from segdistill.modeling.masked import MaskedStage, PixelMask, UnsupportedModuleError, masked_forward
from test_masked import TOL, border_masks, boundary_mask, fvcore_count, random_mask, randomise_norms

SIZE = (6, 9)
CHANNELS = 24
HEADS = {
    "deeplabv3_detectron2": ("SegDeepLabV3Head", {}),
    "deeplabv3_detectron2_separable": ("SegDeepLabV3Head", {"MODEL.SEM_SEG_HEAD.USE_DEPTHWISE_SEPARABLE_CONV": True}),
    "deeplabv3_mmseg": ("SegDeepLabV3Head", {"MODEL.SEM_SEG_HEAD.LAYOUT": "mmseg", "MODEL.SEM_SEG_HEAD.ASPP_DROPOUT": 0.0}),
    "deeplabv3_mmseg_separable": ("SegDeepLabV3Head", {"MODEL.SEM_SEG_HEAD.LAYOUT": "mmseg",
                                                       "MODEL.SEM_SEG_HEAD.ASPP_DROPOUT": 0.0,
                                                       "MODEL.SEM_SEG_HEAD.USE_DEPTHWISE_SEPARABLE_CONV": True}),
    "deeplabv3_cirkd": ("SegDeepLabV3Head", {"MODEL.SEM_SEG_HEAD.LAYOUT": "cirkd",
                                             "MODEL.SEM_SEG_HEAD.ASPP_BOTTLENECK_CONVS": 1}),
    "fcn": ("FCNHead", {}),
    "fcn_no_concat": ("FCNHead", {"MODEL.SEM_SEG_HEAD.CONCAT_INPUT": False}),
}


class Logits(nn.Module):
    """What a head's masked implementation computes: its logits before the resize."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head.forward_outputs({self.head.in_features[0]: x})["logits"]


def make_head(kind):
    name, keys = HEADS[kind]
    cfg = tiny_cfg("resnet18", name, **keys)
    cfg.MODEL.SEM_SEG_HEAD.ASPP_DILATIONS = [1, 2, 3]  # taps inside the tiny map (6, 12, 18 read only the centre)
    torch.manual_seed(0)
    head = build_sem_seg_head(cfg, {"res5": ShapeSpec(channels=CHANNELS, stride=8)})
    with torch.no_grad():  # logits of order 1 (the classifier's init gives ~1e-3), so that 1e-5 means something
        nn.init.normal_(head.predictor.weight, 0, 1.0 / CHANNELS ** 0.5)
    return randomise_norms(head)


def features(n=2, seed=1):
    return torch.randn(n, CHANNELS, *SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_every_pixel_active_sparse_equals_emulate_equals_the_heads_logits_with_fvcores_macs(kind):
    head, x = make_head(kind), features()
    with torch.no_grad():
        ref = Logits(head)(x)
    assert ref.abs().amax() > 0.1
    full = PixelMask.full(2, SIZE)
    with torch.no_grad():
        emu, r_emu = masked_forward(head, x, full, "emulate")
    sparse, r_sparse = masked_forward(head, x, full, "sparse", max_active=1.0, min_pixels=0)
    assert r_sparse.sparse
    torch.testing.assert_close(emu, ref, **TOL)
    torch.testing.assert_close(sparse, ref, **TOL)
    assert torch.equal(r_emu.macs, r_sparse.macs)
    assert float(r_sparse.macs[0]) == fvcore_count(Logits(head), x[:1]).total()
    if kind.startswith("deeplabv3"):  # the global image pooling runs at every pixel, and says so
        assert any(op.startswith("aspp.") for op in r_sparse.dense_ops) and "aspp.image_pool" in r_sparse.dense_ops
    else:
        assert r_sparse.dense_ops == []


def sparse_matches_emulate(head, x, m):
    """The head masked by ``m`` in both modes: equal logits, equal counted MACs, frozen logits 0.
    Returns emulate's logits and sparse's report."""
    mask = PixelMask(m)
    with torch.no_grad():
        emu, r_emu = masked_forward(head, x, mask, "emulate")
    sparse, r_sparse = masked_forward(head, x, mask, "sparse", max_active=1.0, min_pixels=0)
    torch.testing.assert_close(sparse, emu, **TOL)
    assert torch.equal(r_emu.macs, r_sparse.macs)
    assert torch.equal(emu[(~m)[:, None].expand_as(emu)], torch.zeros(int((~m).sum()) * emu.shape[1]))
    return emu, r_sparse


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_sparse_equals_emulate_on_masks_frozen_logits_zero_and_macs_affine_in_the_active_count(kind):
    head, x = make_head(kind), features()
    with torch.no_grad():
        dense = Logits(head)(x)
    per_image = {}
    for m in [random_mask(2, SIZE, 0.3, seed=1), boundary_mask(2, SIZE, seed=3)] + border_masks(2, SIZE) + [
            torch.zeros(2, *SIZE, dtype=torch.bool)]:
        emu, r_sparse = sparse_matches_emulate(head, x, m)
        if kind.startswith("deeplabv3_detectron2"):
            # every spatial conv reads the head's input itself (1x1 projection and classifier after
            # them), so active pixels are the dense head's
            torch.testing.assert_close(emu, dense * m[:, None], **TOL)
        elif any(0 < int(mi.sum()) < mi.numel() for mi in m):
            # a 3x3 conv after the ASPP / the first conv reads 0 at frozen neighbours
            assert not torch.allclose(emu, dense * m[:, None], **TOL)
        for count, macs in zip(m.flatten(1).sum(1).tolist(), r_sparse.macs.tolist()):
            per_image[count] = macs
    # affine: the dense part (image pooling) + the same cost per active pixel
    full = fvcore_count(Logits(head), x[:1]).total()
    base = per_image.pop(0)
    pixels = SIZE[0] * SIZE[1]
    for count, macs in per_image.items():
        assert macs == pytest.approx(base + count * (full - base) / pixels, rel=1e-12), count
    # the constant is the image pooling's brute-force count: average over every input element, 1x1 conv (+ BN)
    if kind.startswith("deeplabv3"):
        aspp = head.aspp
        conv = aspp.convs[-1][1] if isinstance(aspp, ASPP) else aspp.pool
        expected = CHANNELS * pixels + conv.in_channels * conv.out_channels + (2 * conv.out_channels if conv.norm else 0)
        assert base == expected
    else:
        assert base == 0


def test_unsupported_heads_and_pooling_are_errors_naming_them():
    cfg = tiny_cfg("resnet18", "SegDeepLabV3Head", **{"MODEL.SEM_SEG_HEAD.ASPP_POOLING": "crop", "INPUT.CROP.ENABLED": True,
                                                     "INPUT.CROP.SIZE": [64, 64]})
    head = build_sem_seg_head(cfg, {"res5": ShapeSpec(channels=CHANNELS, stride=8)})
    with pytest.raises(UnsupportedModuleError, match="ASPP_POOLING 'crop'"):
        MaskedStage(head, "sem_seg_head")
    cfg = tiny_cfg("resnet18", "SegDeepLabV3PlusHead")
    head = build_sem_seg_head(cfg, {"res2": ShapeSpec(channels=16, stride=4), "res5": ShapeSpec(channels=CHANNELS, stride=8)})
    with pytest.raises(UnsupportedModuleError, match="SegDeepLabV3PlusHead"):
        MaskedStage(head, "sem_seg_head")


# ---------------------------------------------------------------------- HRNetV2Head (several inputs)
BRANCHES = {"res2": (8, 4), "res3": (16, 8), "res4": (24, 16), "res5": (32, 32)}  # channels, stride
HR_SIZES = [(10, 13), (5, 7), (3, 4), (2, 2)]  # sizes HRNet's strided 3x3 convs give a 40x52 input


class BranchLogits(nn.Module):
    """HRNetV2Head's logits before the resize, from its branches (finest first)."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, *branches):
        return self.head.forward_outputs(dict(zip(self.head.in_features, branches)))["logits"]


def make_hrnetv2_head(align_corners=False, channels=0):
    cfg = tiny_cfg("resnet18", "HRNetV2Head", **{"MODEL.SEM_SEG_HEAD.IN_FEATURES": list(BRANCHES),
                                                 "MODEL.SEM_SEG_HEAD.ALIGN_CORNERS": align_corners,
                                                 "MODEL.SEM_SEG_HEAD.HRNETV2_CHANNELS": channels})
    torch.manual_seed(0)
    head = build_sem_seg_head(cfg, {n: ShapeSpec(channels=c, stride=s) for n, (c, s) in BRANCHES.items()})
    with torch.no_grad():  # logits of order 1, so that 1e-5 means something
        nn.init.normal_(head.predictor.weight, 0, 1.0 / head.predictor.in_channels ** 0.5)
    return randomise_norms(head)


def branches(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.relu(torch.randn(n, c, *hw, generator=g)) for (c, _), hw in zip(BRANCHES.values(), HR_SIZES)]


def hr_fvcore(head, xs) -> float:
    from fvcore.nn import FlopCountAnalysis

    fca = FlopCountAnalysis(BranchLogits(head), tuple(t[:1] for t in xs))
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    return fca.total()


@pytest.mark.parametrize("align_corners,channels", [(False, 0), (True, 0), (False, 24)])
def test_hrnetv2_every_pixel_active_sparse_equals_emulate_equals_the_heads_logits_with_fvcores_macs(align_corners,
                                                                                                   channels):
    head, xs = make_hrnetv2_head(align_corners, channels), branches()
    with torch.no_grad():
        ref = BranchLogits(head)(*xs)
    assert ref.abs().amax() > 0.1
    full = PixelMask.full(2, HR_SIZES[0])
    with torch.no_grad():
        emu, r_emu = masked_forward(head, xs, full, "emulate")
    sparse, r_sparse = masked_forward(head, xs, full, "sparse", max_active=1.0, min_pixels=0)
    assert r_sparse.sparse and not r_emu.sparse and r_sparse.dense_ops == []
    torch.testing.assert_close(emu, ref, **TOL)
    torch.testing.assert_close(sparse, ref, **TOL)
    assert torch.equal(r_emu.macs, r_sparse.macs)
    assert float(r_sparse.macs[0]) == hr_fvcore(head, xs)


@pytest.mark.parametrize("align_corners", [False, True])
def test_hrnetv2_sparse_equals_emulate_on_masks_frozen_logits_zero_and_macs_linear_in_the_active_count(align_corners):
    head, xs = make_hrnetv2_head(align_corners), branches(seed=4)
    size = HR_SIZES[0]
    with torch.no_grad():
        dense = BranchLogits(head)(*xs)
    per_image = {}
    for m in [random_mask(2, size, 0.3, seed=1), random_mask(2, size, 0.7, seed=2), boundary_mask(2, size, seed=3)] + \
            border_masks(2, size) + [torch.zeros(2, *size, dtype=torch.bool)]:
        emu, r_sparse = sparse_matches_emulate(head, xs, m)
        # every unit is 1x1 after the resize: active pixels are the dense head's
        torch.testing.assert_close(emu, dense * m[:, None], **TOL)
        for count, macs in zip(m.flatten(1).sum(1).tolist(), r_sparse.macs.tolist()):
            per_image[count] = macs
    full = hr_fvcore(head, xs)
    assert per_image.pop(0) == 0  # nothing global: linear in the active count
    for count, macs in per_image.items():
        assert macs == pytest.approx(count * full / (size[0] * size[1]), rel=1e-12), count


def test_hrnetv2_min_pixels_reads_the_finest_branch_and_one_tensor_is_refused():
    head, xs = make_hrnetv2_head(), branches()
    mask = PixelMask(random_mask(2, HR_SIZES[0], 0.3, seed=5))
    pixels = HR_SIZES[0][0] * HR_SIZES[0][1]
    with torch.no_grad():
        emu, _ = masked_forward(head, xs, mask, "emulate")
    for min_pixels, ran in [(pixels, True), (pixels + 1, False)]:
        y, report = masked_forward(head, xs, mask, "sparse", min_pixels=min_pixels)
        assert report.sparse == ran and report.active_share == mask.share(HR_SIZES[0])
        torch.testing.assert_close(y, emu, **TOL)
    with pytest.raises(TypeError, match="list of its in_features"):
        masked_forward(head, xs[0], mask, "emulate")
