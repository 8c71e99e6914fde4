"""Calibration and risk control of the per-pixel anytime policy (segdistill.evaluation.anytime_pixel):
records that predict a real run exactly, the max-drop / budget search against a brute-force scan,
the risk guarantees by simulation on a grid of candidate settings, the label-free
``disagreement`` quality, and ``tools/calibrate_exits.py --policy pixel`` end to end."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import REPO
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from segdistill.evaluation import metrics_from_confusion
from segdistill.evaluation.anytime import AnytimeEvaluator, collect_records, policy_outcome
from segdistill.evaluation.anytime_calibration import calibrate
from segdistill.evaluation.anytime_pixel import PixelRecords, collect_pixel_records, pixel_candidates
from segdistill.evaluation.anytime_risk import calibrate_risk, gap_losses, per_image_quality
from segdistill.modeling.meta_arch.anytime import FINAL, PIXEL, AnytimeSegmentor, save_thresholds
from test_anytime_pixel import K, exit_logits
from test_anytime_pixel import model  # noqa: F401  (the tiny DS anytime model, a module fixture)

EXITS = ["res2", "res3", "res4"]


def read_inputs(name):
    """The test loader's inputs of a registered folder dataset, one dict per image."""
    from PIL import Image

    inputs = []
    for d in DatasetCatalog.get(name):
        img = torch.as_tensor(np.array(Image.open(d["file_name"]).convert("RGB"))).permute(2, 0, 1).contiguous()
        inputs.append({"image": img, "height": img.shape[1], "width": img.shape[2], "file_name": d["file_name"]})
    return inputs


def grid_of(anytime_model, image):
    """Shared thresholds that freeze some pixels of the tiny model (quantiles of its exits' top
    probabilities; the deeper exits are the more confident, so the low ones freeze every pixel
    by res3 or res4, the high one leaves some to the head) and one per-exit row (res3 alone)."""
    tops = []
    for name in EXITS:
        logits, _ = exit_logits(anytime_model, image, name)
        tops.append(F.softmax(logits, dim=1).amax(dim=1).flatten())
    top = torch.cat(tops).sort().values
    shared = [float(top[int(q * (top.numel() - 1))]) for q in (0.3, 0.6, 0.9)]
    return shared + [{"res2": 2.0, "res3": shared[1], "res4": 2.0}]


# ---------------------------------------------------------------------- records = a real run
def test_pixel_records_predict_a_real_run_exactly(model, write_label_dataset):  # noqa: F811
    rng = np.random.default_rng(0)
    name = write_label_dataset("anytime_pixel_rec", [rng.integers(0, K, (48, 64)) for _ in range(3)], K)
    inputs = read_inputs(name)
    records = collect_pixel_records(model, [inputs[:2], inputs[2:]], name, candidates=grid_of(model, inputs[0]))
    assert model.policy == FINAL  # restored
    assert len(records.thresholds) == 5 and np.isinf(records.thresholds[0]).all()  # "never" added first
    assert records.thresholds[4].tolist() == [math.inf, records.thresholds[2][1], math.inf]
    chosen = calibrate(records, max_drop=100.0)  # the cheapest setting
    assert chosen.feasible and chosen.outcome.avg_macs == records.macs.mean(0).min()
    mixed = stopped = 0
    for i, row in enumerate(records.thresholds):
        thresholds = dict(zip(EXITS, row.tolist()))
        model.set_pixel_thresholds(thresholds)
        model.policy = PIXEL
        ev = AnytimeEvaluator.for_model(model, name, distributed=False)
        with torch.no_grad():
            for inp in inputs:
                ev.process([inp], model([inp]))
        model.policy = FINAL
        res = ev.evaluate()["anytime"]
        want = records.candidate_summary(i)
        outcome = policy_outcome(records, thresholds)
        assert res["mIoU"] == pytest.approx(outcome.miou, abs=1e-9) == pytest.approx(want["mIoU"], abs=1e-9)
        assert res["GMACs"] == pytest.approx(outcome.avg_macs / 1e9, rel=1e-12)
        assert res["GMACs_final"] == pytest.approx(want["GMACs_final"], rel=1e-12)
        for key in [k for k in want if k.startswith(("answered_", "pixels_", "active_", "frozen_"))]:
            assert res.get(key, 0.0) == pytest.approx(want[key], abs=1e-9), (i, key)
        assert {n: res[f"answered_{n}_pct"] * 3 / 100 for n in EXITS + [FINAL]} == pytest.approx(
            {n: float(v) for n, v in outcome.histogram().items()})
        mixed += 0.0 < want["pixels_final_pct"] < 100.0 and want["frozen_res5_pct"] > 0.0
        stopped += want["answered_final_pct"] < 100.0
    assert mixed >= 2  # some settings freeze some pixels, not all: later stages ran masked, the head answered the rest
    assert stopped >= 1  # and some stop images at an exit
    assert records.macs[:, 0] == pytest.approx(records.final_macs)  # "never": the plain path's fvcore MACs
    assert (records.macs[:, 1:].mean(0) < records.final_macs.mean()).any()


