"""The output resize rules (``MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE``) at any input size.

``"input"`` gives mmsegmentation's ``encode_decode`` output: the whole model runs as the
project runs it (``SemanticSegmentorAnySize.forward``: normalisation, padding to the
backbone's ``size_divisibility``, head, its logits resized to the padded input size, crop and
resize to the requested size), against mmsegmentation 1.2.2's own forward
(tests/mmseg_oracle.py), random weights (the models of tests/test_convert_mmseg.py's
``our_model`` are built with ``"input"``, the rule mmsegmentation's files need). Tolerance:
relative error (max |a - b| / max |b|), since random HRNet logits are large.

``"stride"`` (the default) gives what the project gave before it had the rule, bit for bit:
the head's logits upsampled by its stride, the excess cropped (detectron2's
``SemanticSegmentor``). The two rules agree bit for bit at sizes that are multiples of the
head's stride, and differ elsewhere.
"""
from __future__ import annotations

import logging

import pytest
import torch
from detectron2.modeling import SemanticSegmentor

from mmseg_oracle import build_mmseg, mmseg_logits
from segdistill.convert import load_model_weights
from segdistill.modeling.meta_arch import SemanticSegmentorAnySize
from test_convert_mmseg import CASES, our_model

REL_TOL = 1e-5


def _forward(model, x):
    with torch.no_grad():
        out = model([{"image": img, "height": img.shape[-2], "width": img.shape[-1]} for img in x])
    return torch.stack([o["sem_seg"] for o in out])


def _any_size(model: SemanticSegmentor) -> SemanticSegmentorAnySize:
    """The project's segmentor with ``model``'s parts (and weights)."""
    return SemanticSegmentorAnySize(backbone=model.backbone, sem_seg_head=model.sem_seg_head,
                                    pixel_mean=model.pixel_mean.flatten().tolist(),
                                    pixel_std=model.pixel_std.flatten().tolist()).eval()


def _rel(got, expected) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def _models(case, tmp_path):
    """(mmsegmentation's model, ours as detectron2's SemanticSegmentor) with the same random weights."""
    mm_cfg, keys, kwargs, _ = CASES[case]
    mm = build_mmseg(mm_cfg)
    path = tmp_path / f"{case}.pth"
    torch.save({"state_dict": mm.state_dict()}, path)
    ours = our_model(keys, kwargs)
    load_model_weights(ours, str(path))
    return mm, ours


@pytest.mark.parametrize("case,size", [
    ("fcn_hrnet", (68, 100)), ("ocrnet_hrnet", (68, 100)), ("fcn_hrnet", (36, 52)),
    ("pspnet_r50_d8", (72, 104)), ("deeplabv3_r18_d8", (72, 104)),
])
def test_whole_model_matches_mmseg_at_sizes_not_divisible_by_32(case, size, tmp_path):
    """HRNet with mmsegmentation's bilinear fusion pads nothing and fuses branches of any size:
    every size divisible by its head's stride (4) gives mmsegmentation's output; so do the
    dilated ResNets at sizes divisible by 8."""
    mm, ours = _models(case, tmp_path)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    expected = mmseg_logits(mm, x)
    got = _forward(_any_size(ours), x)
    assert got.shape == expected.shape
    rel = _rel(got, expected)
    assert rel < REL_TOL, f"{case} at {size}: relative error {rel:.2e}"


@pytest.mark.parametrize("case,size", [
    ("pspnet_r50_d8", (90, 122)), ("deeplabv3_r18_d8", (90, 122)), ("deeplabv3_r18_d8", (67, 93)),
    ("isanet_r18_d8_align_corners", (90, 122)), ("fcn_hrnet", (90, 122)), ("fcn_hrnet", (67, 93)),
    ("ocrnet_hrnet", (67, 93)),
])
def test_whole_model_matches_mmseg_at_any_size(case, size, tmp_path):
    """At sizes that are not multiples of the head's stride the logits are resized to the input
    size, as mmsegmentation resizes them; detectron2's rule (upsample by the stride, crop)
    gives another output there."""
    mm, ours = _models(case, tmp_path)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    expected = mmseg_logits(mm, x)
    got = _forward(_any_size(ours), x)
    assert got.shape == expected.shape
    rel = _rel(got, expected)
    assert rel < REL_TOL, f"{case} at {size}: relative error {rel:.2e}"
    # the test can fail: detectron2's SemanticSegmentor, the same weights, is off here
    plain = _forward(ours, x)
    assert _rel(plain, expected) > 100 * REL_TOL
    # and so is the stride rule, which is detectron2's output bit for bit
    ours.sem_seg_head.output_resize = "stride"
    assert torch.equal(_forward(_any_size(ours), x), plain)


@pytest.mark.parametrize("case,keys,size", [
    ("deeplabv3_r18_d8", {}, (72, 104)),
    ("isanet_r18_d8_align_corners", {}, (64, 96)),
    ("fcn_hrnet", {}, (68, 100)),
    # nearest fusion pads the input to 32: the padded input is a multiple of the stride
    ("fcn_hrnet", {"MODEL.TIMM.HRNET_FUSE_UPSAMPLE": "nearest"}, (67, 93)),
])
def test_both_rules_agree_bit_for_bit_where_the_input_is_a_multiple_of_the_stride(case, keys, size):
    """Where the (padded) input is a multiple of the head's stride, resizing the logits to it is
    upsampling them by the stride: the outputs of detectron2's SemanticSegmentor (what the
    project's configs built before) and of SemanticSegmentorAnySize are identical."""
    _, our_keys, kwargs, _ = CASES[case]
    torch.manual_seed(0)
    plain = our_model({**our_keys, **keys}, kwargs)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    assert torch.equal(_forward(plain, x), _forward(_any_size(plain), x))


