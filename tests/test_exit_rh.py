"""ADP-C's RH exit head (``MODEL.EXITS.HEAD rh``, modeling/exits/rh.py): its forward against a
hand-written computation of the design, its sizes per pooling level, the levels rule, the
``sr`` head unchanged, DS training from YAML and lazy configs, HS3-Fuse's deployment, anytime
inference (policies ``exit:k`` and ``pixel``, fvcore costs) and the config errors."""
import math
import os

import pytest
import torch
from torch.nn import functional as F

from conftest import REPO, random_batch, run_train_net, tiny_cfg, write_clusters
from conftest import trained_model as train_steps
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from segdistill.modeling.distill.taps import normalise_inputs
from segdistill.modeling.exits import ExitHead, RHExitHead, build_exit_heads
from segdistill.modeling.meta_arch.anytime import anytime_from_trained

K = 5


# ---------------------------------------------------------------------- a functional RH, by hand
def _pool(x):
    """2x2 average pool, stride 2; a window hanging over the last row / column averages what it covers."""
    h, w = x.shape[-2:]
    out = torch.empty(*x.shape[:-2], math.ceil(h / 2), math.ceil(w / 2), dtype=x.dtype)
    for i in range(out.shape[-2]):
        for j in range(out.shape[-1]):
            out[..., i, j] = x[..., 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(dim=(-2, -1))
    return out


def _bilinear(x, size):
    """Bilinear resize, half-pixel centres (align_corners False), from its formula."""
    def axis(n_in, n_out):
        src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo).to(x.dtype)

    (h0, h1, fh), (w0, w1, fw) = axis(x.shape[-2], size[0]), axis(x.shape[-1], size[1])
    rows = x[..., h0, :] * (1 - fh)[:, None] + x[..., h1, :] * fh[:, None]
    return rows[..., w0] * (1 - fw) + rows[..., w1] * fw


def _conv_bn_relu(layer, x):
    """A 1x1 conv + eval-mode BN + ReLU from the layer's tensors."""
    y = torch.einsum("oc,nchw->nohw", layer.weight[:, :, 0, 0], x)
    bn = layer.norm
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    return torch.relu(y * bn.weight[:, None, None] + bn.bias[:, None, None])


def functional_rh(head, x, size):
    feats, sizes = x, []
    for layer in head.encoder:
        sizes.append(tuple(feats.shape[-2:]))
        feats = _conv_bn_relu(layer, _pool(feats))
    for layer, up in zip(head.decoder, reversed(sizes[1:])):
        feats = _conv_bn_relu(layer, _bilinear(feats, up))
    feats = _bilinear(feats, size)
    seg = torch.einsum("oc,nchw->nohw", head.segmenter.weight[:, :, 0, 0], feats) + head.segmenter.bias[:, None, None]
    cls = feats.mean(dim=(2, 3)) @ head.classifier.fc.weight.t() + head.classifier.fc.bias
    return feats, seg, cls


