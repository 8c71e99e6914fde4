"""BatchNorm folding (segdistill.modeling.fold, TEST.FOLD_BN): the folded model gives the unfolded
model's outputs (fp32 within 1e-5 of the largest logit; bf16 autocast within a looser stated
bound) for every model family, the count of norms folded is the count of conv -> norm pairs,
what cannot be folded is left and reported, a training model is refused, and the switch reaches
evaluation (YAML and lazy), tools/predict.py, tools/export_model.py, the anytime model and
benchmarks/overhead.py."""
from __future__ import annotations

import copy
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import REPO, load_script, make_backbone, random_batch, tiny_cfg
from detectron2.layers import Conv2d as D2Conv2d, FrozenBatchNorm2d as D2FrozenBatchNorm2d
from detectron2.modeling import build_model
from mmseg_oracle import randomize
from segdistill.modeling.fold import FOLDABLE_NORMS, fold_batch_norms, fold_batch_norms_report
from segdistill.modeling.meta_arch.anytime import PIXEL
from test_anytime_pixel import exit_logits
from timm.layers.norm_act import BatchNormAct2d

K = 5
# fp32: the folded model within 1e-5 of the unfolded model's logits (relative to the largest logit,
# at least 1), or, for a model whose own float32 rounding is of that order (its distance to the same
# model in float64: 0.9-1.8e-5 for mmseg's OCRNet-HRNet and the MobileNetV2 with RH exits, random
# norms), within 3 times that rounding: two float32 computations of the same function, each that
# far from the exact one, in different directions.
FP32_TOL = 1e-5


def fp32_bound(own_rounding: float) -> float:
    return max(FP32_TOL, 3 * own_rounding)
# bf16 autocast rounds every convolution's inputs and weights to 8 bits of mantissa, folded or not,
# at different places (the folded weight once; the unfolded conv's output, then the norm). How far
# bf16 lands from fp32 depends on the model (1-3 % of the largest logit for the ResNet and HRNet
# models here, 10-30 % for the MobileNetV2 ones with random norms); the stated bound: the folded
# model in bf16 is no further from fp32 than BF16_FACTOR times the unfolded model in bf16, plus
# BF16_SLACK of the largest logit.
BF16_FACTOR, BF16_SLACK = 1.5, 0.01


def logits(model, batch):
    with torch.no_grad():
        return model(batch)[0]["sem_seg"]


def rel_diff(a, b) -> float:
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def foldable_left(model):
    return [n for n, m in model.named_modules() if type(m) in FOLDABLE_NORMS]