def test_an_unrecorded_setting_is_refused_and_records_round_trip(tmp_path):
    rec = synthetic_records(np.random.default_rng(5), 6)
    with pytest.raises(ValueError, match="was not run when these per-pixel records were collected"):
        policy_outcome(rec, {"e1": 0.42, "e2": 0.42})
    rec.save(str(tmp_path / "r.npz"))
    back = PixelRecords.load(str(tmp_path / "r.npz"))
    assert np.array_equal(back.thresholds, rec.thresholds) and np.array_equal(back.confusions, rec.confusions)
    assert policy_outcome(back, {"e1": 0.9, "e2": 0.9}).avg_macs == policy_outcome(rec, {"e1": 0.9, "e2": 0.9}).avg_macs
    from segdistill.evaluation.anytime import ExitRecords

    with pytest.raises(ValueError, match="holds no image-level exit records"):
        ExitRecords.load(str(tmp_path / "r.npz"))
    with pytest.raises(ValueError, match="at most 16"):
        pixel_candidates(np.linspace(0.5, 0.99, 17), ["e1"])
    with pytest.raises(ValueError, match="has 2 values for the exits"):
        pixel_candidates([[0.9, 0.9]], ["a", "b", "c"])


# ---------------------------------------------------------------------- calibrate on pixel records
def synthetic_records(rng, n, k=3, shared=(0.5, 0.7, 0.9, 0.99), rows=((2.0, 0.8), (0.6, 2.0))):
    """Per-pixel records of two exits, ``n`` images of 40 labelled pixels: random confusions per
    setting (more errors at lower thresholds), random MACs (cheaper at lower thresholds)."""
    t = pixel_candidates(list(shared) + [list(r) for r in rows], ["e1", "e2"])
    m = len(t)
    level = np.where(np.isfinite(t), t, 1.0).mean(1)  # 1 for "never"
    confs = np.zeros((n, m, k, k), dtype=np.int64)
    for i in range(n):
        gt = rng.integers(0, k, 40)
        for j in range(m):
            wrong = rng.random(40) < 0.6 * (1.0 - level[j]) + (0.02 if j else 0.0) * rng.random()
            pred = np.where(wrong, (gt + 1 + rng.integers(0, k - 1, 40)) % k, gt)
            np.add.at(confs[i, j], (gt, pred), 1)
    macs = 100.0 * level[None] * rng.uniform(0.6, 1.0, (n, m))
    macs[:, 0] = 100.0
    answers = np.full((n, m), 2)
    return PixelRecords(["e1", "e2"], ["s1", "s2", "s3"], t, confs, macs, rng.uniform(0.01, 0.02, (n, m)), answers,
                        rng.uniform(0.5, 1.0, (n, m)), np.zeros((n, m, 3)), np.zeros((n, m, 3)), np.full(n, 100.0))


def brute_force(records, max_drop=None, budget=None):
    """Every recorded setting evaluated with loops; the cheapest within max_drop of the final
    output (or the best mIoU within budget x final MACs); ties: better mIoU / lower cost, then
    higher thresholds."""
    names = [str(c) for c in range(records.confusions.shape[-1])]
    final_miou = metrics_from_confusion(records.confusions[:, 0].sum(0), names)["mIoU"]
    best = None
    for j, row in enumerate(records.thresholds):
        total = np.zeros(records.confusions.shape[-2:])
        for i in range(records.num_images):
            total = total + records.confusions[i, j]
        miou = metrics_from_confusion(total, names)["mIoU"]
        cost = sum(records.macs[i, j] for i in range(records.num_images)) / records.num_images
        ok = miou >= final_miou - max_drop - 1e-9 if max_drop is not None else cost <= budget * 100.0 + 1e-9
        tsum = sum(v if math.isfinite(v) else 2.0 for v in row)
        key = (cost, -miou, -tsum) if max_drop is not None else (-miou, cost, -tsum)
        if ok and (best is None or key < best[0]):
            best = (key, j, miou, cost)
    return best


