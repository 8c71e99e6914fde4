"""ImageNet backbone weights in their common formats load into the project's backbones
(``MODEL.TIMM.CHECKPOINT``) with no missing tensor and give the source model's stage features.

Sources are built here with random weights (and random BatchNorm statistics): torchvision's
and timm's ResNet and MobileNetV2, OpenMMLab's ResNetV1c, MobileNetV2 and HRNet (mmseg's
own backbones, saved with mmcls's ``backbone.`` prefix and classifier), timm's HRNet with its
classification head (the names of the official HRNet release).
"""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from conftest import make_backbone
from mmseg_oracle import NORM, import_mmseg, randomize
from segdistill.convert import CheckpointMismatchError, detect_backbone_format

TOL = 1e-4



def _hooked(model, modules):
    """Run ``model`` and return the outputs of ``modules`` (name -> module)."""
    out = {}
    handles = [m.register_forward_hook(lambda _m, _i, o, n=n: out.__setitem__(n, o)) for n, m in modules.items()]
    return out, handles


def _compare(ours, expected: dict, x):
    with torch.no_grad():
        got = ours.eval()(x)
    assert set(expected) <= set(got), (sorted(expected), sorted(got))
    for k, v in expected.items():
        assert got[k].shape == v.shape, (k, got[k].shape, v.shape)
        diff = (got[k] - v).abs().max().item()
        assert diff < TOL * max(1.0, v.abs().max().item()), f"{k}: max abs difference {diff:.2e}"
        assert v.std() > 1e-3


def _save(tmp_path, name, state):
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


def _stage_outputs(model, names, x):
    out, handles = _hooked(model, {n: model.get_submodule(n) for n in names})
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return out


HR = ["res2", "res3", "res4", "res5"]
RESNET_STAGES = {"res2": "layer1", "res3": "layer2", "res4": "layer3", "res5": "layer4"}


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_resnet_imagenet_weights(source, tmp_path):
    torch.manual_seed(0)
    src = torchvision.models.resnet18() if source == "torchvision" else timm.create_model("resnet18")
    randomize(src, 0)
    path = _save(tmp_path, f"resnet18_{source}.pth", src.state_dict())  # with the fc classifier
    assert detect_backbone_format(src.state_dict()) == "timm"  # torchvision's ResNet names are timm's
    x = torch.randn(2, 3, 64, 64)
    feats = _stage_outputs(src, list(RESNET_STAGES.values()), x)
    ours = make_backbone("resnet18", output_stride=32, out_features=list(RESNET_STAGES), checkpoint=path)
    _compare(ours, {k: feats[v] for k, v in RESNET_STAGES.items()}, x)


def test_mobilenetv2_torchvision_weights(tmp_path):
    torch.manual_seed(0)
    src = torchvision.models.mobilenet_v2()
    randomize(src, 0)
    path = _save(tmp_path, "mobilenet_v2-b0353104.pth", src.state_dict())
    assert detect_backbone_format(src.state_dict()) == "torchvision"
    # torchvision's features[i] that end the levels res1..res5 (strides 2..32)
    levels = {"res1": "features.1", "res2": "features.3", "res3": "features.6", "res4": "features.13",
              "res5": "features.17"}
    x = torch.randn(2, 3, 64, 64)
    feats = _stage_outputs(src, list(levels.values()), x)
    ours = make_backbone("mobilenetv2_100", output_stride=32, out_features=list(levels), checkpoint=path)
    _compare(ours, {k: feats[v] for k, v in levels.items()}, x)


