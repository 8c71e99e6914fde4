"""Anytime inference: stage-by-stage backbones, the AnytimeSegmentor's policies
(final = the plain deployed model bit for bit and in MACs; later stages not run after a
confident exit), costs, the evaluator, calibration with a known answer, the held-out check."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, make_backbone, random_batch, set_keys, tiny_cfg, write_clusters
from conftest import trained_model as train_steps
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from segdistill.evaluation import SemSegEvaluator, metrics_from_confusion
from segdistill.convert import load_checked_weights, save_deployed_checkpoint
from segdistill.engine.anytime import anytime_cfg, calibrate_from_config
from segdistill.evaluation.anytime import (
    AnytimeEvaluator, ExitRecords, collect_records, fixed_exit_outcome, miou_of_confusions, policy_outcome,
)
from segdistill.evaluation.anytime_calibration import calibrate, check_held_out
from segdistill.evaluation.anytime_risk import calibrate_risk
from segdistill.modeling.stagewise import StagewiseBackbone
from segdistill.modeling.meta_arch.anytime import (
    FINAL, AnytimeSegmentor, anytime_from_trained, anytime_state_dict, load_anytime_weights, load_thresholds,
    save_thresholds,
)

K = 5


def exit_cfg(mode="ds", meta="MultiExitSegmentor"):
    cfg = tiny_cfg("resnet18", "SegDeepLabV3Head", num_classes=K, **{"MODEL.META_ARCHITECTURE": meta})
    cfg.MODEL.EXITS.MODE = mode
    cfg.MODEL.EXITS.CHANNELS = 16
    return cfg


def anytime_twin(cfg, trained):
    """The AnytimeSegmentor of a training config, with the trained model's weights (strict)."""
    acfg = cfg.clone()
    acfg.MODEL.META_ARCHITECTURE = "AnytimeSegmentor"
    model = build_model(acfg).eval()
    state, dropped = anytime_state_dict(model, trained.state_dict())
    model.load_state_dict(state, strict=True)
    return model, dropped


@pytest.fixture(scope="module")
def sr_pair():
    cfg = exit_cfg("sr")
    trained = train_steps(cfg, K, 1)
    model, dropped = anytime_twin(cfg, trained)
    return cfg, trained, model, dropped


class CallCounter:
    """Forward hooks counting the calls of named submodules."""

    def __init__(self, modules):
        self.counts = {name: 0 for name in modules}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(*_):
            self.counts[name] += 1
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------- stage-by-stage backbones
@pytest.mark.parametrize("kind,options,stop,later", [
    ("resnet18", {"output_stride": 16}, "res3", ["layer3", "layer4"]),
    ("resnet18", {"output_stride": 8, "dilation_rule": "mmseg", "stem_type": "deep"}, "res3", ["layer3", "layer4"]),
    ("mobilenetv2_100", {"output_stride": 16}, "res2", ["blocks.3", "blocks.6"]),
    ("mobilenetv2_100", {"output_stride": 8, "dilation_rule": "mmseg"}, "res2", ["blocks.3", "blocks.6"]),
    ("hrnet_w18_small", {}, "stage2_b1", ["stage3", "stage4"]),
    ("hrnet_w18_small", {"fuse_upsample": "bilinear"}, "stage2_b1", ["stage3", "stage4"]),
])
def test_forward_stages_equals_forward_and_stops_early(kind, options, stop, later):
    """Every layout option of the backbones (mmseg dilation rule, deep stem, bilinear fuse):
    the stages' tensors are ``forward``'s, their shapes ``stage_shapes()``'s, later stages unrun."""
    torch.manual_seed(0)
    every = ["layer1", "res2", "res3", "res4", "res5"] if kind.startswith("hrnet") else ["res2", "res3", "res4", "res5"]
    bb = make_backbone(kind, out_features=every, **options)
    assert isinstance(bb, StagewiseBackbone)
    bb.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = bb(x)
        stages = dict(bb.forward_stages(x))
    shapes = bb.stage_shapes()
    assert list(stages) == list(shapes)
    for name, feat in stages.items():
        assert feat.shape[1] == shapes[name].channels and 64 // feat.shape[-1] == shapes[name].stride, name
    assert set(ref) <= set(stages) and all(torch.equal(ref[k], stages[k]) for k in ref)
    # lazy: a consumer that stops at `stop` never runs the later stages
    counter = CallCounter({n: bb.body.get_submodule(n) for n in later})
    with torch.no_grad():
        for name, _ in bb.forward_stages(x):
            if name == stop:
                break
    assert counter.counts == {n: 0 for n in later}
    with torch.no_grad():
        list(bb.forward_stages(x))
    assert all(v == 1 for v in counter.counts.values()), counter.counts
    counter.remove()


