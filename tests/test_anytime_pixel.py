"""Per-pixel anytime inference: the backbones' stage-module contract and the ``pixel`` policy of
``AnytimeSegmentor`` (frozen pixels keep their exit's logits, later stages run masked, counted
MACs), on a tiny DS model (ResNet-18 OS8, DeepLabV3 head, exits on res2..res4)."""
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import make_backbone, random_batch, tiny_cfg
from conftest import trained_model as train_steps
from detectron2.modeling import build_model
from segdistill.evaluation.anytime import AnytimeEvaluator
from segdistill.modeling.masked import SPARSE_MIN_PIXELS, PixelMask, masked_forward
from segdistill.modeling.exits import exit_size
from segdistill.modeling.meta_arch.anytime import FINAL, PIXEL, anytime_state_dict
from test_anytime import CallCounter  # forward hooks counting named submodules' calls

K = 5


def anytime_cfg(**keys):
    cfg = tiny_cfg("resnet18", "SegDeepLabV3Head", num_classes=K, **{"MODEL.META_ARCHITECTURE": "MultiExitSegmentor"})
    cfg.MODEL.EXITS.MODE = "ds"
    cfg.MODEL.EXITS.CHANNELS = 16
    for k, v in keys.items():
        setattr(cfg.MODEL.EXITS.ANYTIME, k, v)
    return cfg


@pytest.fixture(scope="module")
def model():
    cfg = anytime_cfg()
    trained = train_steps(cfg, K, 1)
    acfg = cfg.clone()
    acfg.MODEL.META_ARCHITECTURE = "AnytimeSegmentor"
    m = build_model(acfg).eval()
    m.load_state_dict(anytime_state_dict(m, trained.state_dict())[0], strict=True)
    return m


def pixel(model, thresholds, mode="emulate", min_pixels=SPARSE_MIN_PIXELS):
    """Policy ``pixel`` with ``thresholds`` in ``mode``; ``min_pixels``: the sparse path's map-size
    rule (the tiny test maps are below the default: 0 lets them run sparse)."""
    model.pixel_mode, model.sparse_min_pixels = mode, min_pixels
    model.set_pixel_thresholds(thresholds)
    model.policy = PIXEL


def exit_logits(model, image, name):
    """``exit:<name>``'s logits at the padded input size, and the normalised image."""
    images = model._images([image])
    with torch.no_grad():
        logits, answer, _ = model.run_stages(images.tensor, images.image_sizes, (name,), lambda n, l: True)
    assert answer == name
    return logits, images


# ---------------------------------------------------------------------- the stage-module contract
@pytest.mark.parametrize("kind,options", [
    ("resnet18", {"output_stride": 8}),
    ("resnet18", {"output_stride": 8, "dilation_rule": "mmseg", "stem_type": "deep"}),
    ("mobilenetv2_100", {"output_stride": 16}),
    ("mobilenetv2_100", {}),
    ("hrnet_w18_small", {}),
    ("hrnet_w18_small", {"fuse_upsample": "bilinear"}),
])
def test_stage_modules_chain_to_the_tensors_forward_stages_yields(kind, options):
    """Each stage takes the previous one's return value (the image first) and yields the
    features stage_outputs() names: one tensor, or HRNet's list of branches; concatenated, the
    names are stage_shapes()' and the tensors forward_stages()' bit for bit."""
    torch.manual_seed(0)
    bb = make_backbone(kind, **options).eval()
    keys = list(bb.state_dict())
    modules, outputs = bb.stage_modules(), bb.stage_outputs()
    assert list(outputs) == list(modules)
    assert [f for names in outputs.values() for f in names] == list(bb.stage_shapes())
    if kind.startswith("hrnet"):
        assert list(modules) == ["layer1", "stage2", "stage3", "stage4"]
        assert outputs["stage2"] == ("stage2_b0", "stage2_b1") and outputs["stage4"] == ("res2", "res3", "res4", "res5")
    else:
        assert all(names == (n,) for n, names in outputs.items())
    assert bb.stage_of_features()["res2"] == ("stage4" if kind.startswith("hrnet") else "res2")
    owned = {id(p) for p in bb.parameters()}
    assert all(id(p) in owned for m in modules.values() for p in m.parameters())  # the backbone's own modules
    x = torch.randn(1, 3, 64, 64) if kind.startswith("hrnet") and not options else torch.randn(1, 3, 48, 56)
    got = {}
    with torch.no_grad():
        ref = dict(bb.forward_stages(x))
        for name, module in modules.items():
            x = module(x)
            got.update(bb.stage_features(outputs[name], x))
    assert list(got) == list(ref)
    assert all(torch.equal(got[n], ref[n]) for n in ref)
    assert list(bb.state_dict()) == keys  # the wrappers are not submodules


