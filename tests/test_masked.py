"""Masked (per-pixel) execution: segdistill.modeling.masked.

The reference for ``emulate`` with every pixel active is the stage's own forward (the tensors
``forward_stages`` yields); ``sparse`` is checked against ``emulate`` on random, boundary-shaped
and border masks; frozen pixels of identity-shortcut blocks keep their input bit for bit; counted
MACs are fvcore's at 100 % and fvcore's per-module counts scaled by each module's active share
otherwise.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import make_backbone
from segdistill.modeling.masked import (
    MODES, SPARSE_MAX_ACTIVE, SPARSE_MIN_PIXELS, MaskedStage, PixelMask, UnsupportedModuleError, masked_forward, supported_modules,
)
from timm.models.resnet import BasicBlock

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = dict(rtol=1e-5, atol=1e-5)



def expected_masked_macs(by_module, sizes, mask, report) -> float:
    """fvcore's MACs per module (``by_module``) scaled by each module's active share at its
    output size (``sizes``: module name -> (h, w)); the report's dense ops count in full."""
    expected = 0.0
    for n, hw in sizes.items():
        dense = any(n == d or n.startswith(d.rsplit(".", 1)[0] + ".") for d in report.dense_ops)
        share = 1.0 if dense else float(mask.count(hw)[0]) / (hw[0] * hw[1])
        expected += by_module[n] * share
    return expected

def randomise_norms(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that folding them matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) * 0.6 + 0.4)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return module.eval()


