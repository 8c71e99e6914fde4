"""A whole-model file loads only into a model that computes what the file's source computed.

Options that change no tensor's shape (HRNet's branch fusion, ``align_corners``) pass the
fit check; where the file's source pins them (segdistill.convert.source_options), a config
that contradicts them is refused with the key and the value the file needs, through
``MODEL.WEIGHTS`` (the checkpointer and ``load_model_weights``) and the Distiller's teacher
loader alike. mmsegmentation 1.2.2 (tests/mmseg_oracle.py) builds the files, random weights.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import REPO
from mmseg_oracle import build_mmseg, mmseg_logits
from segdistill.convert import SegDistillCheckpointer, SourceOptionsError, convert_model_state, load_foreign_weights
from segdistill.convert import load_model_weights
from test_convert_mmseg import CASES, our_model

#: relative error (max |a - b| / max |b|): random HRNet logits are large (float32 differs by ~1e-7 of them)
REL_TOL = 1e-5


def _save(tmp_path, name, mm, meta=None):
    path = tmp_path / name
    torch.save({"state_dict": mm.state_dict(), **({"meta": meta} if meta is not None else {})}, path)
    return str(path)


def _rel_err(got, expected):
    return ((got - expected).abs().max() / expected.abs().max()).item()


def _logits(model, x):
    with torch.no_grad():
        return model.sem_seg_head(model.backbone(x))[0]


@pytest.mark.parametrize("case", ["fcn_hrnet", "ocrnet_hrnet"])
def test_mmseg_hrnet_file_needs_bilinear_fusion(case, tmp_path):
    mm_cfg, keys, kwargs, (h, w) = CASES[case]
    mm = build_mmseg(mm_cfg)
    path = _save(tmp_path, f"{case}.pth", mm)
    nearest = dict(keys, **{"MODEL.TIMM.HRNET_FUSE_UPSAMPLE": "nearest"})
    for load in (lambda m: load_model_weights(m, path),
                 lambda m: SegDistillCheckpointer(m).load(path),
                 lambda m: load_foreign_weights(m, path)):
        ours = our_model(nearest, kwargs)
        before = {k: v.clone() for k, v in ours.state_dict().items()}
        with pytest.raises(SourceOptionsError, match=r"MODEL\.TIMM\.HRNET_FUSE_UPSAMPLE bilinear"):
            load(ours)
        assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())  # nothing loaded
    ours = our_model(keys, kwargs)  # bilinear: loads, and gives mmsegmentation's logits
    load_model_weights(ours, path)
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    expected = mmseg_logits(mm, x)
    assert _rel_err(_logits(ours, x), expected) < REL_TOL


def test_teacher_key_is_named(tmp_path):
    mm_cfg, keys, kwargs, _ = CASES["fcn_hrnet"]
    path = _save(tmp_path, "fcn_hr18s.pth", build_mmseg(mm_cfg))
    ours = our_model(dict(keys, **{"MODEL.TIMM.HRNET_FUSE_UPSAMPLE": "nearest"}), kwargs)
    with pytest.raises(SourceOptionsError, match=r"MODEL\.DISTILL\.TEACHER\.WEIGHTS .*fcn_hr18s\.pth"):
        load_foreign_weights(ours, path)


def test_mmseg_align_corners_from_meta_or_zoo_name(tmp_path):
    mm_cfg, keys, kwargs, _ = CASES["pspnet_r50_d8"]  # trained with align_corners=False
    mm = build_mmseg(mm_cfg)
    aligned = dict(keys, **{"MODEL.SEM_SEG_HEAD.ALIGN_CORNERS": True})
    refused = {
        "meta 0.x": _save(tmp_path, "a.pth", mm, {"config": repr(mm_cfg)}),
        "meta 1.x": _save(tmp_path, "b.pth", mm, {"cfg": "model = dict(decode_head=dict(align_corners=False))"}),
        "zoo name": _save(tmp_path, "pspnet_r50-d8_512x1024_40k_cityscapes_20200605_003338-2966598c.pth", mm),
    }
    for how, path in refused.items():
        with pytest.raises(SourceOptionsError, match=r"MODEL\.SEM_SEG_HEAD\.ALIGN_CORNERS False") as e:
            load_model_weights(our_model(aligned, kwargs), path)
        assert "(the config has True" in str(e.value), how
        load_model_weights(our_model(keys, kwargs), path)  # the file's own value loads
    # the file cannot tell (no config text, another name): not refused
    load_model_weights(our_model(aligned, kwargs), _save(tmp_path, "renamed.pth", mm))


def test_mmseg_769_file_needs_align_corners(tmp_path):
    mm_cfg, keys, kwargs, _ = CASES["isanet_r18_d8_align_corners"]
    path = _save(tmp_path, "isanet_r18-d8_769x769_80k_cityscapes.pth", build_mmseg(mm_cfg))
    with pytest.raises(SourceOptionsError, match=r"MODEL\.SEM_SEG_HEAD\.ALIGN_CORNERS True"):
        load_model_weights(our_model(dict(keys, **{"MODEL.SEM_SEG_HEAD.ALIGN_CORNERS": False}), kwargs), path)
    load_model_weights(our_model(keys, kwargs), path)


def test_cirkd_file_needs_align_corners():
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from segdistill import add_segdistill_config

    with open(os.path.join(REPO, "tests", "data", "cirkd_manifest.json")) as f:
        shapes = json.load(f)["models"]["deeplabv3_resnet18_citys"]
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "reproduce", "hwd", "deeplabv3_r18_student.yaml"))
    cfg.MODEL.DEVICE, cfg.MODEL.NORM, cfg.MODEL.TIMM.CHECKPOINT = "meta", "BN", ""
    assert cfg.MODEL.SEM_SEG_HEAD.ALIGN_CORNERS
    with torch.device("meta"):
        assert convert_model_state(state, build_model(cfg), "cirkd", source="deeplabv3_resnet18_citys.pth")
        cfg.MODEL.SEM_SEG_HEAD.ALIGN_CORNERS = False
        model = build_model(cfg)
    with pytest.raises(SourceOptionsError, match=r"MODEL\.SEM_SEG_HEAD\.ALIGN_CORNERS True"):
        convert_model_state(state, model, "cirkd", source="deeplabv3_resnet18_citys.pth")