def _randomise_norms(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


def rh_head(levels, in_channels=3, channels=4):
    torch.manual_seed(levels)
    head = RHExitHead(in_channels=in_channels, num_classes=K, channels=channels, common_stride=8, norm="BN",
                      with_classifier=True, levels=levels)
    _randomise_norms(head, levels)
    return head.eval()


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("in_hw,size", [((8, 12), (8, 12)), ((7, 11), (4, 6)), ((5, 6), (10, 12))])
def test_forward_is_the_pooled_encoder_decoder(levels, in_hw, size):
    head = rh_head(levels)
    x = torch.randn(2, 3, *in_hw, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = head(x, size)
        feats, seg, cls = functional_rh(head, x, size)
    assert out.stride == 8
    torch.testing.assert_close(out.features, feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.seg_logits, seg, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cls_logits, cls, rtol=1e-5, atol=1e-5)
    assert head(x, size, with_classifier=False).cls_logits is None


def test_sizes_and_widths_per_pooling_level():
    head = rh_head(3, in_channels=6, channels=4)
    seen = {}
    for part in ("encoder", "decoder"):
        for i, layer in enumerate(getattr(head, part)):
            layer.register_forward_hook(lambda m, a, o, key=f"{part}.{i}": seen.__setitem__(key, tuple(o.shape[1:])))
    out = head(torch.randn(1, 6, 15, 20), (8, 10))
    # encoder: pool then conv, three times (15x20 -> 8x10 -> 4x5 -> 2x3); decoder: back up two
    # levels (4x5, 8x10); the last upsample goes to the requested size
    assert seen == {"encoder.0": (4, 8, 10), "encoder.1": (4, 4, 5), "encoder.2": (4, 2, 3),
                    "decoder.0": (4, 4, 5), "decoder.1": (4, 8, 10)}
    assert tuple(out.features.shape) == (1, 4, 8, 10) and tuple(out.seg_logits.shape) == (1, K, 8, 10)
    assert [tuple(layer.weight.shape) for layer in head.encoder] == [(4, 6, 1, 1), (4, 4, 1, 1), (4, 4, 1, 1)]
    assert all(k == 1 for layer in [*head.encoder, *head.decoder] for k in layer.kernel_size)
    assert rh_head(1).decoder.__len__() == 0


SHAPES = {"res2": ShapeSpec(channels=8, stride=4), "res3": ShapeSpec(channels=16, stride=8),
          "res4": ShapeSpec(channels=32, stride=8), "res5": ShapeSpec(channels=64, stride=8)}


def _build(in_features, head="rh", **kw):
    args = dict(input_shape=SHAPES, in_features=in_features, num_classes=K, channels=4, common_stride=8, norm="BN",
                with_classifier=False, max_downsample=2, head=head)
    args.update(kw)
    return build_exit_heads(**args)


def test_levels_follow_adpc_by_depth_or_the_given_list():
    # ADP-C: its three exits (shallowest first) pool 3, 2, 1 times; the deepest exit always once
    assert {n: e.levels for n, e in _build(["res2", "res3", "res4"]).items()} == {"res2": 3, "res3": 2, "res4": 1}
    assert {n: e.levels for n, e in _build(["res3", "res4"]).items()} == {"res3": 2, "res4": 1}
    assert [e.levels for e in _build(["res2", "res3", "res4", "res5"]).values()] == [3, 3, 2, 1]
    given = _build(["res3", "res4"], head_options={"levels": [1, 4]})
    assert [e.levels for e in given.values()] == [1, 4] and len(given["res4"].encoder) == 4
    cfg = tiny_cfg(num_classes=K, **{"MODEL.META_ARCHITECTURE": "MultiExitSegmentor", "MODEL.EXITS.MODE": "ds",
                                     "MODEL.EXITS.HEAD": "rh", "MODEL.EXITS.RH.CHANNELS": 8,
                                     "MODEL.EXITS.RH.LEVELS": [1, 1, 2]})
    model = build_model(cfg)
    assert [e.levels for e in model.exits.values()] == [1, 1, 2]
    assert all(isinstance(e, RHExitHead) and e.encoder[0].out_channels == 8 for e in model.exits.values())


def test_sr_head_is_unchanged():
    """``sr`` (the default) builds today's ExitHead: same parameters in the same creation order
    (so the same initialisation from a seed), same keys, the same forward as its layers run by hand."""
    torch.manual_seed(0)
    default = build_exit_heads(input_shape=SHAPES, in_features=["res3"], num_classes=K, channels=4, common_stride=8,
                               norm="BN", with_classifier=True, max_downsample=2)
    torch.manual_seed(0)
    named = _build(["res3"], head="sr", with_classifier=True)
    from segdistill.modeling.heads.base import conv_norm
    from detectron2.layers import Conv2d
    from segdistill.modeling.exits import MultiLabelClassifier

    torch.manual_seed(0)  # the layers in ExitHead's original order
    layers = [conv_norm(16, 4, 3, "BN"), conv_norm(4, 4, 3, "BN"), Conv2d(4, K, 1),
              MultiLabelClassifier(in_channels=4, num_classes=K)]
    expected = [p for layer in layers for p in layer.state_dict().values()]
    keys = ["reduce.weight", "reduce.norm.weight", "reduce.norm.bias", "reduce.norm.running_mean",
            "reduce.norm.running_var", "reduce.norm.num_batches_tracked", "feature.weight", "feature.norm.weight",
            "feature.norm.bias", "feature.norm.running_mean", "feature.norm.running_var",
            "feature.norm.num_batches_tracked", "segmenter.weight", "segmenter.bias", "classifier.fc.weight",
            "classifier.fc.bias"]
    for exits in (default, named):
        head = exits["res3"]
        assert type(head) is ExitHead and head.name == "sr" and list(head.state_dict()) == keys
        assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), expected))
    head = default["res3"].eval()
    _randomise_norms(head)
    x = torch.randn(2, 16, 7, 9)
    with torch.no_grad():
        out = head(x, (7, 9))
        r = F.relu(F.batch_norm(F.conv2d(x, head.reduce.weight, padding=1), head.reduce.norm.running_mean,
                                head.reduce.norm.running_var, head.reduce.norm.weight, head.reduce.norm.bias,
                                eps=head.reduce.norm.eps))
        f = F.batch_norm(F.conv2d(r, head.feature.weight, padding=1), head.feature.norm.running_mean,
                         head.feature.norm.running_var, head.feature.norm.weight, head.feature.norm.bias,
                         eps=head.feature.norm.eps)
    assert torch.equal(out.features, f)
    assert torch.equal(out.seg_logits, F.conv2d(F.relu(f), head.segmenter.weight, head.segmenter.bias))
    assert head.inference_parts == ("reduce", "feature", "segmenter")