def resnet_stages(**options):
    """ResNet-18's stages after res2 as forward_stages yields them: (name, module, input, output)."""
    bb = randomise_norms(make_backbone("resnet18", out_features=["res2", "res3", "res4", "res5"], **options))
    x = torch.randn(2, 3, 64, 72, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = dict(bb.forward_stages(x))
    body = bb.body
    return [(f"res{k + 1}", body[f"layer{k}"], feats[f"res{k}"], feats[f"res{k + 1}"]) for k in (2, 3, 4)]


def resnet50_stages(**options):
    """ResNet-50's res3 and res5 (Bottlenecks; the first with a projection shortcut), on a small input."""
    bb = randomise_norms(make_backbone("resnet50", out_features=["res2", "res4"], **options))
    x = torch.randn(1, 3, 48, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = dict(bb.forward_stages(x))
    body = bb.body
    return [(f"res{k + 1}", body[f"layer{k}"], feats[f"res{k}"], feats[f"res{k + 1}"]) for k in (2, 4)]


def mobilenet_stages(**options):
    """MobileNetV2's stages after res1: blocks.1 (res2), blocks.2 (res3), blocks.3-4 (res4), blocks.5-6 (res5)."""
    bb = randomise_norms(make_backbone("mobilenetv2_100", out_features=["res2", "res3", "res4", "res5"], **options))
    x = torch.randn(2, 3, 64, 72, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = dict(bb.forward_stages(x))
    b = bb.body.blocks
    mods = {"res2": b[1], "res3": b[2], "res4": nn.Sequential(b[3], b[4]), "res5": nn.Sequential(b[5], b[6])}
    prev = {"res2": "res1", "res3": "res2", "res4": "res3", "res5": "res4"}
    return [(n, m, feats[prev[n]], feats[n]) for n, m in mods.items()]


BACKBONES = {
    "resnet18_os32": lambda: resnet_stages(),
    "resnet18_os8": lambda: resnet_stages(output_stride=8),
    "resnet18_os16": lambda: resnet_stages(output_stride=16),
    "resnet18_os8_mmseg": lambda: resnet_stages(output_stride=8, dilation_rule="mmseg", stem_type="deep"),
    "resnet50_os8": lambda: resnet50_stages(output_stride=8),
    "mobilenetv2_os32": lambda: mobilenet_stages(),
    "mobilenetv2_os8": lambda: mobilenet_stages(output_stride=8),
}


def random_mask(n, size, share, seed):
    return torch.rand(n, *size, generator=torch.Generator().manual_seed(seed)) < share


def boundary_mask(n, size, seed, width=1):
    """Active near the boundaries of random blobs (where an exit is unsure): thin bands."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 3, (n, 1, max(2, size[0] // 4), max(2, size[1] // 4)), generator=g).float()
    labels = nn.functional.interpolate(coarse, size=size, mode="nearest")[:, 0]
    edge = torch.zeros_like(labels, dtype=torch.bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :, 1:] |= labels[:, :, 1:] != labels[:, :, :-1]
    if width > 1:
        edge = nn.functional.max_pool2d(edge[:, None].float(), 2 * width - 1, 1, width - 1)[:, 0] > 0
    return edge


def border_masks(n, size):
    """Masks touching the image borders and corners (the taps that read the padding)."""
    h, w = size
    out = []
    for rows, cols in ((slice(0, 1), slice(None)), (slice(None), slice(w - 1, w)), (slice(h - 1, h), slice(w - 1, w)),
                       (slice(0, 1), slice(0, 1))):
        m = torch.zeros(n, h, w, dtype=torch.bool)
        m[:, rows, cols] = True
        out.append(m)
    mixed = torch.zeros(n, h, w, dtype=torch.bool)
    mixed[0] = True  # one image all active, the others all frozen
    out.append(mixed)
    return out


# ---------------------------------------------------------------------------------- PixelMask
def test_pixel_mask_coarse_pixel_active_iff_a_covered_finer_pixel_is():
    m = random_mask(2, (16, 24), 0.05, seed=0)
    pm = PixelMask(m)
    for f in (2, 4, 8):
        coarse = pm.at((16 // f, 24 // f))
        brute = torch.zeros_like(coarse)
        for i in range(coarse.shape[1]):
            for j in range(coarse.shape[2]):
                brute[:, i, j] = m[:, i * f:(i + 1) * f, j * f:(j + 1) * f].flatten(1).any(1)
        assert torch.equal(coarse, brute), f
    assert 0 < int(pm.at((8, 12)).sum()) < 2 * 8 * 12  # the check above compared something
    # sizes that do not divide (a stride-2 conv of an odd size): conservative, nothing lost
    odd = pm.at((9, 13))
    for n, i, j in m.nonzero().tolist():
        assert odd[n, math.floor(i * 9 / 16), math.floor(j * 13 / 24)], (n, i, j)
    # a finer map: each pixel is the pixel holding it
    fine = pm.at((32, 48))
    assert torch.equal(fine, m.repeat_interleave(2, 1).repeat_interleave(2, 2))
    assert pm.count((16, 24)).tolist() == m.flatten(1).sum(1).tolist()


# ---------------------------------------------------------------------------------- stages
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_pixel_active_sparse_equals_emulate_equals_the_stage(backbone, device):
    """With every pixel active both modes give the tensors forward_stages yields (sparse forced)."""
    for name, stage, x, y in BACKBONES[backbone]():
        stage.to(device)
        x, y = x.to(device), y.to(device)
        full = PixelMask.full(x.shape[0], x.shape[-2:], device=device)
        with torch.no_grad():
            emu, r_emu = masked_forward(stage, x, full, "emulate")
        sparse, r_sparse = masked_forward(stage, x, full, "sparse", max_active=1.0, min_pixels=0)
        assert r_sparse.sparse and not r_emu.sparse
        torch.testing.assert_close(emu, y, **TOL, msg=f"{backbone} {name} emulate")
        torch.testing.assert_close(sparse, y, **TOL, msg=f"{backbone} {name} sparse")
        assert torch.equal(r_emu.macs, r_sparse.macs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backbone", ["resnet18_os32", "resnet18_os16", "resnet18_os8_mmseg", "resnet50_os8",
                                      "mobilenetv2_os8"])
def test_sparse_equals_emulate_on_random_boundary_and_border_masks(backbone, device):
    for name, stage, x, _ in BACKBONES[backbone]():
        stage.to(device)
        x = x.to(device)
        n, size = x.shape[0], tuple(x.shape[-2:])
        masks = [random_mask(n, size, 0.3, seed=1), boundary_mask(n, size, seed=3), boundary_mask(n, size, seed=4, width=2)]
        masks += [border_masks(n, size)[k] for k in (1, 3, 4)]  # right column, top-left corner, one image only
        for k, m in enumerate(masks):
            mask = PixelMask(m.to(device))
            with torch.no_grad():
                emu, r_emu = masked_forward(stage, x, mask, "emulate")
            sparse, r_sparse = masked_forward(stage, x, mask, "sparse", max_active=1.0, min_pixels=0)
            assert r_sparse.sparse
            torch.testing.assert_close(sparse, emu, **TOL, msg=f"{backbone} {name} mask {k}")
            assert torch.equal(r_emu.macs, r_sparse.macs)
            # frozen output pixels differ from the dense stage's (the mask did something)
            if 0 < mask.share(size) < 1:
                assert not torch.allclose(emu, stage(x), **TOL)


@pytest.mark.parametrize("backbone", ["resnet18_os32", "resnet50_os8", "mobilenetv2_os32"])
def test_frozen_pixels_keep_their_input_through_identity_shortcut_blocks(backbone):
    """Blocks with an identity shortcut (after the stage's first block): a frozen pixel's
    features are its input's, bit for bit, in both modes; active pixels change."""
    for name, stage, x, y in BACKBONES[backbone]():
        blocks = list(stage[-1] if isinstance(stage[-1], nn.Sequential) else stage)[1:]
        if not blocks:
            continue
        tail = nn.Sequential(*blocks)
        m = random_mask(y.shape[0], y.shape[-2:], 0.4, seed=5)
        for mode in MODES:
            with torch.no_grad():
                out, _ = masked_forward(tail, y, PixelMask(m), mode, max_active=1.0, min_pixels=0)
            frozen = (~m)[:, None].expand_as(y)
            assert torch.equal(out[frozen], y[frozen]), (backbone, name, mode)
            assert not torch.allclose(out[~frozen], y[~frozen]), (backbone, name, mode)


# ---------------------------------------------------------------------------------- pooling
def resnet_stem_stages():
    """ResNet-18's res1 (conv, BN, ReLU) and res2 (the stem's max-pool, then layer1) as
    stage_modules() names them: (name, module, input, output)."""
    bb = randomise_norms(make_backbone("resnet18", out_features=["res2"]))
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = dict(bb.forward_stages(x))
    mods = bb.stage_modules()
    return [("res1", mods["res1"], x, feats["res1"]), ("res2", mods["res2"], feats["res1"], feats["res2"])]


def test_the_stems_max_pool_in_both_modes():
    """res2 starts with the stem's max-pool: with every pixel active both modes give
    forward_stages' tensors; with masks sparse == emulate; pooling adds no MACs (fvcore counts none)."""
    assert type(resnet_stem_stages()[1][1][0]) is nn.MaxPool2d
    for name, stage, x, y in resnet_stem_stages():
        n, size = x.shape[0], tuple(x.shape[-2:])
        full = PixelMask.full(n, size)
        with torch.no_grad():
            emu, r_emu = masked_forward(stage, x, full, "emulate")
        sparse, r_sparse = masked_forward(stage, x, full, "sparse", max_active=1.0, min_pixels=0)
        torch.testing.assert_close(emu, y, **TOL, msg=name)
        torch.testing.assert_close(sparse, y, **TOL, msg=name)
        assert float(r_sparse.macs[0]) == fvcore_count(stage, x[:1]).total(), name
        for m in [random_mask(n, size, 0.3, seed=1), boundary_mask(n, size, seed=3)] + border_masks(n, size):
            with torch.no_grad():
                emu, r_emu = masked_forward(stage, x, PixelMask(m), "emulate")
            sparse, r_sparse = masked_forward(stage, x, PixelMask(m), "sparse", max_active=1.0, min_pixels=0)
            torch.testing.assert_close(sparse, emu, **TOL, msg=name)
            assert torch.equal(r_emu.macs, r_sparse.macs)
    pool = nn.MaxPool2d(3, 2, 1)
    assert fvcore_count(pool, torch.randn(1, 4, 9, 9)).total() == 0


@pytest.mark.parametrize("pool", [nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2), nn.MaxPool2d((3, 2), 1, (1, 0), dilation=(1, 2))])
def test_max_pool_active_pixels_are_the_dense_pools_frozen_ones_zero(pool):
    """Negative inputs: a tap outside the image must read -inf (the pool's padding), not 0."""
    pool.eval()
    x = -torch.rand(2, 5, 9, 11) - 0.5
    with torch.no_grad():
        dense = pool(x)
    out_hw = tuple(dense.shape[-2:])
    for m in [random_mask(2, (9, 11), 0.4, seed=2)] + border_masks(2, (9, 11)):
        mask = PixelMask(m)
        active = mask.at(out_hw)[:, None]
        for mode in MODES:
            y, report = masked_forward(pool, x, mask, mode, max_active=1.0, min_pixels=0)
            torch.testing.assert_close(y, dense * active, rtol=0, atol=0)
            assert float(report.macs.sum()) == 0.0


# ---------------------------------------------------------------------------------- single convs
CONVS = {
    "1x1": dict(kernel_size=1),
    "3x3": dict(kernel_size=3, padding=1),
    "3x3_dilated": dict(kernel_size=3, padding=2, dilation=2),
    "3x3_stride2": dict(kernel_size=3, padding=1, stride=2),
    "1x1_stride2": dict(kernel_size=1, stride=2),
    "depthwise": dict(kernel_size=3, padding=1, groups=16),
    "grouped": dict(kernel_size=3, padding=1, groups=4),
    "5x3_bias": dict(kernel_size=(5, 3), padding=(2, 1), bias=True),
}


def conv_unit(kind, cin=16, cout=16, act=True):
    torch.manual_seed(0)
    kw = dict(bias=False) | CONVS[kind]
    layers = [nn.Conv2d(cin, cout, **kw), nn.BatchNorm2d(cout)] + ([nn.ReLU(inplace=True)] if act else [])
    return randomise_norms(nn.Sequential(*layers))


def fvcore_count(module, x):
    from fvcore.nn import FlopCountAnalysis

    fca = FlopCountAnalysis(module, (x,))
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    return fca


@pytest.mark.parametrize("kind", sorted(CONVS))
def test_conv_units_sparse_equals_emulate_and_macs_linear_in_active_pixels(kind):
    unit = conv_unit(kind)
    x = torch.randn(2, 16, 11, 14)
    with torch.no_grad():
        dense = unit(x)
    out_hw = tuple(dense.shape[-2:])
    full = PixelMask.full(2, x.shape[-2:])
    per_image = fvcore_count(unit, x[:1]).total()
    for m in [torch.ones(2, 11, 14, dtype=torch.bool), random_mask(2, (11, 14), 0.3, seed=2),
              boundary_mask(2, (11, 14), seed=3)] + border_masks(2, (11, 14)):
        mask = PixelMask(m)
        with torch.no_grad():
            emu, r_emu = masked_forward(unit, x, mask, "emulate")
        sparse, r_sparse = masked_forward(unit, x, mask, "sparse", max_active=1.0, min_pixels=0)
        torch.testing.assert_close(sparse, emu, **TOL)
        active = mask.at(out_hw)
        # active output pixels: the dense unit's values; frozen ones: 0
        torch.testing.assert_close(emu, dense * active[:, None], **TOL)
        expected = active.flatten(1).sum(1).double() * per_image / (out_hw[0] * out_hw[1])
        torch.testing.assert_close(r_sparse.macs, expected, rtol=1e-12, atol=0)
        assert torch.equal(r_emu.macs, r_sparse.macs)
    assert full.share(x.shape[-2:]) == 1.0


# ---------------------------------------------------------------------------------- counted MACs
@pytest.mark.parametrize("backbone", ["resnet18_os32", "resnet18_os8", "resnet50_os8", "mobilenetv2_os32"])
def test_macs_are_fvcores_at_100_percent_and_its_per_module_counts_scaled_by_the_active_share(backbone):
    for name, stage, x, _ in BACKBONES[backbone]():
        x1 = x[:1]
        fca = fvcore_count(stage, x1)
        _, report = masked_forward(stage, x1, PixelMask.full(1, x1.shape[-2:]), "sparse", max_active=1.0, min_pixels=0)
        assert float(report.macs[0]) == fca.total(), (backbone, name)
        # a mask: every conv / norm counts its dense fvcore count x its output's active share,
        # the projection shortcuts (dense_ops) their whole count
        sizes = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: sizes.__setitem__(n, tuple(o.shape[-2:])))
                 for n, m in stage.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
        with torch.no_grad():
            stage(x1)
        for h in hooks:
            h.remove()
        m = PixelMask(random_mask(1, x1.shape[-2:], 0.3, seed=7))
        _, report = masked_forward(stage, x1, m, "emulate")
        expected = expected_masked_macs(fca.by_module(), sizes, m, report)
        assert float(report.macs[0]) == pytest.approx(expected, rel=1e-12), (backbone, name)
        assert float(report.macs[0]) < fca.total()
        if backbone.startswith("resnet") and name != "res2":
            assert report.dense_ops == ["0.downsample.0"], report.dense_ops


# ---------------------------------------------------------------------------------- the contract
def test_unsupported_modules_are_errors_naming_them():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    with pytest.raises(UnsupportedModuleError, match=r"1 .*AdaptiveAvgPool2d"):
        masked_forward(nn.Sequential(conv, nn.AdaptiveAvgPool2d(1)), torch.randn(1, 4, 6, 6),
                       PixelMask.full(1, (6, 6)), "emulate")
    with pytest.raises(UnsupportedModuleError, match=r"GELU"):
        MaskedStage(nn.Sequential(conv, nn.BatchNorm2d(4), nn.GELU()))
    with pytest.raises(UnsupportedModuleError, match=r"0 .*does not follow a Conv2d"):
        MaskedStage(nn.Sequential(nn.BatchNorm2d(4), conv))

    class MyBlock(BasicBlock):  # a subclass may compute something else: not taken for its parent
        pass

    with pytest.raises(UnsupportedModuleError, match=r"MyBlock"):
        MaskedStage(nn.Sequential(MyBlock(8, 8)))
    block = BasicBlock(8, 8, attn_layer="se")
    with pytest.raises(UnsupportedModuleError, match=r"squeeze-excitation.*se"):
        MaskedStage(block)
    assert "BasicBlock" in supported_modules() and "InvertedResidual" in supported_modules()


def test_sparse_falls_back_to_emulate_above_max_active_and_refuses_training_norms():
    unit = conv_unit("3x3")
    x = torch.randn(1, 16, 8, 8)
    m = PixelMask(random_mask(1, (8, 8), 0.9, seed=1))
    share = m.share((8, 8))
    with torch.no_grad():
        emu, _ = masked_forward(unit, x, m, "emulate")
    y, report = masked_forward(unit, x, m, "sparse", max_active=share - 1e-6, min_pixels=0)
    assert not report.sparse and report.active_share == share and torch.equal(y, emu)
    y, report = masked_forward(unit, x, m, "sparse", max_active=share, min_pixels=0)
    assert report.sparse
    assert 0 < SPARSE_MAX_ACTIVE < 1
    unit.train()
    with pytest.raises(RuntimeError, match="eval"):
        masked_forward(unit, x, m, "sparse", max_active=1.0, min_pixels=0)
    with pytest.raises(ValueError, match="mode"):
        masked_forward(unit, x, m, "dense")


def test_sparse_runs_dense_on_a_map_smaller_than_min_pixels():
    """Below ``min_pixels`` pixels per image a sparse call runs emulate, whatever the share; at
    and above it the sparse path runs. The outputs and the counted MACs are the same either way."""
    stage = MaskedStage(randomise_norms(nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))))
    small, large = (6, 8), (12, 16)
    assert SPARSE_MIN_PIXELS > large[0] * large[1]
    for size in (small, large):
        m = PixelMask(random_mask(2, size, 0.3, seed=2))
        x = torch.relu(torch.randn(2, 8, *size, generator=torch.Generator().manual_seed(3)))
        with torch.no_grad():
            emu, r_emu = stage(x, m, "emulate")
        assert m.share(size) <= SPARSE_MAX_ACTIVE
        y, report = stage(x, m, "sparse", min_pixels=large[0] * large[1])
        assert report.sparse == (size == large) and report.active_share == m.share(size)
        torch.testing.assert_close(y, emu, **TOL)
        assert torch.equal(report.macs, r_emu.macs)
        assert not stage(x, m, "sparse")[1].sparse  # the default rule: both maps are below SPARSE_MIN_PIXELS
        assert stage(x, m, "sparse", min_pixels=0)[1].sparse