# ---------------------------------------------------------------------- policies
@pytest.mark.parametrize("mode", ["ds", "sr"])
def test_final_policy_is_the_plain_deployed_model_bit_for_bit_and_in_macs(mode, sr_pair):
    cfg, trained, model, dropped = sr_pair if mode == "sr" else (exit_cfg("ds"), None, None, None)
    if mode == "ds":
        trained = train_steps(cfg, K, 1)
        model, dropped = anytime_twin(cfg, trained)
    else:
        assert any(".classifier." in k for k in dropped) and "exit_objective.temperature" in dropped
    base = cfg.clone()
    base.MODEL.META_ARCHITECTURE = "SemanticSegmentorAnySize"
    plain = build_model(base).eval()
    plain.load_state_dict(trained.deploy_state_dict(), strict=True)
    batch = random_batch(2, 70, 90, K, seed=3)
    model.policy = FINAL
    with torch.no_grad():
        ours, ref = model(batch), plain(batch)
    assert all(torch.equal(a["sem_seg"], b["sem_seg"]) for a, b in zip(ours, ref))
    assert [o["sem_seg_exit"] for o in ours] == [FINAL, FINAL] and ours[0]["anytime"]["evaluated"] == ()

    from fvcore.nn import FlopCountAnalysis

    class PlainPath(torch.nn.Module):
        def __init__(self, plain):
            super().__init__()
            self.plain = plain

        def forward(self, x):
            return self.plain.sem_seg_head(self.plain.backbone(x), None, output_size=tuple(x.shape[-2:]))[0]

    counter = FlopCountAnalysis(PlainPath(plain), (torch.zeros(1, 3, 70, 90),))
    counter.unsupported_ops_warnings(False)
    costs = model.costs((70, 90))
    assert costs.macs(FINAL, ()) == counter.total() == model.path_macs((70, 90), FINAL, ())


def test_fixed_exit_policy_equals_the_training_models_exit_output(sr_pair):
    _, trained, model, _ = sr_pair
    batch = random_batch(2, 70, 90, K, seed=4)
    trained.eval_exits = True
    with torch.no_grad():
        ref = trained(batch)
        for name in model.exit_names:
            model.policy = f"exit:{name}"
            out = model(batch)
            assert all(torch.equal(o["sem_seg"], r[f"sem_seg_{name}"]) for o, r in zip(out, ref)), name
            assert out[0]["sem_seg_exit"] == name and out[0]["anytime"]["evaluated"] == (name,)
    trained.eval_exits = False
    model.policy = FINAL


def test_path_macs_are_the_sum_of_the_measured_parts(sr_pair):
    model = sr_pair[2]
    costs = model.costs((64, 80))
    for evaluated, answer in [(("res2",), "res2"), (("res2", "res3"), "res3"), (("res3", "res4"), "res4"),
                              (("res2", "res3", "res4"), FINAL)]:
        assert costs.macs(answer, evaluated) == model.path_macs((64, 80), answer, evaluated), (evaluated, answer)
    assert costs.macs("res2", ("res2",)) < costs.macs("res3", ("res2", "res3")) < costs.macs("res4", ("res2", "res3", "res4"))
    assert costs.macs("res4", ("res4",)) < costs.final < costs.macs(FINAL, ("res2",))


def test_confidence_policy_does_not_run_the_stages_after_the_answering_exit(sr_pair):
    model = sr_pair[2]
    parts = {"res4": model.backbone.body.layer3, "res5": model.backbone.body.layer4, "head": model.sem_seg_head,
             **{f"exit_{n}": m for n, m in model.exits.items()}}
    counter = CallCounter(parts)
    batch = random_batch(3, 64, 64, K, seed=6)
    try:
        # res2 never answers (not even run), res3 always does: res4, res5, exit res4 and the head never run
        model.set_thresholds({"res2": 2.0, "res3": 0.0, "res4": 0.0})
        model.policy = "confidence"
        with torch.no_grad():
            out = model(batch)
        assert [o["sem_seg_exit"] for o in out] == ["res3"] * 3
        assert [o["anytime"]["evaluated"] for o in out] == [("res3",)] * 3
        assert counter.counts == {"res4": 0, "res5": 0, "head": 0, "exit_res2": 0, "exit_res3": 3, "exit_res4": 0}
        # unreachable thresholds: every exit runs, then the final head answers
        model.set_thresholds({"res2": 1.0, "res3": 1.0, "res4": 1.0})
        counter.counts = dict.fromkeys(counter.counts, 0)
        with torch.no_grad():
            out = model(batch)
        assert [o["sem_seg_exit"] for o in out] == [FINAL] * 3
        assert counter.counts == {"res4": 3, "res5": 3, "head": 3, "exit_res2": 3, "exit_res3": 3, "exit_res4": 3}
    finally:
        counter.remove()
        model.policy = FINAL


