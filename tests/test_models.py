"""Every backbone x head builds, trains a step and infers at the input's original size."""

import pytest
import torch

from conftest import make_backbone, random_batch, tiny_cfg
from detectron2.modeling import build_model

BACKBONES = [
    ("resnet18", 8), ("resnet18", 16), ("resnet50", 8), ("resnet101", 16),
    ("mobilenetv2_100", 8), ("hrnet_w18_small", 32), ("hrnet_w18", 32), ("hrnet_w48", 32),
]
HEADS = ["SegDeepLabV3Head", "SegDeepLabV3PlusHead", "FCNHead"]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("backbone,os_", BACKBONES, ids=[f"{b}-os{o}" for b, o in BACKBONES])
def test_train_and_inference_step(backbone, os_, head):
    torch.manual_seed(0)
    cfg = tiny_cfg(backbone, head, output_stride=os_, num_classes=5)
    model = build_model(cfg)
    model.train()
    losses = model(random_batch(2, 64, 64, 5))
    assert set(losses) == {"loss_sem_seg"}
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    first = next(p for p in model.backbone.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0, "no gradient reached the backbone"

    model.eval()
    with torch.no_grad():
        out = model(random_batch(1, 70, 90, 5, with_labels=False))
    assert out[0]["sem_seg"].shape == (5, 70, 90)
    with torch.no_grad():  # output at the requested height/width, not the input's
        out = model([{**random_batch(1, 64, 64, 5, with_labels=False)[0], "height": 100, "width": 120}])
    assert out[0]["sem_seg"].shape == (5, 100, 120)


def test_auxiliary_head_adds_a_training_loss_only():
    torch.manual_seed(0)
    cfg = tiny_cfg("resnet18", "FCNHead")
    cfg.MODEL.TIMM.OUT_FEATURES = ["res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.AUX_IN_FEATURE = "res4"
    cfg.MODEL.SEM_SEG_HEAD.AUX_LOSS_WEIGHT = 0.4
    model = build_model(cfg).train()
    losses = model(random_batch(2, 64, 64, 5))
    assert set(losses) == {"loss_sem_seg", "loss_aux"} and torch.isfinite(losses["loss_aux"])
    # the weight is applied to the same outputs: 0.8 doubles the 0.4 term
    head = model.sem_seg_head
    out = head.forward_outputs(model.backbone(torch.randn(2, 3, 64, 64)))
    target = torch.randint(0, 5, (2, 64, 64))
    l4 = head.losses(out, target)["loss_aux"]
    head.aux_head.loss_weight = 0.8
    assert torch.allclose(head.losses(out, target)["loss_aux"], 2 * l4)
    model.eval()
    with torch.no_grad():
        assert "aux_logits" not in head.forward_outputs(model.backbone(torch.randn(1, 3, 64, 64)))


def test_every_head_lists_the_contract_arguments_in_its_signature():
    """Heads pass the contract's arguments through ``**contract``; their signatures still name
    them, so that a misspelled lazy override of a head is refused before the build."""
    import inspect

    from segdistill.config import LazyOverrideError, check_lazy_override_key
    from segdistill.modeling.heads.base import CONTRACT_ARGS, seg_head_names
    from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

    for name in seg_head_names():
        params = inspect.signature(SEM_SEG_HEADS_REGISTRY.get(name)).parameters
        assert set(CONTRACT_ARGS) <= set(params), name
        assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in params.values()), name
    tree = {"head": {"_target_": SEM_SEG_HEADS_REGISTRY.get("FCNHead")}}
    check_lazy_override_key(tree, "head.loss_type")  # an argument the config does not set yet
    with pytest.raises(LazyOverrideError, match="takes no argument 'loss_typ'"):
        check_lazy_override_key(tree, "head.loss_typ")


def test_backbone_stage_names_and_strides():
    b = make_backbone("resnet50", output_stride=8, out_features=["res2", "res3", "res4", "res5"])
    assert {k: (v.channels, v.stride) for k, v in b.output_shape().items()} == {
        "res2": (256, 4), "res3": (512, 8), "res4": (1024, 8), "res5": (2048, 8)
    }
    feats = b(torch.randn(1, 3, 64, 64))
    for k, v in feats.items():
        assert v.shape[1] == b.output_shape()[k].channels and v.shape[-1] == 64 // b.output_shape()[k].stride


def test_hrnet_exposes_intermediate_stages():
    b = make_backbone("hrnet_w18", out_features=["layer1", "stage2_b0", "stage2_b1", "stage3_b2", "res2", "res5"])
    feats = b(torch.randn(1, 3, 64, 64))
    shapes = b.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        "layer1": (256, 4), "stage2_b0": (18, 4), "stage2_b1": (36, 8), "stage3_b2": (72, 16),
        "res2": (18, 4), "res5": (144, 32),
    }
    for k, v in feats.items():
        assert v.shape[1] == shapes[k].channels and v.shape[-1] == 64 // shapes[k].stride