def randomized(cfg):
    """The model of ``cfg`` in eval() with random convolutions and BatchNorm statistics and affine
    parameters (a fold of BN at its init would be nearly the identity)."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    randomize(model, 0)
    return model


def _cfg(backbone, head, **keys):
    cfg = tiny_cfg(backbone, head, num_classes=K, **keys)
    cfg.MODEL.TIMM.PRETRAINED = ""
    return cfg


FAMILIES = {
    "deeplabv3_r18": ("resnet18", "SegDeepLabV3Head", {}),
    "mbv2_student_deeplabv3plus": ("mobilenetv2_100", "SegDeepLabV3PlusHead", {}),
    "fcn_r18": ("resnet18", "FCNHead", {}),
    "psp_r18": ("resnet18", "PSPHead", {}),
    "hrnet_ocr": ("hrnet_w18_small", "OCRHead", {}),
    "sr_exits_r18": ("resnet18", "SegDeepLabV3Head", {"MODEL.META_ARCHITECTURE": "MultiExitSegmentor",
                                                      "MODEL.EXITS.MODE": "sr", "MODEL.EXITS.CHANNELS": 16}),
    "rh_exits_mbv2": ("mobilenetv2_100", "SegDeepLabV3Head", {"MODEL.META_ARCHITECTURE": "MultiExitSegmentor",
                                                              "MODEL.EXITS.MODE": "ds", "MODEL.EXITS.HEAD": "rh",
                                                              "MODEL.EXITS.CHANNELS": 16}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_folded_model_gives_the_same_logits_in_fp32_and_bf16(family):
    backbone, head, keys = FAMILIES[family]
    model = randomized(_cfg(backbone, head, **keys))
    batch = random_batch(1, 64, 96, K, with_labels=False)
    ref = logits(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_bf16 = logits(model, batch).float()
    folded = fold_batch_norms(copy.deepcopy(model))
    assert foldable_left(folded) == [] and len(foldable_left(model)) > 0
    own_rounding = rel_diff(ref, logits(copy.deepcopy(model).double(), batch))
    assert rel_diff(logits(folded, batch), ref) <= fp32_bound(own_rounding)
    assert float(ref.std()) > 1e-2  # informative logits, not a constant
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_bf16 = logits(folded, batch).float()
    assert rel_diff(got_bf16, ref) <= BF16_FACTOR * rel_diff(ref_bf16, ref) + BF16_SLACK


def test_anytime_pixel_policy_folded_equals_unfolded_in_both_masked_modes():
    """The sparse masked stages fold the norms themselves: after fold_batch_norms the model
    recompiles them from the folded modules (FoldAware), so nothing is folded twice."""
    cfg = _cfg("mobilenetv2_100", "SegDeepLabV3Head", **{"MODEL.META_ARCHITECTURE": "AnytimeSegmentor",
                                                          "MODEL.EXITS.MODE": "ds", "MODEL.EXITS.CHANNELS": 16})
    model = randomized(cfg)
    batch = random_batch(1, 64, 96, K, with_labels=False)
    l3, _ = exit_logits(model, batch[0], "res3")
    top = torch.softmax(l3, dim=1).amax(dim=1)
    # most pixels freeze (the sparse path pays); the threshold halfway across the widest gap between
    # confidences near the 10 % quantile, so float rounding flips no pixel
    values = top.flatten().sort().values
    lo, hi = values.numel() // 20, values.numel() // 5
    i = lo + int((values[lo + 1:hi + 1] - values[lo:hi]).argmax())
    cut = float(values[i] + values[i + 1]) / 2
    for mode in ("emulate", "sparse"):
        model.pixel_mode, model.sparse_min_pixels = mode, 0  # the tiny maps may run sparse
        model.set_pixel_thresholds({"res2": 2.0, "res3": cut, "res4": 2.0})
        model.policy = PIXEL  # compiles the masked stages with the norms in place
        folded = fold_batch_norms(copy.deepcopy(model))
        ref = logits(model, batch)
        with torch.no_grad():
            out = folded(batch)[0]
        assert rel_diff(out["sem_seg"], ref) <= FP32_TOL, mode
        assert out["anytime"]["masked"]["sparse_stages"] if mode == "sparse" else True  # the sparse path ran


@pytest.mark.parametrize("name", ["deeplabv3_r18_d8", "deeplabv3plus_mv2_d8", "ocrnet_hrnet"])
def test_mmseg_converted_models_fold_to_mmsegs_logits(name, tmp_path):
    from segdistill.convert import load_model_weights
    from mmseg_oracle import build_mmseg, mmseg_logits
    from test_convert_mmseg import CASES, TOL, our_model

    mm_cfg, keys, model_kwargs, (h, w) = CASES[name]
    mm = build_mmseg(mm_cfg)
    path = tmp_path / f"{name}.pth"
    torch.save({"state_dict": mm.state_dict()}, path)
    ours = our_model(keys, model_kwargs)
    load_model_weights(ours, str(path))
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    expected = mmseg_logits(mm, x)
    with torch.no_grad():
        before, _ = ours.sem_seg_head(ours.backbone(x))
        f64 = copy.deepcopy(ours).double()
        own_rounding = rel_diff(before, f64.sem_seg_head(f64.backbone(x.double()))[0].float())
    assert (before - expected).abs().max().item() < TOL  # the converted model, as test_convert_mmseg checks it
    report = fold_batch_norms_report(ours)
    assert report.left == [] and foldable_left(ours) == []
    with torch.no_grad():
        got, _ = ours.sem_seg_head(ours.backbone(x))
    assert rel_diff(got, expected) <= fp32_bound(own_rounding)


def test_counts_on_a_tiny_sequential_and_what_is_left_is_reported():
    """Hand count: BN after a conv, a BatchNormAct2d after a depthwise conv (its ReLU stays), a BN
    after a Sequential ending in a conv, detectron2's Conv2d with a frozen BN (its activation
    stays): 4 folded. A BN after a max-pool and a GroupNorm after a conv: left, with the reason."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), BatchNormAct2d(4),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1)), nn.BatchNorm2d(4),
        nn.MaxPool2d(2), nn.BatchNorm2d(4),
        D2Conv2d(4, 4, 3, padding=1, bias=False, norm=D2FrozenBatchNorm2d(4), activation=torch.relu),
        nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4),
    ).eval()
    randomize(model, 0)
    frozen = model[9].norm
    frozen.weight.uniform_(0.5, 1.5)
    frozen.running_var.uniform_(0.5, 1.5)
    frozen.running_mean.normal_()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    report = fold_batch_norms_report(model)
    assert report.folded == ["1", "4", "6", "9.norm"]
    assert [(n, t) for n, t, _ in report.left] == [("8", "BatchNorm2d"), ("11", "GroupNorm")]
    assert "not right after a convolution" in report.left[0][2] and "not a type" in report.left[1][2]
    assert type(model[1]) is nn.Identity and type(model[4]) is nn.ReLU and model[9].norm is None
    assert type(model[8]) is nn.BatchNorm2d  # left as it was
    with torch.no_grad():
        assert rel_diff(model(x), ref) <= FP32_TOL
    assert "2 left as they are" in report.summary()