def test_confidence_decision_follows_the_threshold_per_image(sr_pair):
    model = sr_pair[2]
    batch = random_batch(4, 64, 64, K, seed=8)
    with torch.no_grad():
        records = model.forward_all_exits(batch)
        conf = [r["confidence"]["res2"] for r in records]
        cut = sorted(conf)[2]  # images at or above it answer from res2
        model.set_thresholds({"res2": cut, "res3": 2.0, "res4": 2.0})
        model.policy = "confidence"
        out = model(batch)
    model.policy = FINAL
    assert [o["sem_seg_exit"] for o in out] == ["res2" if c >= cut else FINAL for c in conf]
    for o, r in zip(out, records):  # the answer is exactly the recorded output of that exit / the head
        ref = r["exits"]["res2"] if o["sem_seg_exit"] == "res2" else r["final"]
        assert torch.equal(o["sem_seg"], ref)


def test_config_errors():
    cfg = exit_cfg("ds", "AnytimeSegmentor")
    cfg.MODEL.EXITS.ANYTIME.POLICY = "exit:res9"
    with pytest.raises(ValueError, match=r"POLICY 'exit:res9'.*'exit:res2'"):
        build_model(cfg)
    cfg.MODEL.EXITS.ANYTIME.POLICY = "confidence"
    with pytest.raises(ValueError, match="THRESHOLDS_FILE"):
        build_model(cfg)
    cfg.MODEL.EXITS.ANYTIME.THRESHOLDS = [0.5, 0.5]
    with pytest.raises(ValueError, match="one per exit"):
        build_model(cfg)
    cfg.MODEL.EXITS.ANYTIME.THRESHOLDS = [0.5, 2.0, 0.9]
    model = build_model(cfg)
    assert model.thresholds == {"res2": 0.5, "res3": math.inf, "res4": 0.9} and model.active_exits() == ("res2", "res4")
    cfg.MODEL.EXITS.ANYTIME.CONFIDENCE = "entropy"
    with pytest.raises(ValueError, match="mean_max_prob"):
        build_model(cfg)
    cfg = exit_cfg("ds", "AnytimeSegmentor")
    cfg.MODEL.EXITS.IN_FEATURES = ["res3", "head_features"]
    with pytest.raises(ValueError, match="head's features"):
        build_model(cfg)
    with pytest.raises(ValueError, match="Unknown MODEL.EXITS.MODE 'dss'"):
        build_model(set_keys(exit_cfg("ds", "AnytimeSegmentor"), **{"MODEL.EXITS.MODE": "dss"}))
    cfg = exit_cfg("none", "AnytimeSegmentor")  # the plain model: no exits, policy final only
    assert build_model(cfg).exit_names == []
    cfg.MODEL.EXITS.ANYTIME.POLICY = "confidence"
    with pytest.raises(ValueError, match=r"valid choices: \['final'\]"):
        build_model(cfg)
    with pytest.raises(RuntimeError, match="inference-only"):
        build_model(exit_cfg("ds", "AnytimeSegmentor")).train()(random_batch(1, 32, 32, K))


def test_thresholds_file_round_trip_and_checks(tmp_path):
    path = str(tmp_path / "t.json")
    save_thresholds(path, {"res2": 0.9, "res3": math.inf}, confidence="mean_max_prob", pixel_threshold=0.9)
    assert json.load(open(path))["thresholds"] == {"res2": 0.9, "res3": None}
    assert load_thresholds(path, ["res2", "res3"], confidence="mean_max_prob", pixel_threshold=0.9) == \
        {"res2": 0.9, "res3": math.inf}
    with pytest.raises(ValueError, match="calibrated for confidence 'mean_max_prob'"):
        load_thresholds(path, ["res2", "res3"], confidence="fraction_above", pixel_threshold=0.9)
    with pytest.raises(ValueError, match="the model has"):
        load_thresholds(path, ["res2", "res3", "res4"], confidence="mean_max_prob", pixel_threshold=0.9)


