"""A whole-model file loads only into a model that computes what the file's source computed.

Options that change no tensor's shape (HRNet's branch fusion, ``align_corners``, the output
resize rule) pass the fit check; where the file's source pins them (segdistill.convert.source_options), a config
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


def test_mmseg_file_needs_the_input_resize_rule(tmp_path):
    """mmsegmentation resizes the logits to the input size: its file loaded into a model under the
    stride rule would give other outputs wherever the input is not a multiple of the stride."""
    mm_cfg, keys, kwargs, _ = CASES["pspnet_r50_d8"]
    path = _save(tmp_path, "pspnet_r50-d8.pth", build_mmseg(mm_cfg))
    stride = dict(keys, **{"MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE": "stride"})
    for load in (lambda m: load_model_weights(m, path), lambda m: SegDistillCheckpointer(m).load(path),
                 lambda m: load_foreign_weights(m, path)):
        with pytest.raises(SourceOptionsError, match=r"MODEL\.SEM_SEG_HEAD\.OUTPUT_RESIZE input   "
                                                     r"\(the config has stride;") as e:
            load(our_model(stride, kwargs))
        assert "ALIGN_CORNERS" not in str(e.value)  # only what contradicts the file is named
    load_model_weights(our_model(keys, kwargs), path)  # our_model: "input"


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
    assert cfg.MODEL.SEM_SEG_HEAD.ALIGN_CORNERS and cfg.MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE == "input"
    with torch.device("meta"):
        assert convert_model_state(state, build_model(cfg), "cirkd", source="deeplabv3_resnet18_citys.pth")
        cfg.MODEL.SEM_SEG_HEAD.ALIGN_CORNERS = False
        model = build_model(cfg)
        cfg.MODEL.SEM_SEG_HEAD.ALIGN_CORNERS = True
        cfg.MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE = "stride"  # CIRKD's eval.py resizes to the input size
        stride = build_model(cfg)
    with pytest.raises(SourceOptionsError, match=r"MODEL\.SEM_SEG_HEAD\.ALIGN_CORNERS True"):
        convert_model_state(state, model, "cirkd", source="deeplabv3_resnet18_citys.pth")
    with pytest.raises(SourceOptionsError, match=r"MODEL\.SEM_SEG_HEAD\.OUTPUT_RESIZE input"):
        convert_model_state(state, stride, "cirkd", source="deeplabv3_resnet18_citys.pth")


# ---------------------------------------------------------------------------------------------
# DeepLabV3 in the mmseg layout
# ---------------------------------------------------------------------------------------------
def test_mmseg_deeplabv3_hint_names_bottleneck_convs(tmp_path):
    from segdistill.convert import CheckpointMismatchError

    mm_cfg, keys, kwargs, _ = CASES["deeplabv3_r18_d8"]
    path = _save(tmp_path, "deeplabv3_r18-d8.pth", build_mmseg(mm_cfg))
    ours = our_model(dict(keys, **{"MODEL.SEM_SEG_HEAD.ASPP_BOTTLENECK_CONVS": 1}), kwargs)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)hint: .*MODEL\.SEM_SEG_HEAD\.ASPP_BOTTLENECK_CONVS 0"):
        load_model_weights(ours, path)


@pytest.mark.parametrize("case", ["deeplabv3_r18_d8", "deeplabv3plus_mv2_d8"])
def test_aspp_dropout_is_refused_under_mmseg_layout(case):
    from segdistill.config import ConfigError

    _, keys, kwargs, _ = CASES[case]
    with pytest.raises(ConfigError, match=r"ASPP_DROPOUT 0\.1 under MODEL\.SEM_SEG_HEAD\.LAYOUT mmseg.*"
                                          r"Set MODEL\.SEM_SEG_HEAD\.ASPP_DROPOUT 0\.0"):
        our_model(dict(keys, **{"MODEL.SEM_SEG_HEAD.ASPP_DROPOUT": 0.1}), kwargs)
    # detectron2's layout has its dropout inside the ASPP
    our_model(dict(keys, **{"MODEL.SEM_SEG_HEAD.LAYOUT": "detectron2", "MODEL.SEM_SEG_HEAD.ASPP_DROPOUT": 0.1,
                            "MODEL.SEM_SEG_HEAD.PROJECT_FEATURES": ["res2"]}), kwargs)


def test_mmseg_deeplabv3_config_loads_an_mmseg_file_as_it_is(tmp_path):
    """configs/reproduce/mmseg/deeplabv3_r101_teacher.yaml with only its widths narrowed (the
    oracle's ResNetV1c at 1/8 of the width): the file loads with no layout key added, and gives
    mmsegmentation's logits. (tests/test_reproduce.py checks the full widths by names and shapes.)"""
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import SemanticSegmentor, build_sem_seg_head

    from conftest import set_keys
    from segdistill import add_segdistill_config
    from segdistill.modeling.backbones import TimmBackbone
    from test_convert_mmseg import NUM_CLASSES, TIMM_R_TINY, aux, head, resnet_v1c

    mm = build_mmseg(dict(type="EncoderDecoder", backbone=resnet_v1c(101),
                          decode_head=head("ASPPHead", in_channels=256, in_index=3, channels=16,
                                           dilations=(1, 12, 24, 36)),
                          auxiliary_head=aux(128)))
    path = _save(tmp_path, "deeplabv3_r101-d8_512x1024_80k_cityscapes.pth", mm)
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "reproduce", "mmseg", "deeplabv3_r101_teacher.yaml"))
    set_keys(cfg, **{"MODEL.NORM": "BN", "MODEL.TIMM.CHECKPOINT": "", "MODEL.TIMM.STEM_WIDTH": 8,
                     "MODEL.SEM_SEG_HEAD.NUM_CLASSES": NUM_CLASSES, "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS": 16,
                     "MODEL.SEM_SEG_HEAD.AUX_CHANNELS": 8})
    backbone = TimmBackbone(**dict(TimmBackbone.from_config(cfg, ShapeSpec(channels=3)), model_kwargs=TIMM_R_TINY))
    ours = SemanticSegmentor(backbone=backbone, sem_seg_head=build_sem_seg_head(cfg, backbone.output_shape()),
                             pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3).eval()
    load_model_weights(ours, path)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert _rel_err(_logits(ours, x), mmseg_logits(mm, x)) < REL_TOL