def test_calibrate_on_pixel_records_is_the_brute_force_scan():
    for seed in range(3):
        rec = synthetic_records(np.random.default_rng(seed), 12)
        for kwargs in ({"max_drop": 0.5}, {"max_drop": 3.0}, {"max_drop": 10.0}, {"max_drop": 40.0},
                       {"budget": 0.8}, {"budget": 0.95}):
            cal, bf = calibrate(rec, **kwargs), brute_force(rec, **kwargs)
            want = dict(zip(rec.exit_names, rec.thresholds[bf[1]].tolist()))
            assert cal.feasible and cal.thresholds == want, (seed, kwargs)
            assert cal.outcome.miou == pytest.approx(bf[2]) and cal.outcome.avg_macs == pytest.approx(bf[3])
    # a looser margin never costs more
    costs = [calibrate(rec, max_drop=d).outcome.avg_macs for d in (0.0, 1.0, 5.0, 20.0, 100.0)]
    assert costs == sorted(costs, reverse=True) and costs[-1] < costs[0]


# ---------------------------------------------------------------------- risk control on a grid
PIX = 10
GRID = (0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5)
RISK = (0.01, 0.02, 0.05, 0.08, 0.103, 0.15, 0.2, 0.3)  # mean per-image gap of each setting


def grid_population(n, seed):
    """``n`` images of PIX pixels of class 0; under shared threshold GRID[m], image i gets
    Binomial(PIX, 2 d_i RISK[m]) pixels wrong (d_i ~ U(0, 1): its difficulty, the same for every
    setting), the final output none. The gap's mean under GRID[m] is RISK[m]."""
    rng = np.random.default_rng(seed)
    t = pixel_candidates(list(GRID), ["e1", "e2"])
    d = rng.uniform(0.0, 1.0, n)
    wrong = np.zeros((n, len(t)), dtype=np.int64)
    wrong[:, 1:] = rng.binomial(PIX, np.clip(2.0 * d[:, None] * np.array(RISK)[None], 0.0, 1.0))
    confs = np.zeros((n, len(t), 2, 2), dtype=np.int64)
    confs[..., 0, 0], confs[..., 0, 1] = PIX - wrong, wrong
    m = len(t)
    return PixelRecords(["e1", "e2"], ["s"], t, confs, np.tile(np.linspace(100, 30, m), (n, 1)), np.zeros((n, m)),
                        np.full((n, m), 2), 1.0 - wrong / PIX, np.zeros((n, m, 3)), np.zeros((n, m, 1)),
                        np.full(n, 100.0))


def subset(r, idx):
    return PixelRecords(r.exit_names, r.stage_names, r.thresholds, r.confusions[idx], r.macs[idx], r.time_s[idx],
                        r.answers[idx], r.agreement[idx], r.answered_pct[idx], r.active_pct[idx], r.final_macs[idx])


@pytest.mark.parametrize("quality", ["miou", "disagreement"])
def test_risk_guarantees_hold_on_a_grid_by_simulation(quality):
    """Calibrate on 200 draws of 200 images from a 5000-image population; each chosen setting's
    true risk is its population mean gap. For one class with every pixel labelled, the per-image
    mIoU is the pixel accuracy and the disagreement with the (always right) final output is the
    error rate: the qualities give the same gap."""
    pop = grid_population(5000, seed=3)
    eps, delta, trials, n = 0.1, 0.1, 200, 200
    true = gap_losses(pop, pop.thresholds, quality).mean(1)  # per recorded setting
    assert true[0] == 0.0 and true == pytest.approx(np.array((0.0,) + RISK), abs=0.01)
    rng = np.random.default_rng(4)
    ucb, crc, naive = [], [], []
    for _ in range(trials):
        cal = subset(pop, rng.choice(5000, n, replace=False))
        for out, method in ((ucb, "ucb"), (crc, "crc")):
            c = calibrate_risk(cal, epsilon=eps, method=method, delta=delta, quality=quality)
            out.append(true[cal.candidate_index(np.array([[c.thresholds[e] for e in cal.exit_names]]))[0]])
        emp = gap_losses(cal, cal.risk_sequence(100), quality).mean(1)  # the uncorrected choice
        run = int(np.argmin(emp <= eps)) if not (emp <= eps).all() else len(emp)
        naive.append(true[cal.candidate_index(cal.risk_sequence(100)[max(run - 1, 0)][None])[0]])
    ucb, crc, naive = map(np.array, (ucb, crc, naive))
    assert (ucb > eps).mean() <= delta  # P(true risk > eps) <= delta
    assert crc.mean() <= eps + 3 * crc.std() / math.sqrt(trials)  # E[risk] <= eps
    assert (naive > eps).mean() > 0.2  # the setting at 0.103 passes uncorrected often: the test can fail
    assert (ucb > 0).mean() > 0.5  # and the guarantee is not met by never exiting


