"""mmsegmentation's ``encode_decode`` output at input sizes that are not multiples of 32.

The whole model runs as detectron2 runs it (``SemanticSegmentor.forward``: normalisation,
padding to the backbone's ``size_divisibility``, head, crop and resize to the requested size),
against mmsegmentation 1.2.2's own forward (tests/mmseg_oracle.py), random weights. Tolerance:
relative error (max |a - b| / max |b|), since random HRNet logits are large.
"""
from __future__ import annotations

import pytest
import torch

from mmseg_oracle import build_mmseg, mmseg_logits
from segdistill.convert import load_model_weights
from test_convert_mmseg import CASES, our_model

REL_TOL = 1e-5


def _forward(model, x):
    with torch.no_grad():
        out = model([{"image": img, "height": img.shape[-2], "width": img.shape[-1]} for img in x])
    return torch.stack([o["sem_seg"] for o in out])


@pytest.mark.parametrize("case,size", [
    ("fcn_hrnet", (68, 100)), ("ocrnet_hrnet", (68, 100)), ("fcn_hrnet", (36, 52)),
    ("pspnet_r50_d8", (72, 104)), ("deeplabv3_r18_d8", (72, 104)),
])
def test_whole_model_matches_mmseg_at_sizes_not_divisible_by_32(case, size, tmp_path):
    """HRNet with mmsegmentation's bilinear fusion pads nothing and fuses branches of any size:
    every size divisible by its head's stride (4) gives mmsegmentation's output; so do the
    dilated ResNets at sizes divisible by 8."""
    mm_cfg, keys, kwargs, _ = CASES[case]
    mm = build_mmseg(mm_cfg)
    path = tmp_path / f"{case}.pth"
    torch.save({"state_dict": mm.state_dict()}, path)
    ours = our_model(keys, kwargs)
    load_model_weights(ours, str(path))
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    expected = mmseg_logits(mm, x)
    got = _forward(ours, x)
    assert got.shape == expected.shape
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    assert rel < REL_TOL, f"{case} at {size}: relative error {rel:.2e}"


def test_hrnet_pads_only_where_it_must():
    """Nearest fusion needs inputs padded to 32; bilinear fusion pads only training crops."""
    nearest = our_model({**CASES["fcn_hrnet"][1], "MODEL.TIMM.HRNET_FUSE_UPSAMPLE": "nearest"}).backbone
    bilinear = our_model(CASES["fcn_hrnet"][1]).backbone
    assert nearest.eval().size_divisibility == nearest.train().size_divisibility == 32
    assert bilinear.eval().size_divisibility == 0 and bilinear.train().size_divisibility == 32