# ---------------------------------------------------------------------- training
@pytest.mark.slow
def test_ds_training_from_yaml_with_rh_exits(tmp_path):
    out_dir = str(tmp_path / "ds_rh")
    run_train_net([
        "--config-file", "configs/demo/exits/ds.yaml",
        "DATASETS.TRAIN", '("segdistill_demo_mini_train",)', "DATASETS.TEST", "()",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.CHECKPOINT_PERIOD", "100", "INPUT.CROP.SIZE", "(64,64)", "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "32",
        "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
        "MODEL.EXITS.HEAD", "rh", "MODEL.EXITS.RH.CHANNELS", "8", "OUTPUT_DIR", out_dir,
    ])
    import json

    rec = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.json"))]
    assert {"loss_sem_seg", "loss_ds"} <= {k for r in rec for k in r} and rec[-1]["iteration"] == 1
    state = torch.load(os.path.join(out_dir, "model_final.pth"), map_location="cpu", weights_only=False)["model"]
    assert tuple(state["exits.res2.encoder.2.weight"].shape) == (8, 8, 1, 1)  # res2: 3 levels
    assert "exits.res4.encoder.1.weight" not in state and tuple(state["exits.res4.segmenter.weight"].shape)[:2] == (
        state["sem_seg_head.predictor.weight"].shape[0], 8)
    assert not any(".reduce." in k for k in state)


def test_ds_training_from_the_lazy_config_with_rh_exits():
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(os.path.join(REPO, "configs/demo/exits/ds_rh.py"))
    cfg.model.exits.channels = 8
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    assert [type(e) for e in model.exits.values()] == [RHExitHead] * 3
    assert [e.levels for e in model.exits.values()] == [3, 2, 1]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = {k: v.clone() for k, v in model.exits.state_dict().items() if k.endswith("weight")}
    for step in range(2):
        batch = random_batch(2, 64, 64, 10, seed=step)
        losses = model(batch)
        assert set(losses) == {"loss_sem_seg", "loss_ds"}
        # loss_ds, brute force: the sum over the RH exits of their pixel cross-entropy at the labels' size
        with torch.no_grad():
            images, targets = normalise_inputs(model, batch)
            outs = model.forward_outputs(model.backbone(images.tensor), tuple(images.tensor.shape[-2:]))
            want = sum(F.cross_entropy(F.interpolate(o.seg_logits, size=targets.shape[-2:], mode="bilinear",
                                                     align_corners=False), targets, ignore_index=255)
                       for o in outs.exits.values())
        assert float(losses["loss_ds"]) == pytest.approx(float(want), rel=1e-5)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    after = model.exits.state_dict()
    assert all(not torch.equal(v, after[k]) for k, v in before.items())  # every exit layer trained


def test_hs3_fuse_deploys_rh_exits(tmp_path):
    from test_hs3_model import hs3_cfg

    cfg = hs3_cfg(write_clusters(tmp_path / "c.json", {"res3": [0, 0, 1, 1, 2], "res4": [0, 1, 2, 3, 3]}),
                  fuse=True, **{"MODEL.EXITS.HEAD": "rh", "MODEL.EXITS.RH.CHANNELS": 8})
    model = train_steps(cfg, K, 1)
    state = model.deploy_state_dict()
    assert model.hs3_fuse.blocks["res3"].pixel_conv.in_channels == 8  # the fusion reads the RH features
    twin = build_model(cfg).eval()
    incompatible = twin.load_state_dict(state, strict=False)
    assert not incompatible.missing_keys and not any(".classifier." in k for k in state)
    batch = random_batch(1, 64, 64, K, seed=2)
    with torch.no_grad():
        assert torch.equal(model(batch)[0]["sem_seg"], twin(batch)[0]["sem_seg"])


# ---------------------------------------------------------------------- anytime inference
@pytest.fixture(scope="module")
def rh_anytime():
    cfg = tiny_cfg("resnet18", "SegDeepLabV3Head", num_classes=K, **{
        "MODEL.META_ARCHITECTURE": "MultiExitSegmentor", "MODEL.EXITS.MODE": "ds", "MODEL.EXITS.HEAD": "rh",
        "MODEL.EXITS.RH.CHANNELS": 8, "MODEL.EXITS.EVAL_EXITS": True})
    trained = train_steps(cfg, K, 1)
    return cfg, trained, anytime_from_trained(cfg, trained)  # what deploy_model.py --target anytime builds