def test_deploy_target_anytime_and_lazy_config(tmp_path, sr_pair):
    cfg, trained, model, _ = sr_pair
    ckpt = str(tmp_path / "model_final.pth")
    DetectionCheckpointer(trained, save_dir=str(tmp_path)).save("model_final")
    # what tools/deploy_model.py --target anytime does: the training config's model with its
    # checked weights, its anytime form, the deployed file
    loaded = build_model(cfg)
    load_checked_weights(loaded, ckpt, min_matched=1.0)
    out = save_deployed_checkpoint(anytime_from_trained(cfg, loaded), str(tmp_path / "anytime.pth"))
    state = torch.load(out, weights_only=True)["model"]
    assert set(state) == set(model.state_dict())  # no missing, no unexpected key
    assert not any(".classifier." in k or k.startswith(("final_classifier", "exit_objective")) for k in state)
    # the deployed file and the training checkpoint both load into the anytime model (lazy-built here)
    from detectron2.config import LazyCall as L, instantiate
    from segdistill.modeling.exits import build_exit_heads

    lazy = L(AnytimeSegmentor)(
        backbone=model.backbone, sem_seg_head=model.sem_seg_head, pixel_mean=cfg.MODEL.PIXEL_MEAN,
        pixel_std=cfg.MODEL.PIXEL_STD, policy="exit:res3",
        exits=L(build_exit_heads)(input_shape=model.backbone.stage_shapes(), in_features=["res2", "res3", "res4"],
                                  num_classes=K, channels=16, common_stride=8, norm="BN", with_classifier=False,
                                  max_downsample=2),
    )
    built = instantiate(lazy).eval()
    assert load_anytime_weights(built, out) == []
    assert any(".classifier." in k for k in load_anytime_weights(built, ckpt))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in built.state_dict().items())


# ---------------------------------------------------------------------- evaluator and records
def test_evaluator_and_records_agree_with_a_real_run(write_label_dataset, sr_pair):
    from detectron2.data import DatasetCatalog

    model = sr_pair[2]
    rng = np.random.default_rng(0)
    name = write_label_dataset("anytime_eval", [rng.integers(0, K, (48, 64)) for _ in range(5)], K)
    inputs = []
    for d in DatasetCatalog.get(name):
        from PIL import Image

        img = torch.as_tensor(np.array(Image.open(d["file_name"]).convert("RGB"))).permute(2, 0, 1).contiguous()
        inputs.append({"image": img, "height": 48, "width": 64, "file_name": d["file_name"]})
    with torch.no_grad():
        records = collect_records(model, [inputs[:2], inputs[2:]], name)
    cut = float(np.sort(records.confidences[:, 0])[2])
    thresholds = {"res2": cut, "res3": 2.0, "res4": 2.0}
    expected = policy_outcome(records, thresholds)
    model.set_thresholds(thresholds)
    model.policy = "confidence"
    model.eval_final = True
    ev = AnytimeEvaluator(name, costs=model.costs, exit_names=model.exit_names, distributed=False)
    ref = SemSegEvaluator(name, distributed=False)
    with torch.no_grad():
        for inp in inputs:
            out = model([inp])
            ev.process([inp], out)
            ref.process([inp], [{"sem_seg": out[0]["sem_seg"]}])
    model.policy, model.eval_final = FINAL, False
    res = ev.evaluate()["anytime"]
    assert res["mIoU"] == pytest.approx(ref.evaluate()["sem_seg"]["mIoU"]) == pytest.approx(expected.miou)
    assert res["mIoU_final"] == pytest.approx(fixed_exit_outcome(records, FINAL).miou)
    assert res["GMACs"] * 1e9 == pytest.approx(expected.avg_macs)
    assert res["GMACs_final"] * 1e9 == pytest.approx(records.final.mean())
    hist = expected.histogram()
    assert hist["res2"] == 3 and hist[FINAL] == 2
    assert {k: res[f"answered_{k}_pct"] for k in hist} == {k: 100.0 * v / 5 for k, v in hist.items()}
    assert res["time_ms"] > 0 and res["time_ms_final"] > 0


