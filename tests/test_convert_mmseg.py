"""mmsegmentation checkpoints: every architecture the converter supports, against mmseg's own forward.

For each pair, mmsegmentation 1.2.2 (the test-only oracle, tests/mmseg_oracle.py) builds
its model with random weights and random BatchNorm statistics; its state dict is saved to a
file, converted and loaded by ``segdistill.convert`` into the model this project builds
from the matching config keys; both give the same logits on the same input (eval, float32,
max abs difference < 1e-4) and have the same number of parameters. Widths are narrow so
that the file runs in seconds.
"""
from __future__ import annotations

import pytest
import torch

from conftest import set_keys
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import SemanticSegmentor, build_sem_seg_head
from mmseg_oracle import CE, NORM, build_mmseg, mmseg_logits
from segdistill import add_segdistill_config
from segdistill.convert import CheckpointMismatchError, load_model_weights
from segdistill.modeling.backbones import HRNetBackbone, TimmBackbone

NUM_CLASSES = 5
TOL = 1e-4

# ResNetV1c at 1/8 of the width (stem 16 = 8-8-16, stages 8..64 base channels).
R_TINY = dict(stem_channels=16, base_channels=8)
TIMM_R_TINY = {"channels": (8, 16, 32, 64)}


def resnet_v1c(depth, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), **kw):
    return dict(type="ResNetV1c", depth=depth, num_stages=4, out_indices=(0, 1, 2, 3), dilations=dilations,
                strides=strides, norm_cfg=NORM, norm_eval=False, style="pytorch", contract_dilation=True,
                **R_TINY, **kw)


def aux(in_channels, align_corners=False):
    return dict(type="FCNHead", in_channels=in_channels, in_index=2, channels=8, num_convs=1, concat_input=False,
                dropout_ratio=0.1, num_classes=NUM_CLASSES, norm_cfg=NORM, align_corners=align_corners,
                loss_decode=dict(CE, loss_weight=0.4))


def head(type_, **kw):
    return dict(type=type_, dropout_ratio=kw.pop("dropout_ratio", 0.1), num_classes=NUM_CLASSES, norm_cfg=NORM,
                align_corners=kw.pop("align_corners", False), loss_decode=CE, **kw)


HR_EXTRA = dict(  # timm's hrnet_w18_small
    stage1=dict(num_modules=1, num_branches=1, block="BOTTLENECK", num_blocks=(1,), num_channels=(32,)),
    stage2=dict(num_modules=1, num_branches=2, block="BASIC", num_blocks=(2, 2), num_channels=(16, 32)),
    stage3=dict(num_modules=1, num_branches=3, block="BASIC", num_blocks=(2, 2, 2), num_channels=(16, 32, 64)),
    stage4=dict(num_modules=1, num_branches=4, block="BASIC", num_blocks=(2, 2, 2, 2), num_channels=(16, 32, 64, 128)),
)
HR_IN = [16, 32, 64, 128]
RES = ["res2", "res3", "res4", "res5"]
R_KEYS = {"MODEL.TIMM.STEM_TYPE": "deep", "MODEL.TIMM.STEM_WIDTH": 8, "MODEL.TIMM.DILATION_RULE": "mmseg"}
AUX_KEYS = {"MODEL.SEM_SEG_HEAD.AUX_IN_FEATURE": "res4", "MODEL.SEM_SEG_HEAD.AUX_CHANNELS": 8}