def test_anytime_exit_policies_answer_with_the_rh_exits(rh_anytime):
    cfg, trained, model = rh_anytime
    assert set(model.state_dict()) == {k for k in trained.state_dict()
                                       if ".classifier." not in k and not k.startswith("exit_objective")}
    batch = random_batch(2, 64, 80, K, seed=4, with_labels=False)
    with torch.no_grad():
        reference = trained(batch)  # eval_exits: every exit's prediction beside the final one
        for name in ("res2", "res3", "res4"):
            model.policy = f"exit:{name}"
            outs = model(batch)
            assert all(o["sem_seg_exit"] == name for o in outs)
            assert all(torch.equal(o["sem_seg"], r[f"sem_seg_{name}"]) for o, r in zip(outs, reference))
        model.set_pixel_thresholds({"res2": 0.0, "res3": 2.0, "res4": 2.0})  # every pixel frozen at res2
        model.policy = "pixel"
        outs = model(batch)
        assert all(torch.equal(o["sem_seg"], r["sem_seg_res2"]) for o, r in zip(outs, reference))
        assert all(o["anytime"]["answered_pct"]["res2"] == 100.0 for o in outs)
        model.policy = "final"
        assert all(torch.equal(o["sem_seg"], r["sem_seg"]) for o, r in zip(model(batch), reference))


def test_anytime_costs_count_the_rh_module(rh_anytime):
    from fvcore.nn import FlopCountAnalysis

    _, _, model = rh_anytime
    hw, size = (64, 80), (8, 10)
    costs = model.costs(hw)
    with torch.no_grad():
        feats = dict(model.backbone.forward_stages(torch.zeros(1, 3, *hw)))

    class Alone(torch.nn.Module):  # the exit module by itself, at the exits' output size
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, x):
            return self.head(x, size, with_classifier=False).seg_logits

    for name, head in model.exits.items():
        counter = FlopCountAnalysis(Alone(head).eval(), (feats[name],))
        counter.unsupported_ops_warnings(False)
        assert costs.exits[name] == float(counter.total())
        # its convolutions by hand: encoder level i at the pooled size, decoder back up, segmenter at the output
        h, w = feats[name].shape[-2:]
        sizes, cin, macs = [], feats[name].shape[1], 0
        for _ in range(head.levels):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            sizes.append((h, w))
            macs += h * w * cin * 8
            cin = 8
        macs += sum(a * b * 8 * 8 for a, b in sizes[:-1]) + size[0] * size[1] * 8 * K
        assert counter.by_operator()["conv"] == macs


# ---------------------------------------------------------------------- errors
def test_unknown_head_and_bad_levels_are_named():
    cfg = tiny_cfg(num_classes=K, **{"MODEL.META_ARCHITECTURE": "MultiExitSegmentor", "MODEL.EXITS.MODE": "ds",
                                     "MODEL.EXITS.HEAD": "fancy"})
    with pytest.raises(ValueError, match=r"Unknown MODEL.EXITS.HEAD 'fancy'; choose from \['rh', 'sr'\]"):
        build_model(cfg)
    cfg.MODEL.META_ARCHITECTURE = "AnytimeSegmentor"
    with pytest.raises(ValueError, match=r"Unknown MODEL.EXITS.HEAD 'fancy'"):
        build_model(cfg)
    cfg.MODEL.EXITS.HEAD = "rh"
    cfg.MODEL.EXITS.RH.LEVELS = [3, 2]
    with pytest.raises(ValueError, match=r"MODEL.EXITS.RH.LEVELS \[3, 2\] must give one positive integer per exit "
                                         r"\['res2', 'res3', 'res4'\].*\[3, 2, 1\]"):
        build_model(cfg)
    with pytest.raises(ValueError, match=r"MODEL.EXITS.HEAD 'sr' takes no options"):
        _build(["res3"], head="sr", head_options={"levels": [1]})
    with pytest.raises(ValueError, match=r"'rh' cannot be registered"):
        from segdistill.modeling.exits import ExitObjective, register_exit_objective

        register_exit_objective("rh")(type("Clash", (ExitObjective,), {}))