def test_trainer_and_lazy_evaluation_of_an_anytime_model_report_its_costs(write_label_dataset, sr_pair, tmp_path):
    """train_net --eval-only (Trainer.test) and the lazy loop (lazy_test) score an
    AnytimeSegmentor with AnytimeEvaluator: the policy's mIoU next to its MACs and exits."""
    from detectron2.config import LazyCall as L
    from omegaconf import OmegaConf
    from segdistill.engine import Trainer, lazy_test

    cfg, _, model, _ = sr_pair
    rng = np.random.default_rng(3)
    name = write_label_dataset("anytime_trainer_eval", [rng.integers(0, K, (48, 64)) for _ in range(3)], K)
    cfg = cfg.clone()
    cfg.DATASETS.TEST, cfg.DATALOADER.NUM_WORKERS, cfg.OUTPUT_DIR = (name,), 0, str(tmp_path)
    model.policy = "exit:res3"
    try:
        res = Trainer.test(cfg, model)
        assert res["anytime"]["answered_res3_pct"] == 100.0 and res["anytime"]["mIoU"] == res["sem_seg"]["mIoU"]
        assert res["anytime"]["GMACs"] * 1e9 == pytest.approx(model.costs(model.padded_size((48, 64))).macs(
            "res3", ("res3",)))
        from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
        from segdistill.data import SemSegDatasetMapper

        lazy = OmegaConf.create({"train": {"output_dir": str(tmp_path)}, "dataloader": {
            "test": L(build_detection_test_loader)(
                dataset=L(get_detection_dataset_dicts)(names=name, filter_empty=False),
                mapper=L(SemSegDatasetMapper)(is_train=False, augmentations=[], image_format="RGB", num_classes=K,
                                              ignore_value=255), num_workers=0),
            "evaluator": L(SemSegEvaluator)(dataset_name=name, distributed=False)}})
        got = lazy_test(lazy, model)["anytime"]
        assert {k: v for k, v in got.items() if "time" not in k} == \
            pytest.approx({k: v for k, v in res["anytime"].items() if "time" not in k}, nan_ok=True)
    finally:
        model.policy = FINAL


def test_miou_of_confusions_matches_the_evaluator_metrics():
    rng = np.random.default_rng(1)
    confs = rng.integers(0, 20, (4, 6, 6))
    confs[1, 2] = 0  # a class absent from the ground truth
    assert miou_of_confusions(confs) == pytest.approx(
        [metrics_from_confusion(c, [str(i) for i in range(6)])["mIoU"] for c in confs])


# ---------------------------------------------------------------------- calibration
def synthetic_records():
    """Two exits, 2 classes, 8 images of 100 pixels each, all of one class (0 for even images).

    An output is right (all pixels) or wrong (all pixels the other class) per image; the final
    head is always right. Exit 1 is right exactly on the images where its confidence is at
    least 0.8; exit 2 is right where its confidence is at least 0.6, except image 7 (0.95,
    wrong). Costs: exit 1 stops at 10 + 1 + 0 MACs, exit 2 at 20 + 1 + 0, the final head 100,
    each exit that ran adding its 1.
    """
    conf1 = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4])
    conf2 = np.array([0.3, 0.3, 0.3, 0.3, 0.9, 0.6, 0.5, 0.95])
    right1 = conf1 >= 0.8
    right2 = (conf2 >= 0.6) & (np.arange(8) != 7)
    confs = np.zeros((8, 3, 2, 2), dtype=np.int64)
    for i in range(8):
        g = i % 2
        for j, right in enumerate([right1[i], right2[i], True]):
            confs[i, j, g, g if right else 1 - g] = 100
    n = 8
    return ExitRecords(["e1", "e2"], np.stack([conf1, conf2], 1), confs, np.tile([10.0, 20.0], (n, 1)),
                       np.ones((n, 2)), np.zeros((n, 2)), np.full(n, 100.0))


def brute_force(records, max_drop=None, budget=None):
    """Every pair of thresholds among the recorded confidences (+ never), evaluated with loops."""
    best = None
    final_miou = miou_of_confusions(records.confusions[:, -1].sum(0))
    for t1 in list(np.unique(records.confidences[:, 0])) + [math.inf]:
        for t2 in list(np.unique(records.confidences[:, 1])) + [math.inf]:
            total, cost = np.zeros((2, 2)), 0.0
            for i in range(records.num_images):
                spent, answered = 0.0, False
                for j, (t, stop) in enumerate([(t1, 10), (t2, 20)]):  # exits in order; "never" does not run
                    if math.isfinite(t):
                        spent += 1
                        if records.confidences[i, j] >= t:
                            total, cost, answered = total + records.confusions[i, j], cost + stop + spent, True
                            break
                if not answered:
                    total, cost = total + records.confusions[i, 2], cost + 100 + spent
            miou, cost = miou_of_confusions(total), cost / records.num_images
            ok = miou >= final_miou - max_drop - 1e-9 if max_drop is not None else cost <= budget * 100 + 1e-9
            key = (cost, -miou) if max_drop is not None else (-miou, cost)
            if ok and (best is None or key < best[0]):
                best = (key, t1, t2, miou, cost)
    return best