def test_stage_features_refuses_a_return_value_other_than_the_names_say():
    bb = make_backbone("resnet18")
    t = torch.zeros(1, 2, 3, 3)
    assert bb.stage_features(("a", "b"), [t, t + 1])["b"] is not None
    for names, y, match in [(("a",), [t], "one tensor, got a list of 1"),
                            (("a", "b"), t, "a list of 2 tensors, got Tensor"),
                            (("a", "b"), [t, t, t], "a list of 2 tensors, got a list of 3")]:
        with pytest.raises(ValueError, match=match):
            bb.stage_features(names, y)


# ---------------------------------------------------------------------- the pixel policy
def check_exit_answers_every_pixel(model, batch, k, thresholds, later, counter) -> dict:
    """Policy ``pixel`` with ``thresholds`` under which exit ``k`` freezes every pixel: the
    answer equals policy ``exit:k`` bit for bit, none of the modules ``later`` (names of
    ``counter``) runs, and the counted MACs are exit k's path; returns image 0's ``anytime``."""
    model.policy = f"exit:{k}"
    with torch.no_grad():  # one image at a time, as the pixel policy runs
        ref = [model([inp])[0] for inp in batch]
    pixel(model, thresholds)
    hw = ref[0]["anytime"]["input_hw"]
    model.costs(hw), model.pixel_costs(hw)  # counted once per size (fvcore runs every part)
    counter.counts = dict.fromkeys(counter.counts, 0)
    with torch.no_grad():
        out = model(batch)
    assert all(counter.counts[n] == 0 for n in later), (k, counter.counts)
    assert all(torch.equal(o["sem_seg"], r["sem_seg"]) for o, r in zip(out, ref)), k
    a = out[0]["anytime"]
    assert out[0]["sem_seg_exit"] == k and a["answered_pct"][k] == 100.0
    costs = model.costs(hw)
    assert a["macs"] == costs.macs(k, a["evaluated"]) + sum(costs.answer[e] for e in a["evaluated"] if e != k)
    return a


def test_all_pixels_frozen_after_an_exit_is_that_exits_output_and_nothing_later_runs(model):
    b = model.backbone.body
    counter = CallCounter({"layer2": b.layer2, "layer3": b.layer3, "layer4": b.layer4, "head": model.sem_seg_head,
                           **{f"exit_{n}": m for n, m in model.exits.items()}})
    batch = random_batch(2, 64, 80, K, seed=3, with_labels=False)
    try:
        for k, thresholds, later in [
            ("res3", {"res2": 2.0, "res3": 0.0, "res4": 0.0}, ["layer3", "layer4", "head", "exit_res2", "exit_res4"]),
            # res2 runs but freezes nothing (its threshold is above every probability): res3 still answers all
            ("res3", {"res2": 1.0, "res3": 0.0, "res4": 0.0}, ["layer3", "layer4", "head", "exit_res4"]),
            ("res2", {"res2": 0.0, "res3": 0.5, "res4": 0.5}, ["layer2", "layer3", "layer4", "head", "exit_res3",
                                                               "exit_res4"]),
        ]:
            a = check_exit_answers_every_pixel(model, batch, k, thresholds, later, counter)
            assert all(a["active_pct"][s] == 0.0 for s in ("res4", "res5"))
    finally:
        counter.remove()
        model.policy = FINAL