def test_a_shared_convolution_is_left_and_reported():
    """A convolution that also runs elsewhere (here without the norm) keeps its weights."""
    conv, bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
    model = nn.ModuleDict({"a": nn.Sequential(conv, bn), "b": nn.Sequential(conv, nn.ReLU())}).eval()
    randomize(model, 0)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ref = model["a"](x), model["b"](x)
    report = fold_batch_norms_report(model)
    assert report.folded == [] and [(n, t) for n, t, _ in report.left] == [("a.1", "BatchNorm2d")]
    assert "shared" in report.left[0][2]
    with torch.no_grad():
        assert torch.equal(model["a"](x), ref[0]) and torch.equal(model["b"](x), ref[1])


@pytest.mark.parametrize("name, pairs", [
    # stem conv_stem/bn1, DepthwiseSeparableConv 2, 16 InvertedResidual x 3
    ("mobilenetv2_100", 1 + 2 + 16 * 3),
    # stem conv1/bn1, 8 BasicBlocks x 2, 3 downsample Sequential(conv, bn)
    ("resnet18", 1 + 8 * 2 + 3),
])
def test_count_of_folded_norms_is_the_count_of_conv_norm_pairs(name, pairs):
    backbone = make_backbone(name).eval()
    norms = [n for n, m in backbone.named_modules() if type(m) in FOLDABLE_NORMS]
    assert len(norms) == pairs
    report = fold_batch_norms_report(backbone)
    assert sorted(report.folded) == sorted(norms) and report.left == []


def test_training_mode_is_refused():
    model = make_backbone("resnet18")  # train() as built
    with pytest.raises(RuntimeError, match=r"training mode.*model\.eval\(\)"):
        fold_batch_norms(model)
    model.eval()
    model.body.layer1[0].bn1.train()  # one module in training mode is enough to refuse
    with pytest.raises(RuntimeError, match="layer1.0.bn1"):
        fold_batch_norms(model)


# --------------------------------------------------------------------------- the switch
def _norm_calls(model):
    """A counter of the calls of ``model``'s first BatchNorm (a copy of the model keeps the hook)."""
    calls = []
    bn = next(m for m in model.modules() if type(m) in FOLDABLE_NORMS)
    bn.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_evaluation_folds_a_copy_from_yaml_and_lazy_configs(write_label_dataset, tmp_path):
    from detectron2.config import LazyCall as L
    from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
    from omegaconf import OmegaConf
    from segdistill.data import SemSegDatasetMapper
    from segdistill.engine import Trainer, lazy_test
    from segdistill.evaluation import SemSegEvaluator

    rng = np.random.default_rng(3)
    name = write_label_dataset("fold_bn_eval", [rng.integers(0, K, (48, 64)) for _ in range(2)], K)
    cfg = _cfg("resnet18", "SegDeepLabV3Head")
    cfg.DATASETS.TEST, cfg.DATALOADER.NUM_WORKERS, cfg.OUTPUT_DIR = (name,), 0, str(tmp_path)
    model = randomized(cfg).train()  # periodic evaluation: the training model, in training mode
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = _norm_calls(model)
    plain = Trainer.test(cfg, model)
    assert calls
    calls.clear()
    cfg.TEST.FOLD_BN = True
    folded = Trainer.test(cfg, model)
    assert not calls and folded["sem_seg"] == pytest.approx(plain["sem_seg"])
    # the training model is untouched: its norms, weights and mode
    assert model.training and model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    lazy = OmegaConf.create({"train": {"output_dir": str(tmp_path), "fold_bn": True}, "dataloader": {
        "test": L(build_detection_test_loader)(
            dataset=L(get_detection_dataset_dicts)(names=name, filter_empty=False),
            mapper=L(SemSegDatasetMapper)(is_train=False, augmentations=[], image_format="RGB", num_classes=K,
                                          ignore_value=255), num_workers=0),
        "evaluator": L(SemSegEvaluator)(dataset_name=name, distributed=False)}})
    got = lazy_test(lazy, model.eval())
    assert not calls and got["sem_seg"] == pytest.approx(plain["sem_seg"])
    lazy.train.fold_bn = False
    lazy_test(lazy, model)
    assert calls