def test_calibration_finds_the_known_answer():
    records = synthetic_records()
    # no loss allowed: exit 1 answers images 0-3 (confidence >= 0.8, all right); exit 2 can never
    # answer, since its most confident image (7, 0.95) is wrong: images 4-7 go to the final head.
    cal = calibrate(records, max_drop=0.0)
    assert cal.thresholds == {"e1": 0.8, "e2": math.inf}
    assert cal.feasible and cal.outcome.miou == pytest.approx(100.0)
    assert cal.outcome.histogram() == {"e1": 4, "e2": 0, FINAL: 4}
    assert cal.outcome.avg_macs == pytest.approx((4 * 11 + 4 * 101) / 8)
    bf = brute_force(records, max_drop=0.0)
    assert (bf[1], bf[2]) == (0.8, math.inf) and bf[4] == pytest.approx(cal.outcome.avg_macs)
    # looser mIoU budgets and a MACs budget: the brute-force optimum (thresholds may tie)
    for kwargs in ({"max_drop": 5.0}, {"max_drop": 30.0}, {"budget": 0.4}):
        cal, bf = calibrate(records, **kwargs), brute_force(records, **kwargs)
        assert cal.outcome.avg_macs == pytest.approx(bf[4]) and cal.outcome.miou == pytest.approx(bf[3]), kwargs
        assert cal.outcome.avg_macs <= 56.0
    # a budget below the cheapest path (e1 answering every image: 11 MACs): the cheapest, flagged
    cheap = calibrate(records, budget=0.05)
    assert not cheap.feasible and cheap.thresholds == {"e1": 0.4, "e2": math.inf}
    assert cheap.outcome.avg_macs == pytest.approx(11.0) and cheap.outcome.histogram()["e1"] == 8
    # coordinate descent (forced by a tiny combination limit) reaches the same optimum here
    cd = calibrate(records, max_drop=0.0, max_combinations=1)
    assert cd.thresholds == {"e1": 0.8, "e2": math.inf}


def test_calibration_refuses_an_evaluation_split(write_label_dataset):
    labels = [np.zeros((8, 8), dtype=np.int64) for _ in range(3)]
    train = write_label_dataset("anytime_cal_train", labels, 2)
    val = write_label_dataset("anytime_cal_val", labels, 2)
    check_held_out(train, [val])  # disjoint: fine
    with pytest.raises(ValueError, match="is an evaluation split"):
        check_held_out(val, [val])
    from detectron2.data import DatasetCatalog, MetadataCatalog

    DatasetCatalog.register("anytime_cal_leak", lambda: DatasetCatalog.get(val)[:1])
    MetadataCatalog.get("anytime_cal_leak").set(stuff_classes=["a", "b"], ignore_label=255)
    try:
        with pytest.raises(ValueError, match="1 of its images are in the evaluation split"):
            check_held_out("anytime_cal_leak", [val])
    finally:
        DatasetCatalog.remove("anytime_cal_leak")
        MetadataCatalog.remove("anytime_cal_leak")