def test_rh_keys_come_from_its_files_hook():
    from detectron2.config import get_cfg
    from segdistill import add_segdistill_config
    from segdistill.config import config_hooks
    from segdistill.modeling.exits.rh import add_rh_exit_config

    assert add_rh_exit_config in config_hooks()
    cfg = get_cfg()
    add_segdistill_config(cfg)
    assert cfg.MODEL.EXITS.HEAD == "sr" and cfg.MODEL.EXITS.RH.CHANNELS == 128 and cfg.MODEL.EXITS.RH.LEVELS == []
    cfg.MODEL.EXITS.RH.CHANNELS = 3
    add_segdistill_config(cfg)  # present: changes nothing
    assert cfg.MODEL.EXITS.RH.CHANNELS == 3


def test_anytime_curve_compares_sr_and_rh_exits(tmp_path, write_label_dataset):
    """benchmarks/anytime_curve.py takes a model with either exit head from its config (RH vs SR
    exits, the same model otherwise): each exit's MACs differ by exactly the exit modules' counts."""
    import importlib.util

    import numpy as np
    from detectron2.checkpoint import DetectionCheckpointer

    rng = np.random.default_rng(3)
    calib = write_label_dataset("rh_toy_calib", [rng.integers(0, K, (48, 64)) for _ in range(2)], K)
    val = write_label_dataset("rh_toy_val", [rng.integers(0, K, (48, 64)) for _ in range(2)], K)
    files, exit_macs = {}, {}
    for head in ("sr", "rh"):
        cfg = tiny_cfg(num_classes=K, **{"MODEL.META_ARCHITECTURE": "MultiExitSegmentor", "MODEL.EXITS.MODE": "ds",
                                         "MODEL.EXITS.HEAD": head, "MODEL.EXITS.CHANNELS": 16,
                                         "MODEL.EXITS.RH.CHANNELS": 16, "DATALOADER.NUM_WORKERS": 0})
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (calib,), (val,)
        trained = train_steps(cfg, K, 1)
        (tmp_path / head).mkdir()
        DetectionCheckpointer(trained, save_dir=str(tmp_path / head)).save("model_final")
        (tmp_path / f"{head}.yaml").write_text(cfg.dump())
        files[head] = (str(tmp_path / f"{head}.yaml"), str(tmp_path / head / "model_final.pth"))
        exit_macs[head] = anytime_from_trained(cfg, trained).costs((48, 64)).exits
    spec = importlib.util.spec_from_file_location("anytime_curve", os.path.join(REPO, "benchmarks", "anytime_curve.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sr, rh = bench.main(["--output", str(tmp_path / "curve"), "--calib-dataset", calib, "--drops", "0",
                         "--threads", "1", "--model", "SR", *files["sr"], "--model", "RH", *files["rh"]])
    assert sr["exits"] == rh["exits"] == ["res2", "res3", "res4"]
    for name in sr["exits"]:
        got = rh["fixed"][name]["GMACs"] - sr["fixed"][name]["GMACs"]
        assert got == pytest.approx((exit_macs["rh"][name] - exit_macs["sr"][name]) / 1e9, rel=1e-9)
        assert exit_macs["rh"][name] < exit_macs["sr"][name]
    assert rh["fixed"]["final"]["GMACs"] == pytest.approx(sr["fixed"]["final"]["GMACs"])


@pytest.mark.parametrize("backbone,head,exits", [
    ("mobilenetv2_100", "SegDeepLabV3Head", ["res3", "res4"]),
    ("hrnet_w18_small", "HRNetV2Head", ["layer1", "stage2_b1", "stage3_b2"]),  # HRNet's branches, strides 4 / 8 / 16
])
def test_rh_exits_on_other_bodies_train_and_answer(backbone, head, exits):
    cfg = tiny_cfg(backbone, head, num_classes=K, **{
        "MODEL.META_ARCHITECTURE": "MultiExitSegmentor", "MODEL.EXITS.MODE": "ds", "MODEL.EXITS.HEAD": "rh",
        "MODEL.EXITS.RH.CHANNELS": 8, "MODEL.EXITS.IN_FEATURES": exits, "MODEL.EXITS.MAX_DOWNSAMPLE": 4,
        "MODEL.EXITS.EVAL_EXITS": True})
    if backbone.startswith("hrnet"):
        cfg.MODEL.TIMM.OUT_FEATURES = cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    trained = train_steps(cfg, K, 1)
    assert [e.levels for e in trained.exits.values()] == [3, 2, 1][-len(exits):]
    model = anytime_from_trained(cfg, trained)
    batch = random_batch(1, 64, 64, K, seed=6, with_labels=False)
    with torch.no_grad():
        reference = trained(batch)[0]
        for name in exits:
            model.policy = f"exit:{name}"
            assert torch.equal(model(batch)[0]["sem_seg"], reference[f"sem_seg_{name}"])