def test_unknown_stage_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"valid names: \['res1', 'res2', 'res3', 'res4', 'res5'\]"):
        make_backbone("resnet18", out_features=["p5"])
    cfg = tiny_cfg("resnet18", "SegDeepLabV3Head")
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res4"]
    with pytest.raises(ValueError, match="backbone gives"):
        build_model(cfg)
    cfg = tiny_cfg("hrnet_w18_small", "FCNHead")
    cfg.MODEL.TIMM.OUTPUT_STRIDE = 8
    with pytest.raises(ValueError, match="OUTPUT_STRIDE must be 32"):
        build_model(cfg)


@pytest.mark.parametrize("norm", ["FrozenBN", "SyncBN"])
def test_norm_switch(norm):
    from timm.layers import FrozenBatchNormAct2d

    b = make_backbone("mobilenetv2_100", output_stride=8, norm=norm)
    kinds = {type(m).__name__ for m in b.modules()}
    bn = [m for m in b.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if norm == "FrozenBN":
        assert not bn and any(isinstance(m, FrozenBatchNormAct2d) for m in b.modules())
        # the activation fused in timm's BatchNormAct2d survives the conversion
        act = [m for m in b.modules() if isinstance(m, FrozenBatchNormAct2d)][0]
        assert not isinstance(act.act, torch.nn.Identity)
    else:
        assert "SyncBatchNormAct" in kinds


def test_local_backbone_checkpoint_loads_and_missing_file_is_clear(tmp_path):
    import timm

    src = timm.create_model("resnet18", pretrained=False)  # a classification checkpoint (with fc)
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)
    b = make_backbone("resnet18", output_stride=8, checkpoint=str(path))
    assert torch.equal(b.body.conv1.weight, src.conv1.weight)
    assert torch.equal(b.body.layer4[1].bn2.running_var, src.layer4[1].bn2.running_var)

    missing = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        make_backbone("resnet18", checkpoint=missing)
    cfg = tiny_cfg("resnet18", "FCNHead")
    cfg.MODEL.TIMM.CHECKPOINT = missing
    with pytest.raises(FileNotFoundError, match="MODEL.TIMM.CHECKPOINT"):
        build_model(cfg)
    wrong = tmp_path / "mbv2.pth"
    torch.save(timm.create_model("mobilenetv2_100").state_dict(), wrong)
    with pytest.raises(ValueError, match=r"(?s)mbv2.pth.*does not fit.*expected: a timm resnet body"):
        make_backbone("resnet18", checkpoint=str(wrong))


def test_model_weights_missing_file_is_clear(tmp_path):
    from segdistill.convert import check_weights_file

    with pytest.raises(FileNotFoundError, match=r"missing\.pth.*MODEL.WEIGHTS"):
        check_weights_file(str(tmp_path / "missing.pth"))
    ok = tmp_path / "ok.pth"
    ok.write_bytes(b"x")
    assert check_weights_file(str(ok)) == str(ok)  # URLs: tests/test_fetch_weights.py
