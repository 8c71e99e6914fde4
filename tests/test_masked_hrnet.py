"""Masked (per-pixel) execution of HRNet: segdistill.modeling.masked_hrnet.

HRNet-W18-small (timm, random weights, randomised BN statistics) on tiny inputs, with timm's
nearest fusion and mmsegmentation's bilinear one (an input size that is no multiple of 32, so
that its resize to the joined branch's size runs). The reference with every pixel active is
the backbone's own ``forward_stages``; ``sparse`` is checked against ``emulate`` on random,
boundary-shaped and border masks; fused pixels frozen at their resolution keep the identity
branch bit for bit; counted MACs are fvcore's at 100 % and its per-module counts scaled by each
module's active share otherwise.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_backbone
from segdistill.modeling.masked import MODES, PixelMask, masked_forward
from segdistill.modeling.backbones.timm_backbone import HRNetStage
from test_masked import (
    TOL, border_masks, boundary_mask, expected_masked_macs, fvcore_count, random_mask, randomise_norms,
)
from timm.models.hrnet import HighResolutionModule

SIZES = {"nearest": (32, 64), "bilinear": (40, 56)}


def as_list(v):
    return v if isinstance(v, list) else [v]


def first_images(v):
    return [t[:1] for t in v] if isinstance(v, list) else v[:1]


def hrnet_stages(fusion):
    """(name, module, input, output) of each stage of the backbone's stage_modules(), from forward_stages."""
    torch.manual_seed(0)
    bb = randomise_norms(make_backbone("hrnet_w18_small", fuse_upsample=fusion))
    x = torch.randn(2, 3, *SIZES[fusion], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f = dict(bb.forward_stages(x))
    outs = {"layer1": f["layer1"], "stage2": [f["stage2_b0"], f["stage2_b1"]],
            "stage3": [f[f"stage3_b{i}"] for i in range(3)], "stage4": [f[f"res{i}"] for i in range(2, 6)]}
    stages, prev = [], x
    for name, module in bb.stage_modules().items():
        stages.append((name, module, prev, outs[name]))
        prev = outs[name]
    return stages


@pytest.fixture(scope="module", params=sorted(SIZES))
def stages(request):
    return request.param, hrnet_stages(request.param)


def test_stage_modules_chain_to_forward_stages_and_hold_the_bodys_modules():
    bb = make_backbone("hrnet_w18_small").eval()
    modules = bb.stage_modules()
    assert list(modules) == ["layer1", "stage2", "stage3", "stage4"]
    assert all(type(m) is HRNetStage for k, m in modules.items() if k != "layer1")
    owned = {id(p) for p in bb.parameters()}
    assert all(id(p) in owned for m in modules.values() for p in m.parameters())
    assert sum(p.numel() for m in modules.values() for p in m.parameters()) == sum(p.numel() for p in bb.parameters())


def test_every_pixel_active_sparse_equals_emulate_equals_forward_stages_with_fvcores_macs(stages):
    fusion, items = stages
    for name, stage, x, y in items:
        full = PixelMask.full(2, SIZES[fusion])
        with torch.no_grad():
            emu, r_emu = masked_forward(stage, x, full, "emulate")
        sparse, r_sparse = masked_forward(stage, x, full, "sparse", max_active=1.0, min_pixels=0)
        assert r_sparse.sparse and len(as_list(sparse)) == len(as_list(y))
        for k, (e, s, ref) in enumerate(zip(as_list(emu), as_list(sparse), as_list(y))):
            torch.testing.assert_close(e, ref, **TOL, msg=f"{fusion} {name} branch {k} emulate")
            torch.testing.assert_close(s, ref, **TOL, msg=f"{fusion} {name} branch {k} sparse")
        assert torch.equal(r_emu.macs, r_sparse.macs)
        assert float(r_sparse.macs[0]) == fvcore_count(stage, first_images(x)).total(), (fusion, name)


def test_sparse_equals_emulate_on_random_boundary_and_border_masks(stages):
    fusion, items = stages
    n, size = 2, SIZES[fusion]
    masks = [random_mask(n, size, 0.3, seed=1), boundary_mask(n, size, seed=3), boundary_mask(n, size, seed=4, width=2)]
    masks += [border_masks(n, size)[k] for k in (1, 3, 4)]
    for name, stage, x, y in items:
        for k, m in enumerate(masks):
            mask = PixelMask(m)
            with torch.no_grad():
                emu, r_emu = masked_forward(stage, x, mask, "emulate")
            sparse, r_sparse = masked_forward(stage, x, mask, "sparse", max_active=1.0, min_pixels=0)
            for e, s in zip(as_list(emu), as_list(sparse)):
                torch.testing.assert_close(s, e, **TOL, msg=f"{fusion} {name} mask {k}")
            assert torch.equal(r_emu.macs, r_sparse.macs)
            if 0 < mask.share(as_list(y)[0].shape[-2:]) < 1:  # frozen pixels at the output: the mask changed something
                assert not all(torch.allclose(e, r, **TOL) for e, r in zip(as_list(emu), as_list(y)))


@pytest.mark.parametrize("mode", MODES)
def test_fused_pixels_frozen_at_their_resolution_keep_the_identity_branch(stages, mode):
    """stage3's module on its own input (after the transition): the branches are identity-shortcut
    BasicBlocks after a ReLU and the fuse adds nothing at a frozen pixel, so each branch's output
    is its input there, bit for bit; active pixels change."""
    fusion, items = stages
    name, stage, x, y = items[2]
    assert name == "stage3" and isinstance(stage.stage[0], HighResolutionModule)
    with torch.no_grad():
        branches = [x[i] if type(t) is nn.Identity else t(x[-1]) for i, t in enumerate(stage.transition)]
    module = stage.stage[0]
    h, w = SIZES[fusion]  # frozen 16x16 blocks: frozen pixels at every branch's resolution (stride 4 to 16)
    blocks = random_mask(2, (-(-h // 16), -(-w // 16)), 0.5, seed=5)
    mask = PixelMask(blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, :h, :w])
    with torch.no_grad():
        out, _ = masked_forward(module, [b.clone() for b in branches], mask, mode, max_active=1.0, min_pixels=0)
    compared = 0
    for b, o in zip(branches, out):
        frozen = (~mask.at(b.shape[-2:]))[:, None].expand_as(b)
        assert torch.equal(o[frozen], b[frozen]), (fusion, mode)
        assert not torch.allclose(o[~frozen], b[~frozen]), (fusion, mode)
        compared += int(frozen[:, 0].sum() > 0)
    assert compared == 3


def test_macs_are_fvcores_per_module_counts_scaled_by_the_active_share():
    """Nearest fusion: every conv, BN and upsampling counts its fvcore count x its output's
    active share (projection shortcuts, in dense_ops, their whole count)."""
    for name, stage, x, _ in hrnet_stages("nearest"):
        x1 = first_images(x)
        fca = fvcore_count(stage, x1)
        sizes = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: sizes.__setitem__(n, tuple(o.shape[-2:])))
                 for n, m in stage.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Upsample))]
        with torch.no_grad():
            stage(x1 if not isinstance(x1, list) else list(x1))
        for h in hooks:
            h.remove()
        m = PixelMask(random_mask(1, SIZES["nearest"], 0.02, seed=7))  # a share below 1 at every stride
        _, report = masked_forward(stage, x1, m, "emulate")
        expected = expected_masked_macs(fca.by_module(), sizes, m, report)
        assert float(report.macs[0]) == pytest.approx(expected, rel=1e-12), name
        assert float(report.macs[0]) < fca.total()