def test_the_keys_defaults_and_lazy_check():
    from segdistill.config import lazy_train_defaults, load_lazy_config
    from segdistill.engine import check_lazy_config, lazy_fold_bn

    assert _cfg("resnet18", "FCNHead").TEST.FOLD_BN is False and lazy_train_defaults()["fold_bn"] is False
    lazy = load_lazy_config(os.path.join(REPO, "configs/demo/deeplabv3_r18.py"),
                            ["train.device=cpu", "train.fold_bn=True"])
    check_lazy_config(lazy)
    assert lazy_fold_bn(lazy) is True


def test_anytime_driver_folds_with_the_switch(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from segdistill.engine.anytime import build_anytime_model

    cfg = _cfg("resnet18", "SegDeepLabV3Head", **{"MODEL.META_ARCHITECTURE": "AnytimeSegmentor",
                                                   "MODEL.EXITS.MODE": "ds", "MODEL.EXITS.CHANNELS": 16})
    model = randomized(cfg)
    DetectionCheckpointer(model, str(tmp_path)).save("m")
    cfg.MODEL.WEIGHTS = str(tmp_path / "m.pth")
    batch = random_batch(1, 64, 64, K, with_labels=False)
    assert foldable_left(build_anytime_model(cfg))
    cfg.TEST.FOLD_BN = True
    folded = build_anytime_model(cfg)
    assert foldable_left(folded) == [] and rel_diff(logits(folded, batch), logits(model, batch)) <= FP32_TOL


def _tiny_run(tmp_path):
    """A tiny YAML config and a checkpoint of random weights and BN statistics."""
    cfg = _cfg("resnet18", "SegDeepLabV3Head", **{"MODEL.DEVICE": "cpu"})
    cfg.DATASETS.TEST = ("segdistill_demo_mini_val",)
    model = randomized(cfg)
    (tmp_path / "c.yaml").write_text(cfg.dump())
    torch.save({"model": model.state_dict()}, tmp_path / "m.pth")
    return model, str(tmp_path / "c.yaml"), str(tmp_path / "m.pth")


@pytest.fixture
def fold_log():
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("segdistill.modeling.fold")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)


def test_predict_with_the_switch_gives_the_same_labels(tmp_path, fold_log):
    predict = load_script("predict_tool", "tools/predict.py")
    model, config, weights = _tiny_run(tmp_path)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(img).save(tmp_path / "in" / "a.png")
    with torch.no_grad():
        expected = model([{"image": torch.as_tensor(img.transpose(2, 0, 1).copy()), "height": 40,
                           "width": 56}])[0]["sem_seg"].argmax(0).numpy()
    assert len(np.unique(expected)) > 1
    predict.main(["--config-file", config, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                  "MODEL.WEIGHTS", weights, "TEST.FOLD_BN", "True"])
    assert any("norms folded" in line for line in fold_log)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "labels" / "a.png")), expected)


def test_export_with_the_switch_traces_the_folded_model(tmp_path, fold_log):
    export_tool = load_script("export_model", "tools/export_model.py")
    model, config, weights = _tiny_run(tmp_path)
    out = str(tmp_path / "m.pt")
    export_tool.main(["--config-file", config, "--format", "torchscript", "--output", out, "--input-size", "64", "64",
                      "MODEL.WEIGHTS", weights, "TEST.FOLD_BN", "True"])
    assert any("norms folded" in line for line in fold_log)
    graph = str(torch.jit.load(out).inlined_graph)
    assert "aten::_convolution" in graph and "batch_norm" not in graph
    image = torch.rand(1, 3, 48, 80, generator=torch.Generator().manual_seed(2)) * 255
    with torch.no_grad():
        ref = model([{"image": image[0]}])[0]["sem_seg"]
    got = export_tool.exported_runner("torchscript", out)(image)[0]
    assert torch.equal(got.argmax(0), ref.argmax(0)) and rel_diff(got, ref) <= 1e-4


def test_overhead_fold_bn_times_the_folded_deployed_models():
    overhead = load_script("overhead_fold", "benchmarks/overhead.py")
    res = overhead.main(["--batch", "1", "--size", "32x32", "--warmup", "0", "--rounds", "1", "--reference-repeats",
                         "1", "--methods", "pd", "--precisions", "channels_last", "--fold-bn"])
    assert res["settings"]["fold_bn"] is True
    # the deployed student's parameters are the folded model's (the norms' gone, conv biases added)
    settings = overhead.Settings(device="cpu")
    student = overhead.build(overhead.ROWS["student"].deploy_config, overhead.ROWS["student"].deploy_overrides,
                             settings).eval()
    unfolded = sum(p.numel() for p in student.parameters())
    fold_batch_norms(student)
    params = sum(p.numel() for p in student.parameters())
    assert params < unfolded and res["inference"]["student"]["params"] == params
    assert "BatchNorms folded" in overhead.report(res, "github")