# name: (mmseg config, our config keys, timm model kwargs, input size)
CASES = {
    "deeplabv3_r18_d8": (
        dict(type="EncoderDecoder", backbone=resnet_v1c(18),
             decode_head=head("ASPPHead", in_channels=64, in_index=3, channels=16, dilations=(1, 12, 24, 36)),
             auxiliary_head=aux(32)),
        {"MODEL.TIMM.NAME": "resnet18", **R_KEYS, "MODEL.TIMM.OUT_FEATURES": ["res4", "res5"], **AUX_KEYS,
         "MODEL.SEM_SEG_HEAD.NAME": "SegDeepLabV3Head", "MODEL.SEM_SEG_HEAD.LAYOUT": "mmseg",
         "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS": 16, "MODEL.SEM_SEG_HEAD.ASPP_DILATIONS": [12, 24, 36],
         "MODEL.SEM_SEG_HEAD.ASPP_DROPOUT": 0.0},
        TIMM_R_TINY, (64, 64)),
    "pspnet_r50_d8": (
        dict(type="EncoderDecoder", backbone=resnet_v1c(50),
             decode_head=head("PSPHead", in_channels=256, in_index=3, channels=16, pool_scales=(1, 2, 3, 6)),
             auxiliary_head=aux(128)),
        {"MODEL.TIMM.NAME": "resnet50", **R_KEYS, "MODEL.TIMM.OUT_FEATURES": ["res4", "res5"], **AUX_KEYS,
         "MODEL.SEM_SEG_HEAD.NAME": "PSPHead", "MODEL.SEM_SEG_HEAD.PSP_POOL_CHANNELS": 16,
         "MODEL.SEM_SEG_HEAD.CONVS_DIM": 16},
        TIMM_R_TINY, (64, 64)),
    "fcn_r50_d16_mg124": (
        dict(type="EncoderDecoder", backbone=resnet_v1c(50, dilations=(1, 1, 1, 2), strides=(1, 2, 2, 1),
                                                         multi_grid=(1, 2, 4)),
             decode_head=head("FCNHead", in_channels=256, in_index=3, channels=16, num_convs=2, concat_input=True)),
        {"MODEL.TIMM.NAME": "resnet50", **R_KEYS, "MODEL.TIMM.OUTPUT_STRIDE": 16, "MODEL.TIMM.MULTI_GRID": [1, 2, 4],
         "MODEL.TIMM.OUT_FEATURES": ["res5"], "MODEL.SEM_SEG_HEAD.NAME": "FCNHead",
         "MODEL.SEM_SEG_HEAD.CONVS_DIM": 16, "MODEL.SEM_SEG_HEAD.NUM_CONVS": 2},
        TIMM_R_TINY, (64, 96)),
    "deeplabv3plus_mv2_d8": (
        dict(type="EncoderDecoder",
             backbone=dict(type="MobileNetV2", widen_factor=0.5, strides=(1, 2, 2, 1, 1, 1, 1),
                           dilations=(1, 1, 1, 2, 2, 4, 4), out_indices=(1, 2, 4, 6), norm_cfg=NORM),
             decode_head=head("DepthwiseSeparableASPPHead", in_channels=160, in_index=3, channels=16,
                              dilations=(1, 12, 24, 36), c1_in_channels=16, c1_channels=8),
             auxiliary_head=aux(48)),
        {"MODEL.TIMM.NAME": "mobilenetv2_050", "MODEL.TIMM.DILATION_RULE": "mmseg",
         "MODEL.TIMM.OUT_FEATURES": ["res2", "res4", "res5"], **AUX_KEYS,
         "MODEL.SEM_SEG_HEAD.NAME": "SegDeepLabV3PlusHead", "MODEL.SEM_SEG_HEAD.LAYOUT": "mmseg",
         "MODEL.SEM_SEG_HEAD.IN_FEATURES": ["res2", "res5"], "MODEL.SEM_SEG_HEAD.PROJECT_FEATURES": ["res2"],
         "MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS": [8], "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS": 16,
         "MODEL.SEM_SEG_HEAD.CONVS_DIM": 16, "MODEL.SEM_SEG_HEAD.ASPP_DILATIONS": [12, 24, 36],
         "MODEL.SEM_SEG_HEAD.ASPP_DROPOUT": 0.0},
        None, (64, 64)),
    # align_corners=True (mmseg's 769x769 Cityscapes models) and a feature map (9 x 11) that
    # is not a multiple of the 8 x 8 groups (padding path).
    "isanet_r18_d8_align_corners": (
        dict(type="EncoderDecoder", backbone=resnet_v1c(18),
             decode_head=head("ISAHead", in_channels=64, in_index=3, channels=16, isa_channels=8,
                              down_factor=(8, 8), align_corners=True),
             auxiliary_head=aux(32, align_corners=True)),
        {"MODEL.TIMM.NAME": "resnet18", **R_KEYS, "MODEL.TIMM.OUT_FEATURES": ["res4", "res5"], **AUX_KEYS,
         "MODEL.SEM_SEG_HEAD.NAME": "ISAHead", "MODEL.SEM_SEG_HEAD.CONVS_DIM": 16,
         "MODEL.SEM_SEG_HEAD.ISA_CHANNELS": 8, "MODEL.SEM_SEG_HEAD.ALIGN_CORNERS": True},
        TIMM_R_TINY, (72, 88)),
    "fcn_hrnet": (
        dict(type="EncoderDecoder", backbone=dict(type="HRNet", extra=HR_EXTRA, norm_cfg=NORM),
             decode_head=head("FCNHead", in_channels=HR_IN, in_index=(0, 1, 2, 3), channels=sum(HR_IN),
                              input_transform="resize_concat", kernel_size=1, num_convs=1, concat_input=False,
                              dropout_ratio=-1)),
        {"MODEL.TIMM.NAME": "hrnet_w18_small", "MODEL.TIMM.OUTPUT_STRIDE": 32,
         "MODEL.TIMM.HRNET_FUSE_UPSAMPLE": "bilinear", "MODEL.TIMM.OUT_FEATURES": RES,
         "MODEL.SEM_SEG_HEAD.NAME": "HRNetV2Head", "MODEL.SEM_SEG_HEAD.IN_FEATURES": RES},
        None, (64, 64)),
    "ocrnet_hrnet": (
        dict(type="CascadeEncoderDecoder", num_stages=2, backbone=dict(type="HRNet", extra=HR_EXTRA, norm_cfg=NORM),
             decode_head=[
                 head("FCNHead", in_channels=HR_IN, in_index=(0, 1, 2, 3), channels=sum(HR_IN),
                      input_transform="resize_concat", kernel_size=1, num_convs=1, concat_input=False,
                      dropout_ratio=-1),
                 head("OCRHead", in_channels=HR_IN, in_index=(0, 1, 2, 3), input_transform="resize_concat",
                      channels=32, ocr_channels=16, dropout_ratio=-1),
             ]),
        {"MODEL.TIMM.NAME": "hrnet_w18_small", "MODEL.TIMM.OUTPUT_STRIDE": 32,
         "MODEL.TIMM.HRNET_FUSE_UPSAMPLE": "bilinear", "MODEL.TIMM.OUT_FEATURES": RES,
         "MODEL.SEM_SEG_HEAD.NAME": "OCRHead", "MODEL.SEM_SEG_HEAD.IN_FEATURES": RES,
         "MODEL.SEM_SEG_HEAD.OCR_MID_CHANNELS": 32, "MODEL.SEM_SEG_HEAD.OCR_KEY_CHANNELS": 16,
         "MODEL.SEM_SEG_HEAD.OCR_DROPOUT": 0.0},
        None, (64, 64)),
}