# ---------------------------------------------------------------------- the disagreement quality
def test_disagreement_is_the_share_of_pixels_off_the_final_answer_and_needs_no_label(model, write_label_dataset):  # noqa: F811,E501
    rng = np.random.default_rng(1)
    name = write_label_dataset("anytime_pixel_dis", [rng.integers(0, K, (40, 56)) for _ in range(2)], K)
    inputs = read_inputs(name)
    grid = grid_of(model, inputs[0])[:2]
    records = collect_pixel_records(model, [inputs], name, candidates=grid)
    # by hand: run each setting and the final policy, count the pixels whose class differs
    for j, row in enumerate(records.thresholds):
        for i, inp in enumerate(inputs):
            with torch.no_grad():
                model.policy = FINAL
                ref = model([inp])[0]["sem_seg"].argmax(0)
                model.set_pixel_thresholds(dict(zip(EXITS, row.tolist())))
                model.policy = PIXEL
                got = model([inp])[0]["sem_seg"].argmax(0)
            share = float((got != ref).sum()) / got.numel()
            assert gap_losses(records, row[None], "disagreement")[0, i] == pytest.approx(share, abs=1e-12)
    model.policy = FINAL
    q = per_image_quality(records, "disagreement")
    assert (q[:, records.final_output] == 1.0).all() and gap_losses(records, records.thresholds[:1], "disagreement")[
        0].tolist() == [0.0, 0.0]
    assert (q[:, 1:] < 1.0).any()  # the grid changes some answers
    # image-level records keep it too: each exit's share of pixels off the final head's class
    exit_records = collect_records(model, [inputs], name)
    for i, inp in enumerate(inputs):
        for j, e in enumerate(EXITS):
            logits, images = exit_logits(model, inp, e)
            model.policy = FINAL
            with torch.no_grad():
                ref = model([inp])[0]["sem_seg"].argmax(0)
            got = logits[0, :, :inp["height"], :inp["width"]].argmax(0)
            assert exit_records.agreement[i, j] == pytest.approx(float((got == ref).double().mean()), abs=1e-12)
    assert (exit_records.agreement[:, -1] == 1.0).all()
    # without labels: the same split with its label files left out of the dataset dicts
    DatasetCatalog.register("anytime_pixel_unlabelled", lambda: [
        {k: v for k, v in d.items() if k != "sem_seg_file_name"} for d in DatasetCatalog.get(name)])
    MetadataCatalog.get("anytime_pixel_unlabelled").set(stuff_classes=[f"c{k}" for k in range(K)], ignore_label=255)
    try:
        bare = collect_pixel_records(model, [inputs], "anytime_pixel_unlabelled", candidates=grid)
    finally:
        DatasetCatalog.remove("anytime_pixel_unlabelled")
        MetadataCatalog.remove("anytime_pixel_unlabelled")
    assert bare.labelled_images == 0 and not bare.confusions.any()
    assert np.array_equal(bare.agreement, records.agreement) and np.array_equal(bare.macs, records.macs)
    got = calibrate_risk(bare, epsilon=0.5, method="crc", quality="disagreement")
    want = calibrate_risk(records, epsilon=0.5, method="crc", quality="disagreement")
    assert got.thresholds == want.thresholds and got.details["empirical_risk"] == want.details["empirical_risk"]
    with pytest.raises(ValueError, match="no mIoU can be measured"):
        calibrate(bare, max_drop=1.0)
    with pytest.raises(ValueError, match="label-free quality 'disagreement'"):
        calibrate_risk(bare, epsilon=0.5, method="crc", quality="miou")