def test_mobilenetv2_timm_weights(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("mobilenetv2_100")  # classification model: conv_head, bn2, classifier
    randomize(src, 0)
    path = _save(tmp_path, "mobilenetv2_100.pth", src.state_dict())
    levels = {"res2": "blocks.1", "res3": "blocks.2", "res4": "blocks.4", "res5": "blocks.6"}
    x = torch.randn(2, 3, 64, 64)
    feats = _stage_outputs(src, list(levels.values()), x)
    ours = make_backbone("mobilenetv2_100", output_stride=32, out_features=list(levels), checkpoint=path)
    _compare(ours, {k: feats[v] for k, v in levels.items()}, x)


def _mmcls_file(tmp_path, name, backbone, extra_head):
    """An OpenMMLab classification file: ``backbone.*`` + the classifier ``head.*``."""
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update(extra_head)
    return _save(tmp_path, name, {"meta": {"mmcls_version": "0.x"}, "state_dict": state})


def test_openmmlab_resnet_v1c_weights(tmp_path):
    """ResNetV1c (deep stem) at output stride 8 in mmseg's dilation convention."""
    models = import_mmseg()
    torch.manual_seed(0)
    src = models.build(dict(type="ResNetV1c", depth=50, out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4),
                            strides=(1, 2, 1, 1), contract_dilation=True, norm_cfg=NORM, stem_channels=16,
                            base_channels=8))
    randomize(src, 0)
    path = _mmcls_file(tmp_path, "resnet50_v1c.pth", src, {"head.fc.weight": torch.zeros(10, 256)})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        src.eval()  # (mmseg backbones: train() returns None)
        feats = src(x)
    ours = make_backbone("resnet50", output_stride=8, out_features=list(RESNET_STAGES), checkpoint=path,
                         stem_type="deep", stem_width=8, dilation_rule="mmseg", model_kwargs={"channels": (8, 16, 32, 64)})
    _compare(ours, dict(zip(RESNET_STAGES, feats)), x)


def test_openmmlab_mobilenetv2_weights(tmp_path):
    models = import_mmseg()
    torch.manual_seed(0)
    src = models.build(dict(type="MobileNetV2", widen_factor=0.5, strides=(1, 2, 2, 1, 1, 1, 1),
                            dilations=(1, 1, 1, 2, 2, 4, 4), out_indices=(1, 2, 4, 6), norm_cfg=NORM))
    randomize(src, 0)
    extra = {"backbone.conv2.conv.weight": torch.zeros(1280, 160, 1, 1), "head.fc.weight": torch.zeros(10, 1280)}
    path = _mmcls_file(tmp_path, "mobilenet_v2_batch256_imagenet.pth", src, extra)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        src.eval()  # (mmseg backbones: train() returns None)
        feats = src(x)
    ours = make_backbone("mobilenetv2_050", output_stride=8, out_features=["res2", "res3", "res4", "res5"],
                         checkpoint=path, dilation_rule="mmseg")
    assert {k: s.stride for k, s in ours.output_shape().items()} == {"res2": 4, "res3": 8, "res4": 8, "res5": 8}
    _compare(ours, dict(zip(["res2", "res3", "res4", "res5"], feats)), x)


def test_openmmlab_hrnet_weights(tmp_path):
    from test_convert_mmseg import HR_EXTRA

    models = import_mmseg()
    torch.manual_seed(0)
    src = models.build(dict(type="HRNet", extra=HR_EXTRA, norm_cfg=NORM))
    randomize(src, 0)
    path = _mmcls_file(tmp_path, "hrnetv2_w18_small.pth", src, {})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        src.eval()  # (mmseg backbones: train() returns None)
        feats = src(x)
    ours = make_backbone("hrnet_w18_small", checkpoint=path, fuse_upsample="bilinear", out_features=HR)
    _compare(ours, dict(zip(["res2", "res3", "res4", "res5"], feats)), x)


def test_hrnet_release_weights(tmp_path):
    """The official HRNet classification release has timm's names (+ its classification head)."""
    torch.manual_seed(0)
    src = timm.create_model("hrnet_w18_small")  # incre_modules, downsamp_modules, final_layer, classifier
    randomize(src, 0)
    state = src.state_dict()
    assert any(k.startswith("incre_modules.") for k in state)
    path = _save(tmp_path, "hrnet_w18_small_model_v1.pth", state)
    x = torch.randn(2, 3, 64, 64)
    out, handles = _hooked(src, {"stage4": src.stage4})
    with torch.no_grad():
        src.eval()(x)
    ours = make_backbone("hrnet_w18_small", checkpoint=path, checkpoint_format="hrnet", out_features=HR)
    _compare(ours, dict(zip(["res2", "res3", "res4", "res5"], out["stage4"])), x)


def test_stem_mismatch_is_explained(tmp_path):
    models = import_mmseg()
    src = models.build(dict(type="ResNetV1c", depth=18, out_indices=(0, 1, 2, 3), norm_cfg=NORM))
    path = _mmcls_file(tmp_path, "resnet18_v1c-b5776b93.pth", src, {})
    with pytest.raises(CheckpointMismatchError) as e:
        make_backbone("resnet18", checkpoint=path)  # the 7x7 stem
    msg = str(e.value)
    assert "resnet18_v1c-b5776b93.pth" in msg and "7x7 stem" in msg and "openmmlab" in msg
    assert "conv1.0.weight" in msg and "STEM_TYPE deep with STEM_WIDTH 32" in msg