def our_model(keys: dict, model_kwargs=None) -> SemanticSegmentor:
    """The project's segmentor from config ``keys`` (a backbone built with ``model_kwargs``)."""
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255
    cfg.MODEL.SEM_SEG_HEAD.NORM = "BN"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res5"]
    cfg.MODEL.TIMM.OUTPUT_STRIDE = 8
    # mmsegmentation's rule (its EncoderDecoder resizes the logits to the input size), which its
    # files need: every case here is an mmsegmentation model
    cfg.MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE = "input"
    set_keys(cfg, **keys)
    cls = HRNetBackbone if cfg.MODEL.TIMM.NAME.startswith("hrnet") else TimmBackbone
    backbone = cls(**dict(cls.from_config(cfg, ShapeSpec(channels=3)), model_kwargs=model_kwargs))
    head = build_sem_seg_head(cfg, backbone.output_shape())
    return SemanticSegmentor(backbone=backbone, sem_seg_head=head, pixel_mean=[0.0, 0.0, 0.0],
                             pixel_std=[1.0, 1.0, 1.0]).eval()


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())



@pytest.mark.parametrize("name", sorted(CASES))
def test_mmseg_checkpoint_gives_mmseg_logits(name, tmp_path):
    mm_cfg, keys, model_kwargs, (h, w) = CASES[name]
    mm = build_mmseg(mm_cfg)
    path = tmp_path / f"{name}.pth"
    # a model-zoo file: state_dict + a meta dict (class names, config text)
    torch.save({"meta": {"CLASSES": tuple(f"c{i}" for i in range(NUM_CLASSES)), "config": repr(mm_cfg)},
                "state_dict": mm.state_dict()}, path)
    ours = our_model(keys, model_kwargs)
    assert _params(ours) == _params(mm), (_params(ours), _params(mm))
    conv = load_model_weights(ours, str(path))
    assert conv is not None and conv.source_format == "mmseg" and not conv.unmatched
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    expected = mmseg_logits(mm, x)
    with torch.no_grad():
        got, _ = ours.sem_seg_head(ours.backbone(x))
    assert got.shape == expected.shape == (2, NUM_CLASSES, h, w)
    diff = (got - expected).abs().max().item()
    assert diff < TOL, f"{name}: max abs difference {diff:.2e} (logits up to {expected.abs().max():.2f})"
    assert expected.std() > 1e-2  # random weights that give informative logits, not a constant