# ---------------------------------------------------------------------- the curve benchmark, toy size
def test_anytime_curve_benchmark_end_to_end(tmp_path, write_label_dataset):
    rng = np.random.default_rng(2)
    labels = lambda n: [rng.integers(0, K, (48, 64)) for _ in range(n)]  # noqa: E731
    calib = write_label_dataset("anytime_toy_calib", labels(4), K)
    val = write_label_dataset("anytime_toy_val", labels(3), K)
    files = {}
    for mode in ("ds", "none"):
        cfg = exit_cfg(mode)
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (calib,), (val,)
        cfg.DATALOADER.NUM_WORKERS = 0
        trained = train_steps(cfg, K, 1)
        (tmp_path / mode).mkdir()
        DetectionCheckpointer(trained, save_dir=str(tmp_path / mode)).save("model_final")
        (tmp_path / f"{mode}.yaml").write_text(cfg.dump())
        files[mode] = (str(tmp_path / f"{mode}.yaml"), str(tmp_path / mode / "model_final.pth"))
    spec = importlib.util.spec_from_file_location("anytime_curve", os.path.join(REPO, "benchmarks", "anytime_curve.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "curve"
    argv = ["--output", str(out), "--calib-dataset", calib, "--drops", "0,100", "--threads", "1",
            "--model", "DS", *files["ds"], "--model", "plain", *files["none"]]
    ds, plain = bench.main(argv)
    assert {"curve.json", "curve.md", "curve.png", "records_DS_calib.npz", "records_DS_eval.npz"} <= set(os.listdir(out))
    assert [c["max_drop"] for c in ds["curve"]] == [0.0, 100.0]
    assert [c["budget"] for c in ds["budget_curve"]] == [0.1, 0.15, 0.2, 0.3, 0.5]
    assert ds["curve"][1]["GMACs"] <= ds["curve"][0]["GMACs"] <= ds["fixed"][FINAL]["GMACs"] + 1e-9
    assert ds["sweep"][-1]["threshold"] is None and ds["sweep"][-1]["answered"][FINAL] == 3  # "never": the head
    # risk control rows: 4 calibration images cannot certify epsilon 0.1 (crc needs 9, ucb 22): never exit
    assert [(c["method"], c["epsilon"]) for c in ds["risk"]] == [(m, e) for m in ("crc", "ucb") for e in (0.02, 0.05, 0.1)]
    assert all(not c["feasible"] and c["threshold"] is None and c["val_risk"] == 0.0 for c in ds["risk"])
    assert "at least 9 are needed" in ds["risk"][2]["reason"]
    assert ds["sweep"][-1]["GMACs"] == pytest.approx(ds["fixed"][FINAL]["GMACs"])
    assert ds["sweep"][0]["answered"]["res2"] == 3  # the lowest confidence seen: res2 answers every image
    assert ds["timed"]["confidence"]["consistent"] and ds["timed"]["confidence"]["max_drop"] == 0.0
    tv = ds["time_vs_macs"]  # reported, not asserted (timings of a toy model on a shared machine)
    assert set(tv["policies"]) == set(ds["timed"]) and -1.0 <= tv["spearman"] <= 1.0
    assert tv["macs_ratio"] == sorted(tv["macs_ratio"]) and tv["macs_ratio"][-1] >= 1.0
    assert set(ds["timed"]) == {"confidence", "exit:res2", "exit:res3", "exit:res4", FINAL}
    assert plain["exits"] == [] and set(plain["timed"]) == {FINAL} and "curve" not in plain
    # the plain model's deployed output is the DS model's "final" column in kind: same MACs, own weights
    assert plain["fixed"][FINAL]["GMACs"] == pytest.approx(ds["fixed"][FINAL]["GMACs"])
    with pytest.raises(ValueError, match="is an evaluation split"):
        bench.main(["--output", str(out), "--calib-dataset", val, "--model", "DS", *files["ds"]])
    # calibration (tools/calibrate_exits.py's work) on the same records: the benchmark's D = 100 thresholds
    thr = str(tmp_path / "thresholds.json")
    ds_cfg = lambda: anytime_cfg(files["ds"][0], ["MODEL.WEIGHTS", files["ds"][1]])  # noqa: E731
    got = calibrate_from_config(ds_cfg(), thr, dataset=calib, max_drop=100, records_path=str(out / "records_DS_calib.npz"))
    doc = json.load(open(thr))
    assert got["thresholds"] == doc["thresholds"] == ds["curve"][1]["thresholds"] and doc["calibration"]["dataset"] == calib
    # the risk-controlled variant through the same entry point: what calibrate_risk gives on those records
    got = calibrate_from_config(ds_cfg(), thr, dataset=calib, risk_control="crc", epsilon=0.5,
                                records_path=str(out / "records_DS_calib.npz"))
    want = calibrate_risk(ExitRecords.load(str(out / "records_DS_calib.npz")), epsilon=0.5, method="crc")
    assert want.feasible and got["risk_control"]["threshold"] == want.details["threshold"]
    assert json.load(open(thr))["calibration"]["risk_control"]["method"] == "crc"
    with pytest.raises(ValueError, match="not both"):
        calibrate_from_config(ds_cfg(), thr, dataset=calib, risk_control="ucb", epsilon=0.1, max_drop=1.0)
    assert load_thresholds(thr, ["res2", "res3", "res4"], confidence="mean_max_prob", pixel_threshold=0.9)
    with pytest.raises(ValueError, match="is an evaluation split"):
        calibrate_from_config(ds_cfg(), thr, dataset=val)
    with pytest.raises(ValueError, match="holds records of"):
        calibrate_from_config(ds_cfg(), thr, dataset=calib, records_path=str(out / "records_DS_eval.npz"))
    # the command line is a thin wrapper: one run in its own process, on the same records under a
    # split name it can register there (the demo's), writes the same thresholds
    records = ExitRecords.load(str(out / "records_DS_calib.npz"))
    records.dataset = "segdistill_demo_mini_train_hs3_analysis"
    records.save(str(tmp_path / "records_cli.npz"))
    cli_thr = str(tmp_path / "thresholds_cli.json")
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "projects") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "calibrate_exits.py"), "--config-file", files["ds"][0],
                    "--output", cli_thr, "--dataset", records.dataset, "--max-drop", "100",
                    "--records", str(tmp_path / "records_cli.npz"), "DATASETS.TRAIN", "('segdistill_demo_mini_train',)",
                    "DATASETS.TEST", "('segdistill_demo_mini_val',)", "MODEL.WEIGHTS", files["ds"][1]],
                   env=env, cwd=REPO, check=True, capture_output=True, text=True)
    assert json.load(open(cli_thr))["thresholds"] == doc["thresholds"]