# ---------------------------------------------------------------------- the command line, end to end
def test_calibrate_exits_policy_pixel_end_to_end(tmp_path):
    """tools/calibrate_exits.py --policy pixel on the demo DS config (random weights, the mini
    demo set's analysis split, 96x96, three settings): the thresholds file is read back as
    PIXEL_THRESHOLDS, and is what calibrate picks on the saved records."""
    from segdistill.engine.anytime import anytime_cfg as tool_cfg, calibrate_from_config

    config = os.path.join(REPO, "configs/demo/exits/ds.yaml")
    opts = ["DATASETS.TRAIN", "('segdistill_demo_mini_train',)", "DATASETS.TEST", "('segdistill_demo_mini_val',)",
            "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "32", "MODEL.EXITS.CHANNELS", "16", "DATALOADER.NUM_WORKERS", "0",
            "MODEL.EXITS.PIXEL.CELL", "2"]
    cfg = tool_cfg(config, opts)
    cfg.MODEL.META_ARCHITECTURE = "MultiExitSegmentor"
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("model")
    out, rec = str(tmp_path / "pixel.json"), str(tmp_path / "pixel.npz")
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "projects") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, os.path.join(REPO, "tools", "calibrate_exits.py"), "--config-file", config,
                          "--policy", "pixel", "--pixel-grid", "0.15,0.3", "--max-drop", "100", "--output", out,
                          "--records", rec, "--threads", "1", *opts, "MODEL.WEIGHTS", str(tmp_path / "model.pth")],
                         env=env, cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.load(open(out))
    records = PixelRecords.load(rec)
    assert doc["policy"] == "pixel" and doc["calibration"]["dataset"] == "segdistill_demo_mini_train_hs3_analysis"
    assert doc["pixel_cell"] == 2  # the decision cell the thresholds were calibrated for (the config's)
    assert len(doc["calibration"]["settings"]) == 3 == len(records.thresholds) and records.num_images >= 1
    want = calibrate(records, max_drop=100.0).thresholds
    assert {k: (math.inf if v is None else v) for k, v in doc["thresholds"].items()} == want
    # read back by the config: THRESHOLDS_FILE of policy pixel is PIXEL_THRESHOLDS
    acfg = tool_cfg(config, opts + ["MODEL.EXITS.ANYTIME.POLICY", "pixel", "MODEL.EXITS.ANYTIME.THRESHOLDS_FILE", out])
    assert AnytimeSegmentor(acfg).pixel_thresholds == want
    acfg.MODEL.EXITS.PIXEL.CELL = 1  # other cells freeze other pixels with the same thresholds
    with pytest.raises(ValueError, match="calibrated for MODEL.EXITS.PIXEL.CELL 2, but the config asks for 1"):
        AnytimeSegmentor(acfg)
    acfg.MODEL.EXITS.PIXEL.CELL = 2
    acfg.MODEL.EXITS.ANYTIME.PIXEL_THRESHOLDS = [0.9]
    with pytest.raises(ValueError, match="not both"):
        AnytimeSegmentor(acfg)
    acfg.MODEL.EXITS.ANYTIME.PIXEL_THRESHOLDS, acfg.MODEL.EXITS.ANYTIME.POLICY = [], "confidence"
    with pytest.raises(ValueError, match="needs thresholds"):  # a pixel file holds no confidence thresholds
        AnytimeSegmentor(acfg)
    conf_file = save_thresholds(str(tmp_path / "conf.json"), {e: 0.5 for e in EXITS}, confidence="mean_max_prob",
                                pixel_threshold=0.9)
    from segdistill.modeling.meta_arch.anytime import load_thresholds

    with pytest.raises(ValueError, match="holds thresholds of policy 'confidence', read for policy 'pixel'"):
        load_thresholds(conf_file, EXITS, confidence="mean_max_prob", pixel_threshold=0.9, policy=PIXEL)
    # the label-free risk control on the same records (reused, the model does not run again)
    got = calibrate_from_config(tool_cfg(config, opts), out, risk_control="crc", epsilon=0.9, quality="disagreement",
                                policy="pixel", records_path=rec)
    assert got["policy"] == "pixel" and got["risk_control"]["quality"] == "disagreement"
    assert got["thresholds"] == {k: (None if math.isinf(v) else v) for k, v in calibrate_risk(
        records, epsilon=0.9, method="crc", quality="disagreement").thresholds.items()}
    with pytest.raises(ValueError, match="holds no per-pixel records"):
        cfg2 = tool_cfg(config, opts)
        np.savez(str(tmp_path / "other.npz"), dataset=np.array("segdistill_demo_mini_train_hs3_analysis"))
        calibrate_from_config(cfg2, out, max_drop=1.0, policy="pixel", records_path=str(tmp_path / "other.npz"))