def test_wrong_architecture_names_file_expected_model_and_keys(tmp_path):
    """A PSPNet file into a DeepLabV3 config: the error names the file, what the config builds,
    what the file is, the first unmatched keys and the config switches that fit the file."""
    mm_cfg, _, _, _ = CASES["pspnet_r50_d8"]
    path = tmp_path / "pspnet_r50-d8_512x1024_80k_cityscapes.pth"
    torch.save({"state_dict": build_mmseg(mm_cfg).state_dict()}, path)
    _, keys, kwargs, _ = CASES["deeplabv3_r18_d8"]
    ours = our_model(keys, kwargs)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as e:
        load_model_weights(ours, str(path))
    msg = str(e.value)
    assert "pspnet_r50-d8_512x1024_80k_cityscapes.pth" in msg
    assert "expected: SegDeepLabV3Head, layout mmseg" in msg and "resnet body" in msg
    assert "mmsegmentation PSPHead on ResNetV1c-50" in msg
    assert "decode_head.psp_modules.0.1.conv.weight" in msg  # the first unmatched keys
    assert "MODEL.SEM_SEG_HEAD.NAME PSPHead" in msg and "MODEL.TIMM.NAME resnet50" in msg
    # nothing was loaded
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())


def test_truncated_and_partial_files_are_clear_errors(tmp_path):
    from segdistill.convert import CheckpointReadError

    mm_cfg, keys, kwargs, _ = CASES["deeplabv3_r18_d8"]
    state = build_mmseg(mm_cfg).state_dict()
    full = tmp_path / "full.pth"
    torch.save({"state_dict": state}, full)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    ours = our_model(keys, kwargs)
    with pytest.raises(CheckpointReadError, match=r"cut\.pth.*truncated"):
        load_model_weights(ours, str(cut))
    partial = tmp_path / "partial.pth"  # a state dict without its decode head
    torch.save({"state_dict": {k: v for k, v in state.items() if not k.startswith("decode_head.bottleneck")}},
               partial)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)partial\.pth.*not in the file: sem_seg_head\.aspp\.project"):
        load_model_weights(ours, str(partial))


def test_untrusted_pickles_are_refused_and_numpy_meta_is_allowed(tmp_path):
    import argparse

    import numpy as np

    from segdistill.convert import CheckpointReadError, load_checkpoint_file

    ok = tmp_path / "numpy_meta.pth"
    torch.save({"meta": {"best_mIoU": np.float64(0.8), "hist": np.zeros(3)}, "state_dict": {"w": torch.ones(1)}}, ok)
    assert load_checkpoint_file(str(ok))["meta"]["best_mIoU"] == 0.8
    bad = tmp_path / "objects.pth"
    torch.save({"meta": argparse.Namespace(a=1), "state_dict": {"w": torch.ones(1)}}, bad)
    with pytest.raises(CheckpointReadError, match=r"(?s)objects\.pth.*argparse\.Namespace.*--unsafe-unpickle"):
        load_checkpoint_file(str(bad))
    assert load_checkpoint_file(str(bad), unsafe_unpickle=True)["meta"].a == 1