def test_emulate_is_differentiable():
    unit = conv_unit("3x3").train()
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    m = random_mask(2, (8, 8), 0.5, seed=1)
    y, _ = masked_forward(unit, x, PixelMask(m), "emulate")
    y.sum().backward()
    assert unit[0].weight.grad is not None and x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------- the benchmark
def test_breakeven_benchmark_end_to_end_at_toy_size(tmp_path):
    """The micro-benchmark runs (toy widths and sizes, one repeat: no timing is judged here),
    writes its JSON, and reads the break-even off the time ratios by its rule."""
    import json

    from conftest import load_script

    bench = load_script("masked_breakeven", "benchmarks/masked_breakeven.py")
    # the rule, on hand-made ratios: crossing between 0.2 (1.2) and 0.4 (0.8) -> 0.3
    assert bench.break_even([0.0, 0.2, 0.4, 0.6], [1.5, 1.2, 0.8, 0.5]) == pytest.approx(0.3)
    assert bench.break_even([0.0, 0.2, 0.4], [1.5, 0.9, 1.1]) is None  # ends above 1: never pays
    assert bench.break_even([0.0, 0.5], [0.9, 0.5]) == 0.0
    assert bench.break_even([0.0, 0.2, 0.4, 0.6], [1.5, 0.9, 1.1, 0.7]) == pytest.approx(0.4 + 0.1 / 0.4 * 0.2)
    for kind in bench.MASKS:
        m = bench.make_mask(kind, (12, 16), 0.75, seed=0)
        assert int(m.sum()) == 48  # 25 % of 192 active
    out = tmp_path / "be.json"
    result = bench.main(["--widths", "8", "--sizes", "6x7", "--frozen", "0", "0.5", "--warmup", "0", "--repeats", "1",
                         "--mask", "boundary", "--output", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert [r["frozen"] for r in saved["rows"]] == [0.0, 0.5] and saved["threads"] == torch.get_num_threads()
    assert saved["rows"][0]["macs_ratio"] == pytest.approx(1.0) and saved["rows"][1]["macs_ratio"] < 1.0
    ratios = [r["time_ratio"] for r in saved["rows"]]
    assert saved["break_even"][0]["break_even_frozen"] == bench.break_even([0.0, 0.5], ratios)