def test_plain_segmentor_warns_once_naming_the_meta_architecture_under_the_input_rule(caplog):
    """detectron2's SemanticSegmentor does not pass the input size: a head whose rule needs it
    ("input") says so, once, naming the meta-architecture that passes it; under the stride rule,
    which needs no size, nothing is said."""
    _, keys, kwargs, _ = CASES["deeplabv3_r18_d8"]
    x = torch.randn(1, 3, 40, 56)
    for rule, expected in (("input", 1), ("stride", 0)):
        plain = our_model(dict(keys, **{"MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE": rule}), kwargs)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="segdistill"):
            _forward(plain, x)
            _forward(plain, x)
            _forward(_any_size(plain), x)
        warnings = [r.getMessage() for r in caplog.records if "output_size" in r.getMessage()]
        assert len(warnings) == expected, (rule, warnings)
        assert all("OUTPUT_RESIZE 'input'" in w and "'SemanticSegmentorAnySize'" in w for w in warnings), warnings


def test_an_unknown_rule_is_refused_naming_the_key():
    _, keys, kwargs, _ = CASES["deeplabv3_r18_d8"]
    with pytest.raises(ValueError, match=r"MODEL\.SEM_SEG_HEAD\.OUTPUT_RESIZE 'resize'.*'stride', 'input'"):
        our_model(dict(keys, **{"MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE": "resize"}), kwargs)


def test_hrnet_pads_only_where_it_must():
    """Nearest fusion needs inputs padded to 32; bilinear fusion pads only training crops."""
    nearest = our_model({**CASES["fcn_hrnet"][1], "MODEL.TIMM.HRNET_FUSE_UPSAMPLE": "nearest"}).backbone
    bilinear = our_model(CASES["fcn_hrnet"][1]).backbone
    assert nearest.eval().size_divisibility == nearest.train().size_divisibility == 32
    assert bilinear.eval().size_divisibility == 0 and bilinear.train().size_divisibility == 32


@pytest.mark.parametrize("rule", ["stride", "input"])
@pytest.mark.parametrize("meta", ["SemanticSegmentorAnySize", "MultiExitSegmentor", "AnytimeSegmentor", "Distiller"])
def test_every_project_segmentor_follows_the_rule_at_odd_sizes(meta, rule, tmp_path):
    """The final output of the plain segmentor, a multi-exit model (exits evaluated too), an
    anytime model (final policy) and a distiller's student at 67x93 (not a multiple of the
    stride 8), against the head's logits brought to the input by hand: under "stride" (the
    default) upsampled by 8 and cropped, what detectron2's SemanticSegmentor gives (the
    project's outputs before the rule existed), bit for bit; under "input" resized to 67x93.
    The exits' logits are resized to the input size under either rule."""
    from detectron2.modeling import build_model
    from torch.nn import functional as F

    from conftest import random_batch, set_keys, tiny_cfg

    k = 5
    keys = {} if rule == "stride" else {"MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE": rule}  # "stride" is the default
    torch.manual_seed(0)
    plain = build_model(tiny_cfg(num_classes=k, **keys)).eval()
    assert type(plain) is SemanticSegmentorAnySize and plain.sem_seg_head.output_resize == rule
    cfg = tiny_cfg(num_classes=k, **keys, **{"MODEL.META_ARCHITECTURE": meta, "MODEL.EXITS.MODE": "ds",
                                             "MODEL.EXITS.CHANNELS": 8, "MODEL.EXITS.EVAL_EXITS": True})
    if meta == "Distiller":
        teacher = tmp_path / "teacher.yaml"
        teacher.write_text(tiny_cfg(num_classes=k, output_stride=16).dump())
        set_keys(cfg, **{"MODEL.EXITS.MODE": "none", "MODEL.DISTILL.TEACHER.CONFIG_FILE": str(teacher),
                         "MODEL.DISTILL.TEACHER.ALLOW_RANDOM": True, "MODEL.DISTILL.LOSSES": ["cwd"]})
    model = build_model(cfg).eval()
    segmentor = model.student if meta == "Distiller" else model
    report = segmentor.load_state_dict(plain.state_dict(), strict=False)  # the exits keep their init
    assert not report.unexpected_keys and all(k.startswith("exits.") for k in report.missing_keys), report
    batch = random_batch(2, 67, 93, k, seed=4, with_labels=False)
    with torch.no_grad():
        x = (torch.stack([b["image"] for b in batch]) - plain.pixel_mean) / plain.pixel_std
        logits = plain.sem_seg_head.forward_outputs(plain.backbone(x))["logits"]
        if rule == "stride":
            expected = F.interpolate(logits, scale_factor=8, mode="bilinear", align_corners=False)[..., :67, :93]
        else:
            expected = F.interpolate(logits, size=(67, 93), mode="bilinear", align_corners=False)
        got = model(batch)
    for i, out in enumerate(got):
        assert torch.equal(out["sem_seg"], expected[i])
    if meta == "SemanticSegmentorAnySize" and rule == "stride":  # detectron2's own meta-architecture
        d2 = SemanticSegmentor(backbone=plain.backbone, sem_seg_head=plain.sem_seg_head,
                               pixel_mean=plain.pixel_mean.flatten().tolist(),
                               pixel_std=plain.pixel_std.flatten().tolist()).eval()
        with torch.no_grad():
            assert all(torch.equal(a["sem_seg"], b["sem_seg"]) for a, b in zip(d2(batch), got))
    if meta == "MultiExitSegmentor":  # exits answer at the input size too
        assert all(out[f"sem_seg_{n}"].shape[-2:] == (67, 93) for out in got for n in model.exits)