def test_confidence_measures_against_numpy():
    from segdistill.modeling.meta_arch.anytime import ANYTIME_CONFIDENCES

    logits = torch.randn(2, 4, 3, 5) * 3
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    for n in range(2):
        top = [[max(p[n, :, i, j]) for j in range(5)] for i in range(3)]
        assert ANYTIME_CONFIDENCES.get("mean_max_prob")(logits, 0.9)[n].item() == pytest.approx(np.mean(top), rel=1e-5)
        assert ANYTIME_CONFIDENCES.get("fraction_above")(logits, 0.7)[n].item() == pytest.approx(
            np.mean([[t >= 0.7 for t in row] for row in top]))


def test_hrnet_anytime_model_pads_and_answers_from_branch_exits():
    """HRNet pads inputs to 32: the final policy is still the plain model's output, an exit's
    confidence reads only the image's own (unpadded) part of its logits."""
    cfg = tiny_cfg("hrnet_w18_small", "HRNetV2Head", num_classes=K, **{"MODEL.META_ARCHITECTURE": "MultiExitSegmentor"})
    cfg.MODEL.TIMM.OUT_FEATURES = cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.EXITS.MODE, cfg.MODEL.EXITS.CHANNELS = "ds", 16
    cfg.MODEL.EXITS.IN_FEATURES = ["stage2_b0", "stage3_b1"]
    trained = train_steps(cfg, K, 1)
    model, _ = anytime_twin(cfg, trained)
    assert model.exit_names == ["stage2_b0", "stage3_b1"]
    base = cfg.clone()
    base.MODEL.META_ARCHITECTURE = "SemanticSegmentorAnySize"
    plain = build_model(base).eval()
    plain.load_state_dict(trained.deploy_state_dict(), strict=True)
    batch = random_batch(1, 70, 90, K, seed=9)
    with torch.no_grad():
        assert torch.equal(model(batch)[0]["sem_seg"], plain(batch)[0]["sem_seg"])
        assert model(batch)[0]["anytime"]["input_hw"] == (96, 96) == model.padded_size((70, 90))
        rec = model.forward_all_exits(batch)[0]
        trained.eval_exits = True
        ref = trained(batch)[0]
        from detectron2.structures import ImageList

        x = (batch[0]["image"] - model.pixel_mean) / model.pixel_std
        x = ImageList.from_tensors([x], 32).tensor  # 96 x 96
        feat = dict(trained.backbone.forward_stages(x))["stage2_b0"]
        logits = trained.exits["stage2_b0"](feat, (12, 12), with_classifier=False).seg_logits
    assert torch.equal(rec["exits"]["stage3_b1"], ref["sem_seg_stage3_b1"])
    from segdistill.modeling.meta_arch.anytime import mean_max_prob

    # the image's own part of the stride-8 map: ceil(70 / 8) x ceil(90 / 8), not the padding
    assert rec["confidence"]["stage2_b0"] == pytest.approx(mean_max_prob(logits[:, :, :9, :12], 0.9).item())
    assert rec["confidence"]["stage2_b0"] != pytest.approx(mean_max_prob(logits, 0.9).item())


@pytest.mark.parametrize("fuse", [False, True])
def test_hs3_exits_are_refused(tmp_path, fuse):
    """HS3 exits predict clusters (and HS3-Fuse feeds them into the head): not anytime exits."""
    from segdistill.data.datasets.demo import DEMO_CLASSES

    n = len(DEMO_CLASSES)
    cfg = tiny_cfg("resnet18", "SegDeepLabV3Head", num_classes=n, **{"MODEL.META_ARCHITECTURE": "AnytimeSegmentor"})
    cfg.MODEL.EXITS.MODE, cfg.MODEL.EXITS.CHANNELS = "hs3", 16
    cfg.MODEL.EXITS.HS3.CLUSTERS_FILE = write_clusters(
        tmp_path / "clusters.json", {e: [i % 2 for i in range(n)] for e in cfg.MODEL.EXITS.IN_FEATURES}, DEMO_CLASSES)
    cfg.MODEL.EXITS.HS3.FUSE.ENABLED = fuse
    with pytest.raises(ValueError, match="fuses the exits into the head" if fuse else "their own label spaces"):
        build_model(cfg)