@pytest.mark.parametrize("mode", ["emulate", "sparse"])
def test_an_input_that_is_not_a_multiple_of_the_heads_stride(model, mode):
    """OUTPUT_RESIZE "stride" (the default, CamVid's 120 rows at stride 16): the head's map
    upsampled by its stride overshoots the input (8 rows -> 128); the per-pixel answer takes it
    cut to the input, as postprocessing crops it, beside the exits' answers at the input size."""
    image = random_batch(1, 60, 76, K, seed=6, with_labels=False)[0]
    l3, images = exit_logits(model, image, "res3")
    hw = tuple(images.tensor.shape[-2:])
    assert model.sem_seg_head.output_resize == "stride" and tuple(l3.shape[-2:]) == hw
    assert any(v % model.sem_seg_head.common_stride for v in hw)  # the case: not a multiple
    top = F.softmax(l3, dim=1).amax(dim=1)
    cut = float(top.flatten().sort().values[top.numel() // 2])
    frozen = top >= cut
    try:
        pixel(model, {"res2": 2.0, "res3": cut, "res4": 2.0}, mode, min_pixels=0)
        with torch.no_grad():
            logits, info = model.run_pixel(images.tensor, images.image_sizes[0])
            out = model([image])[0]
            model.policy = FINAL
            final = model([image])[0]["sem_seg"]
    finally:
        model.policy = FINAL
    assert tuple(logits.shape[-2:]) == hw and info["answer"] == FINAL
    per_pixel = logits.permute(0, 2, 3, 1)
    assert torch.equal(per_pixel[frozen], l3.permute(0, 2, 3, 1)[frozen])
    assert out["sem_seg"].shape == final.shape == (K, 60, 76)
    # the head's pixels are its (masked) answer: not res3's, and on the same grid as the final output
    assert (per_pixel[~frozen] != l3.permute(0, 2, 3, 1)[~frozen]).any(-1).all()


@pytest.mark.parametrize("mode", ["emulate", "sparse"])
def test_a_frozen_pixel_keeps_its_exits_answer_and_a_pixel_below_the_threshold_never_does(model, mode):
    image = random_batch(1, 64, 80, K, seed=5, with_labels=False)[0]
    l3, images = exit_logits(model, image, "res3")
    top = F.softmax(l3, dim=1).amax(dim=1)
    cut = float(top.flatten().sort().values[top.numel() // 4])  # about three quarters of the pixels freeze at res3
    frozen = top >= cut
    pixel(model, {"res2": 2.0, "res3": cut, "res4": 2.0}, mode, min_pixels=0)
    with torch.no_grad():
        logits, info = model.run_pixel(images.tensor, images.image_sizes[0])
        out = model([image])[0]
    per_pixel, exit_per_pixel = logits.permute(0, 2, 3, 1), l3.permute(0, 2, 3, 1)
    assert torch.equal(per_pixel[frozen], exit_per_pixel[frozen])
    assert (per_pixel[~frozen] != exit_per_pixel[~frozen]).any(-1).all()
    assert torch.equal(out["sem_seg"].argmax(0)[frozen[0]], l3[0].argmax(0)[frozen[0]])
    share = 100.0 * float(frozen.float().mean())
    assert info["answered_pct"] == pytest.approx({"res3": share, FINAL: 100.0 - share})
    assert info["active_pct"]["res4"] == pytest.approx(100.0 - share) and info["active_pct"]["res3"] == 100.0
    # the DeepLabV3 head runs masked too: only its global image pooling at every pixel
    assert info["masked"]["sparse_stages"] == (["res4", "res5", "sem_seg_head"] if mode == "sparse" else [])
    assert "sem_seg_head" not in info["masked"]["dense_ops"] and out["sem_seg_exit"] == FINAL
    assert "sem_seg_head.aspp.image_pool" in info["masked"]["dense_ops"]
    # counted MACs: the dense prefix (fvcore, traced whole), the exit, then layer3 / layer4 and the
    # head on the active pixels as masked execution counts them, then the head's resize
    feats = dict(model.backbone.forward_stages(images.tensor))
    mask = PixelMask(~frozen)
    with torch.no_grad():
        y4, r4 = masked_forward(model.backbone.body.layer3, feats["res3"], mask, "emulate")
        y5, r5 = masked_forward(model.backbone.body.layer4, y4, mask, "emulate")
        head_logits, r_head = masked_forward(model.sem_seg_head, y5, mask, "emulate")
    hw = tuple(images.tensor.shape[-2:])
    costs, dense = model.costs(hw), model.pixel_costs(hw)
    expected = costs.prefix["res3"] + costs.exits["res3"] + costs.answer["res3"] + float(r4.macs[0] + r5.macs[0]) \
        + float(r_head.macs[0]) + dense.head_resize
    assert info["macs"] == pytest.approx(expected, rel=1e-12)
    assert 0 < dense.head_resize < float(r_head.macs[0]) < dense.head
    # the active pixels' answer: the masked head's logits brought to the input
    head_answer = model.sem_seg_head.predict_logits(head_logits, hw).permute(0, 2, 3, 1)
    torch.testing.assert_close(per_pixel[~frozen], head_answer[~frozen], rtol=1e-5, atol=1e-5)
    assert info["macs"] < costs.final
    if mode == "sparse":
        pixel(model, {"res2": 2.0, "res3": cut, "res4": 2.0}, "emulate")
        with torch.no_grad():
            emulated, _ = model.run_pixel(images.tensor, images.image_sizes[0])
        torch.testing.assert_close(logits, emulated, rtol=1e-5, atol=1e-5)
    model.policy = FINAL


def test_nothing_frozen_is_the_final_policy_bit_for_bit_with_its_macs(model):
    batch = random_batch(2, 64, 80, K, seed=7, with_labels=False)
    model.policy = FINAL
    with torch.no_grad():  # one image at a time, as the pixel policy runs
        ref = [model([inp])[0] for inp in batch]
    costs = model.costs((64, 80))
    for thresholds in ({"res2": 2.0, "res3": 2.0, "res4": 2.0}, {"res2": 1.0, "res3": 1.0, "res4": 1.0}):
        pixel(model, thresholds)
        with torch.no_grad():
            out = model(batch)
        assert all(torch.equal(o["sem_seg"], r["sem_seg"]) for o, r in zip(out, ref))
        a = out[0]["anytime"]
        assert out[0]["sem_seg_exit"] == FINAL and a["answered_pct"][FINAL] == 100.0
        assert all(v == 100.0 for v in a["active_pct"].values())
        assert a["macs"] == costs.macs(FINAL, a["evaluated"]) + sum(costs.answer[e] for e in a["evaluated"])
    assert a["evaluated"] == ("res2", "res3", "res4")
    model.policy = FINAL


def test_counted_macs_at_every_pixel_active_add_up_to_the_final_path(model):
    """The parts the pixel policy counts (dense stages, masked stages at a full mask, the head)
    sum to costs()' final path (fvcore, traced whole)."""
    hw = (64, 80)
    pixel(model, {"res2": 0.5, "res3": 0.5, "res4": 0.5})
    dense, costs = model.pixel_costs(hw), model.costs(hw)
    assert sum(dense.stages.values()) + dense.head == costs.final
    plans = model._masked_plans(model.pixel_thresholds)
    assert sorted(plans) == ["res3", "res4", "res5"]
    x = torch.zeros(1, 3, *hw)
    with torch.no_grad():
        for name, module in model.backbone.stage_modules().items():
            if name in plans:
                y, report = plans[name](x, PixelMask.full(1, hw), "emulate")
                assert float(report.macs[0]) == dense.stages[name], name
                assert torch.equal(y, module(x))
            x = module(x)
        # the head, masked at a full mask, plus its resize: the dense head's fvcore count
        _, report = masked_forward(model.sem_seg_head, x, PixelMask.full(1, hw), "emulate")
    assert float(report.macs[0]) + dense.head_resize == dense.head
    model.policy = FINAL


def test_config_keys_of_the_pixel_policy():
    from segdistill.modeling.meta_arch.anytime import AnytimeSegmentor

    cfg = anytime_cfg(POLICY="pixel", PIXEL_THRESHOLDS=[0.9])
    cfg.MODEL.META_ARCHITECTURE = "AnytimeSegmentor"
    m = AnytimeSegmentor(cfg)
    assert m.pixel_thresholds == {"res2": 0.9, "res3": 0.9, "res4": 0.9} and m.pixel_mode == "emulate"
    cfg.MODEL.EXITS.ANYTIME.PIXEL_THRESHOLDS = [2.0, 0.7, 0.8]
    cfg.MODEL.EXITS.ANYTIME.PIXEL_MODE = "sparse"
    m = AnytimeSegmentor(cfg)
    assert m.pixel_thresholds == {"res2": float("inf"), "res3": 0.7, "res4": 0.8} and m.pixel_mode == "sparse"
    assert m.active_exits() == ("res3", "res4")
    for key, value, match in [("PIXEL_THRESHOLDS", [0.5, 0.5], "PIXEL_THRESHOLDS has 2 values"),
                              ("PIXEL_THRESHOLDS", [], "needs MODEL.EXITS.ANYTIME.PIXEL_THRESHOLDS"),
                              ("PIXEL_MODE", "dense", "PIXEL_MODE 'dense'")]:
        bad = cfg.clone()
        setattr(bad.MODEL.EXITS.ANYTIME, key, value)
        with pytest.raises(ValueError, match=match):
            AnytimeSegmentor(bad)


def test_config_keys_of_the_sparse_rule_reach_the_masked_stages_and_head(model):
    """MODEL.EXITS.ANYTIME.SPARSE_MAX_ACTIVE / SPARSE_MIN_PIXELS: defaults masked.py's constants,
    checked, and the rule of every masked stage, exit and the head of policy pixel (the same answer)."""
    from segdistill.config import ConfigError
    from segdistill.modeling.masked import SPARSE_MAX_ACTIVE
    from segdistill.modeling.meta_arch.anytime import AnytimeSegmentor

    cfg = anytime_cfg(POLICY="pixel", PIXEL_THRESHOLDS=[0.9], PIXEL_MODE="sparse")
    cfg.MODEL.META_ARCHITECTURE = "AnytimeSegmentor"
    a = cfg.MODEL.EXITS.ANYTIME
    assert (a.SPARSE_MAX_ACTIVE, a.SPARSE_MIN_PIXELS) == (SPARSE_MAX_ACTIVE, SPARSE_MIN_PIXELS)
    image = random_batch(1, 64, 80, K, seed=8, with_labels=False)[0]
    l3, images = exit_logits(model, image, "res3")
    cut = float(F.softmax(l3, dim=1).amax(dim=1).flatten().sort().values[l3[0, 0].numel() // 4])  # 3/4 freeze
    runs = {}
    # res4, its exit, res5 and the head read 8x10 maps (80 pixels) with a quarter of the pixels active
    for max_active, min_pixels, sparse in [(SPARSE_MAX_ACTIVE, SPARSE_MIN_PIXELS, []), (SPARSE_MAX_ACTIVE, 80, True),
                                           (SPARSE_MAX_ACTIVE, 81, []), (0.1, 0, [])]:
        c = cfg.clone()
        c.MODEL.EXITS.ANYTIME.SPARSE_MAX_ACTIVE, c.MODEL.EXITS.ANYTIME.SPARSE_MIN_PIXELS = max_active, min_pixels
        m = AnytimeSegmentor(c).eval()
        m.load_state_dict(model.state_dict())
        assert (m.sparse_max_active, m.sparse_min_pixels) == (max_active, min_pixels)
        m.set_pixel_thresholds({"res2": 2.0, "res3": cut, "res4": 1.0})  # res4's exit runs (masked), freezes nothing
        with torch.no_grad():
            runs[min_pixels, max_active] = logits, info = m.run_pixel(images.tensor, images.image_sizes[0])
        assert info["masked"]["sparse_stages"] == (["res4", "exits.res4", "res5", "sem_seg_head"] if sparse is True
                                                   else sparse)
        assert info["answered_pct"]["res3"] == pytest.approx(75.0, abs=1.0)
    ref, ref_info = runs[SPARSE_MIN_PIXELS, SPARSE_MAX_ACTIVE]
    for logits, info in runs.values():
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
        assert info["macs"] == pytest.approx(ref_info["macs"], rel=1e-12)
    for key, value, match in [("SPARSE_MAX_ACTIVE", 1.5, r"SPARSE_MAX_ACTIVE is 1.5; write an active share in \[0, 1\]"),
                              ("SPARSE_MIN_PIXELS", -1, "SPARSE_MIN_PIXELS is -1; write a pixel count >= 0"),
                              ("SPARSE_MIN_PIXELS", 2.5, "SPARSE_MIN_PIXELS is 2.5")]:
        bad = cfg.clone()
        setattr(bad.MODEL.EXITS.ANYTIME, key, value)
        with pytest.raises(ConfigError, match=match):
            AnytimeSegmentor(bad)


def test_evaluator_reads_the_per_image_macs_of_the_output(model, write_label_dataset):
    rng = np.random.default_rng(1)
    name = write_label_dataset("anytime_pixel_eval", [rng.integers(0, K, (48, 64)) for _ in range(2)], K)
    from detectron2.data import DatasetCatalog
    from PIL import Image

    inputs = []
    for d in DatasetCatalog.get(name):
        img = torch.as_tensor(np.array(Image.open(d["file_name"]).convert("RGB"))).permute(2, 0, 1).contiguous()
        inputs.append({"image": img, "height": 48, "width": 64, "file_name": d["file_name"]})
    l3, _ = exit_logits(model, inputs[0], "res3")
    top = F.softmax(l3, dim=1).amax(dim=1)
    pixel(model, {"res2": 2.0, "res3": float(top.median()), "res4": 2.0})
    ev = AnytimeEvaluator(name, costs=model.costs, exit_names=model.exit_names, distributed=False)
    macs, outs = [], []
    with torch.no_grad():
        for inp in inputs:
            out = model([inp])
            macs.append(out[0]["anytime"]["macs"])
            outs.append(out[0]["anytime"])
            ev.process([inp], out)
    res = ev.evaluate()["anytime"]
    assert res["GMACs"] * 1e9 == pytest.approx(np.mean(macs))
    assert res["pixels_res3_pct"] == pytest.approx(np.mean([a["answered_pct"]["res3"] for a in outs]))
    assert res["pixels_final_pct"] == pytest.approx(100.0 - res["pixels_res3_pct"])
    assert res["active_res4_pct"] == pytest.approx(np.mean([a["active_pct"]["res4"] for a in outs]))
    assert 0.0 < res["pixels_res3_pct"] < 100.0
    assert res["GMACs"] < res["GMACs_final"]
    model.policy = FINAL


def test_export_refuses_the_pixel_policy(model):
    from conftest import load_script

    export_tool = load_script("export_model", "tools/export_model.py")
    pixel(model, {"res2": 2.0, "res3": 0.9, "res4": 0.9})
    try:
        with pytest.raises(export_tool.ExportError, match="'pixel' freezes pixels per image"):
            export_tool.export_model(model, "onnx", "/nonexistent/never_written.onnx")
    finally:
        model.policy = FINAL


def test_pixel_policy_on_mobilenetv2_sparse_equals_emulate():
    cfg = tiny_cfg("mobilenetv2_100", "SegDeepLabV3Head", num_classes=K,
                   **{"MODEL.META_ARCHITECTURE": "MultiExitSegmentor"})
    cfg.MODEL.EXITS.MODE, cfg.MODEL.EXITS.CHANNELS = "ds", 16
    trained = train_steps(cfg, K, 1)
    cfg.MODEL.META_ARCHITECTURE = "AnytimeSegmentor"
    m = build_model(cfg).eval()
    m.load_state_dict(anytime_state_dict(m, trained.state_dict())[0], strict=True)
    image = random_batch(1, 64, 80, K, seed=8, with_labels=False)[0]
    l3, images = exit_logits(m, image, "res3")
    top = F.softmax(l3, dim=1).amax(dim=1)
    cut = float(top.flatten().sort().values[top.numel() // 10])  # most pixels freeze: sparse pays at stride 8
    got = {}
    for mode in ("emulate", "sparse"):
        pixel(m, {"res2": 2.0, "res3": cut, "res4": 2.0}, mode, min_pixels=0)
        with torch.no_grad():
            got[mode] = m.run_pixel(images.tensor, images.image_sizes[0])
    (emulated, info), (sparse, sinfo) = got["emulate"], got["sparse"]
    frozen = (top >= cut)[:, None].expand_as(l3)
    assert torch.equal(emulated[frozen], l3[frozen]) and torch.equal(sparse[frozen], l3[frozen])
    torch.testing.assert_close(sparse, emulated, rtol=1e-5, atol=1e-5)
    assert sinfo["masked"]["sparse_stages"] == ["res4", "res5", "sem_seg_head"] and info["macs"] == pytest.approx(sinfo["macs"])
    assert info["macs"] < m.costs(tuple(images.tensor.shape[-2:])).final


@pytest.mark.parametrize("mode", ["emulate", "sparse"])
def test_an_exit_after_a_freeze_runs_masked_counts_fewer_macs_and_leaves_dense_ops(model, mode):
    """res3 freezes about three quarters of the pixels; res4 then runs masked on the rest (its
    logits at the active pixels, masked_exits) and freezes some of them with those logits."""
    image = random_batch(1, 64, 80, K, seed=5, with_labels=False)[0]
    l3, images = exit_logits(model, image, "res3")
    hw = tuple(images.tensor.shape[-2:])
    top3 = F.softmax(l3, dim=1).amax(dim=1)
    cut3 = float(top3.flatten().sort().values[top3.numel() // 4])
    active = top3 < cut3
    mask = PixelMask(active)
    # res4's features and its masked logits, as the policy computes them
    feats = dict(model.backbone.forward_stages(images.tensor))
    size = exit_size(hw, model.exits["res4"].common_stride)
    with torch.no_grad():
        y4, _ = masked_forward(model.backbone.body.layer3, feats["res3"], mask, "emulate")
        masked4, r_exit = masked_forward(model.exits["res4"], y4, mask, "emulate")
        dense4 = model.exits["res4"](y4, size, with_classifier=False).seg_logits
    up4 = F.interpolate(masked4, size=hw, mode="bilinear", align_corners=False)
    top4 = F.softmax(up4, dim=1).amax(dim=1)
    cut4 = float(top4[active].median())
    frozen4 = active & (top4 >= cut4)
    assert 0 < int(frozen4.sum()) < int(active.sum())
    pixel(model, {"res2": 2.0, "res3": cut3, "res4": cut4}, mode, min_pixels=0)  # the tiny maps may run sparse
    with torch.no_grad():
        logits, info = model.run_pixel(images.tensor, images.image_sizes[0])
    assert info["evaluated"] == ("res3", "res4") and info["answer"] == FINAL
    # res3 ran before any freeze: its own (dense) forward; res4 masked
    assert "exits.res3" in info["masked"]["dense_ops"] and "exits.res4" not in info["masked"]["dense_ops"]
    assert ("exits.res4" in info["masked"]["sparse_stages"]) == (mode == "sparse")
    costs = model.costs(hw)
    assert 0 < float(r_exit.macs[0]) < costs.exits["res4"]
    # the pixels res4 froze keep its masked logits (not its dense forward's: no halo at frozen neighbours)
    per_pixel = logits.permute(0, 2, 3, 1)
    torch.testing.assert_close(per_pixel[frozen4], up4.permute(0, 2, 3, 1)[frozen4], rtol=1e-5, atol=1e-5)
    dense_up = F.interpolate(dense4, size=hw, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    assert not torch.allclose(per_pixel[frozen4], dense_up[frozen4], rtol=1e-5, atol=1e-5)
    # counted: the masked res4 exit's count in place of costs().exits["res4"], its resize at every pixel
    with torch.no_grad():
        _, r4 = masked_forward(model.backbone.body.layer3, feats["res3"], mask, "emulate")
        after = PixelMask(active & ~frozen4)
        y5, r5 = masked_forward(model.backbone.body.layer4, y4, after, "emulate")
        _, r_head = masked_forward(model.sem_seg_head, y5, after, "emulate")
    expected = costs.prefix["res3"] + costs.exits["res3"] + costs.answer["res3"] + float(r4.macs[0]) \
        + float(r_exit.macs[0]) + costs.answer["res4"] + float(r5.macs[0]) + float(r_head.macs[0]) \
        + model.pixel_costs(hw).head_resize
    assert info["macs"] == pytest.approx(expected, rel=1e-12)
    model.policy = FINAL


# ---------------------------------------------------------------------- decision cells (MODEL.EXITS.PIXEL.CELL)
def brute_force_cells(top, active, threshold, cell, inside):
    """The cell rule written out, one cell at a time: a cell freezes its active pixels when its
    active pixels inside the image (or, for a cell wholly in the padding, its active pixels)
    all reach the threshold."""
    n, h, w = top.shape
    out = torch.zeros_like(active)
    for i in range(n):
        for r in range(0, h, cell):
            for c in range(0, w, cell):
                box = (i, slice(r, r + cell), slice(c, c + cell))
                act, ins = active[box], inside[0, r:r + cell, c:c + cell]
                decides = act & ins if bool((act & ins).any()) else act
                if bool((top[box][decides] >= threshold).all()):
                    out[box] = act
    return out


def test_the_cell_decision_equals_a_loop_over_cells():
    from segdistill.modeling.exits.pixel_cells import freeze_decision

    g = torch.Generator().manual_seed(0)
    top = torch.rand(2, 23, 30, generator=g)
    active = torch.rand(2, 23, 30, generator=g) > 0.15
    inside = torch.zeros(1, 23, 30, dtype=torch.bool)
    inside[:, :17, :21] = True  # the padding: partial cells mixing image and padding, and cells wholly in it
    top[:, 17:, :] = 0.0  # padding pixels below every threshold: they must not hold back a cell with image pixels
    for cell in (1, 2, 3, 4, 7, 8, 32):
        for t in (0.05, 0.2, 0.5):
            got = freeze_decision(top, active, t, cell, inside)
            assert torch.equal(got, brute_force_cells(top, active, t, cell, inside)), (cell, t)
            assert not bool((got & inside & (top < t)).any())  # an image pixel below the threshold never freezes
            assert not bool((got & ~active).any())
            # no padding mask (mask-aware training): every pixel decides
            everywhere = torch.ones_like(inside)
            assert torch.equal(freeze_decision(top, active, t, cell), brute_force_cells(top, active, t, cell, everywhere))
        if cell == 1:  # the per-pixel decision, padding included
            assert torch.equal(freeze_decision(top, active, 0.2, 1, inside), active & (top >= 0.2))
    # some cells do freeze with image pixels and padding in them at the thresholds used
    assert bool((freeze_decision(top, active, 0.05, 4, inside) & ~inside).any())


def test_config_key_of_the_decision_cells(model):
    from segdistill.config import ConfigError
    from segdistill.modeling.meta_arch.anytime import AnytimeSegmentor

    cfg = anytime_cfg(POLICY="pixel", PIXEL_THRESHOLDS=[0.9])
    cfg.MODEL.META_ARCHITECTURE = "AnytimeSegmentor"
    assert cfg.MODEL.EXITS.PIXEL.CELL == 1 and model.pixel_cell == 1
    cfg.MODEL.EXITS.PIXEL.CELL = 16
    assert AnytimeSegmentor(cfg).pixel_cell == 16
    for value in (0, -8, 2.5, True, "8"):
        cfg.MODEL.EXITS.PIXEL.CELL = value
        with pytest.raises(ConfigError, match=r"MODEL.EXITS.PIXEL.CELL is .*; write an integer >= 1, e.g. "
                                              r"MODEL.EXITS.PIXEL.CELL 16"):
            AnytimeSegmentor(cfg)


def test_cells_of_a_stages_stride_freeze_whole_map_pixels_of_that_stage(model):
    """CELL 8, the stride of res3..res5's maps: res3 freezes whole 8x8 cells (those whose pixels
    inside the image all reach the threshold; the last 4 rows and columns are padding), each
    frozen pixel keeps res3's logits, no image pixel below the threshold freezes, and the
    masked res4 stage's active share on its 8x10 map is the share of active cells exactly
    (PixelMask's max-pool keeps no extra map pixel)."""
    image = random_batch(1, 64, 80, K, seed=5, with_labels=False)[0]
    l3, images = exit_logits(model, image, "res3")
    hw, c = tuple(images.tensor.shape[-2:]), 8
    assert hw == (64, 80)
    own = (60, 76)  # run as an image of 60 x 76 padded to 64 x 80
    inside = torch.zeros(1, *hw, dtype=torch.bool)
    inside[:, :own[0], :own[1]] = True
    top = F.softmax(l3, dim=1).amax(dim=1)
    cell_min = top.masked_fill(~inside, float("inf")).view(1, 8, c, 10, c).amin(dim=(2, 4))
    cut = float(cell_min.flatten().sort().values[40])  # about half of the 80 cells freeze
    frozen_cells = cell_min >= cut
    frozen = frozen_cells.repeat_interleave(c, 1).repeat_interleave(c, 2)
    assert 0 < int(frozen_cells.sum()) < 80
    assert bool((frozen & ~inside).any())  # cells mixing image and padding among them
    try:
        model.pixel_cell = c
        pixel(model, {"res2": 2.0, "res3": cut, "res4": 2.0})
        with torch.no_grad():
            logits, info = model.run_pixel(images.tensor, own)
    finally:
        model.pixel_cell = 1
        model.policy = FINAL
    per_pixel, exit_per_pixel = logits.permute(0, 2, 3, 1), l3.permute(0, 2, 3, 1)
    kept = (per_pixel == exit_per_pixel).all(-1)
    assert torch.equal(kept, frozen)  # exactly the whole cells, each pixel with res3's logits
    assert not bool((kept & inside & (top < cut)).any())
    share = float(frozen_cells.float().mean())
    assert info["answered_pct"]["res3"] == pytest.approx(100.0 * float((frozen & inside).sum()) / (60 * 76))
    # the masked stage and the head ran on the cells' mask: at stride 8 no map pixel is kept by max-pooling
    feats = dict(model.backbone.forward_stages(images.tensor))
    mask = PixelMask(~frozen)
    assert torch.equal(mask.at((8, 10)), ~frozen_cells)
    with torch.no_grad():
        y4, r4 = masked_forward(model.backbone.body.layer3, feats["res3"], mask, "emulate")
        y5, r5 = masked_forward(model.backbone.body.layer4, y4, mask, "emulate")
        _, r_head = masked_forward(model.sem_seg_head, y5, mask, "emulate")
    assert r4.active_share == pytest.approx(1.0 - share, abs=1e-12)
    costs, dense = model.costs(hw), model.pixel_costs(hw)
    expected = costs.prefix["res3"] + costs.exits["res3"] + costs.answer["res3"] + float(r4.macs[0] + r5.macs[0]) \
        + float(r_head.macs[0]) + dense.head_resize
    assert info["macs"] == pytest.approx(expected, rel=1e-12)
