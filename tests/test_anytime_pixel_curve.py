"""benchmarks/anytime_curve.py --pixel (the per-pixel policy's rows) and --seeds-summary, toy size:
the rows equal a direct AnytimeEvaluator run with their thresholds, a second call recomputes
nothing, and the mean over seeds with its interval is the hand-computed one."""
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import REPO
from detectron2.checkpoint import DetectionCheckpointer
from segdistill.engine.anytime import anytime_cfg, build_anytime_model
from segdistill.evaluation.anytime import AnytimeEvaluator
from segdistill.evaluation.anytime_pixel import PixelRecords
from segdistill.modeling.meta_arch.anytime import FINAL, PIXEL
from test_anytime import K, exit_cfg, train_steps
from test_anytime_pixel_calibration import grid_of, read_inputs

EXITS = ["res2", "res3", "res4"]


def load_bench():
    spec = importlib.util.spec_from_file_location("anytime_curve", os.path.join(REPO, "benchmarks", "anytime_curve.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def count_calls(monkeypatch, bench, names):
    calls = {n: 0 for n in names}
    for n in names:
        fn = getattr(bench, n)

        def wrapped(*a, _fn=fn, _n=n, **k):
            calls[_n] += 1
            return _fn(*a, **k)

        monkeypatch.setattr(bench, n, wrapped)
    return calls


def test_pixel_rows_resume_and_equal_a_direct_run(tmp_path, write_label_dataset, monkeypatch):
    rng = np.random.default_rng(3)
    calib = write_label_dataset("anytime_pix_curve_calib", [rng.integers(0, K, (48, 64)) for _ in range(3)], K)
    val = write_label_dataset("anytime_pix_curve_val", [rng.integers(0, K, (48, 64)) for _ in range(2)], K)
    cfg = exit_cfg("ds")
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (calib,), (val,)
    cfg.DATALOADER.NUM_WORKERS = 0
    DetectionCheckpointer(train_steps(cfg, K, 1), save_dir=str(tmp_path)).save("model_final")
    (tmp_path / "ds.yaml").write_text(cfg.dump())
    files = (str(tmp_path / "ds.yaml"), str(tmp_path / "model_final.pth"))
    model = build_anytime_model(anytime_cfg(files[0], ["MODEL.WEIGHTS", files[1]]))
    inputs = read_inputs(val)
    low, _, high = grid_of(model, inputs[0])[:3]  # two thresholds that freeze some pixels (+ ADP-C's 0.998)

    bench = load_bench()
    calls = count_calls(monkeypatch, bench, ["collect_pixel_records", "collect_records", "_timed_run", "stage_overhead"])
    out = tmp_path / "curve"
    argv = ["--output", str(out), "--calib-dataset", calib, "--drops", "0,100", "--budgets", "0.5",
            "--risk-epsilons", "0.5", "--threads", "1", "--pixel", "--pixel-grid", f"{low!r},{high!r}",
            "--overhead-repeats", "1", "--model", "DS", *files]
    (ds,) = bench.main(argv)
    assert calls == {"collect_pixel_records": 2, "collect_records": 2, "_timed_run": 5 + 4, "stage_overhead": 1}
    pix = ds["pixel"]
    assert pix["grid"] == [low, high, 0.998] and pix["mode"] == "sparse" and pix["masked_stages"] == ["res3", "res4", "res5"]
    rows = {r["row"]: r for r in pix["rows"]}
    assert {"final", "pixel D=0", "pixel D=100", "pixel B=0.5", "ADP-C 0.998", "pixel crc eps=0.5",
            "pixel ucb eps=0.5"} <= set(rows)
    assert rows["ADP-C 0.998"]["thresholds"] == {n: 0.998 for n in EXITS}
    assert rows["final"]["GMACs"] == pytest.approx(ds["fixed"][FINAL]["GMACs"])
    # D = 100: the cheapest recorded setting on the calibration split
    rec_c = PixelRecords.load(str(out / "records_DS_pixel_sparse_calib.npz"))
    cheapest = rec_c.thresholds[int(np.argmin(rec_c.macs.mean(0)))]
    assert [rows["pixel D=100"]["thresholds"][n] or math.inf for n in EXITS] == cheapest.tolist()
    assert 0 < rows["pixel D=100"]["MACs_saved_pct"]  # some pixels froze
    same = rows["pixel D=100"]["vs_image_same_drop"]
    image = next(c for c in ds["curve"] if c["max_drop"] == 100)
    assert same["MACs_saved_pts"] == pytest.approx(rows["pixel D=100"]["MACs_saved_pct"] - image["MACs_saved_pct"])
    # every row = a direct AnytimeEvaluator run of policy pixel with its thresholds, on the evaluation split
    model.pixel_mode = "sparse"
    for name, r in rows.items():
        model.set_pixel_thresholds({n: (2.0 if v is None else v) for n, v in r["thresholds"].items()})
        model.policy = PIXEL
        ev = AnytimeEvaluator.for_model(model, val, distributed=False)
        with torch.no_grad():
            for inp in inputs:
                ev.process([inp], model([inp]))
        res = ev.evaluate()["anytime"]
        assert res["mIoU"] == pytest.approx(r["mIoU"], abs=1e-9), name
        assert res["GMACs"] == pytest.approx(r["GMACs"], rel=1e-12), name
        assert {s: res[f"frozen_{s}_pct"] for s in pix["masked_stages"]} == pytest.approx(r["frozen"]), name
    model.policy = FINAL
    timed = pix["timed"]
    assert set(timed) == {"pixel:sparse", "pixel:emulate", "ADP-C:sparse", "nothing_frozen:sparse"}
    assert timed["pixel:sparse"]["consistent"] and timed["ADP-C:sparse"]["consistent"]
    assert timed["pixel:emulate"]["GMACs"] == pytest.approx(timed["pixel:sparse"]["GMACs"], rel=1e-12)
    nothing = timed["nothing_frozen:sparse"]  # thresholds above 1: the final path, no saving to compare
    assert nothing["GMACs"] == pytest.approx(ds["fixed"][FINAL]["GMACs"]) and nothing["time_to_macs_saving"] is None
    so = pix["stage_overhead"]
    assert set(so["stages"]) == {"res3", "res4", "res5"} and so["input_hw"] == [48, 64]
    assert not any(s["sparse_ran_sparse"] for s in so["stages"].values())  # every pixel active: above SPARSE_MAX_ACTIVE
    text = (out / "curve.md").read_text()
    assert "| pixel D=100 |" in text and "Nothing frozen, stage by stage" in text

    # resumed: nothing is recomputed, records are not rewritten, the rows are the same
    stamps = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out) if f.endswith(".npz")}
    calls.update({n: 0 for n in calls})
    (again,) = bench.main(argv)
    assert calls == {"collect_pixel_records": 0, "collect_records": 0, "_timed_run": 0, "stage_overhead": 0}
    assert {f: os.stat(out / f).st_mtime_ns for f in stamps} == stamps
    assert again["pixel"] == json.loads(json.dumps(pix))


def test_image_front_and_equal_macs_interpolation():
    bench = load_bench()
    result = {"fixed": {FINAL: {"GMACs": 10.0, "mIoU": 60.0}},
              "curve": [{"GMACs": 2.0, "mIoU": 50.0}, {"GMACs": 4.0, "mIoU": 49.0}, {"GMACs": 6.0, "mIoU": 58.0}],
              "budget_curve": [{"GMACs": 2.0, "mIoU": 52.0}]}
    front = bench.image_front(result)
    assert front == [[2.0, 52.0], [6.0, 58.0], [10.0, 60.0]]  # (4, 49) and (2, 50) are dominated
    assert bench.front_miou(front, 4.0) == pytest.approx(55.0)
    assert bench.front_miou(front, 8.0) == pytest.approx(59.0)
    assert bench.front_miou(front, 1.0) is None and bench.front_miou(front, 11.0) is None


def test_seeds_summary_means_and_intervals(tmp_path):
    bench = load_bench()

    def result(drop, saved_pts, equal, certified, risk, ratio):
        rows = [{"row": "pixel D=1", "drop": drop, "mIoU": 60.0 - drop, "MACs_saved_pct": 50.0,
                 "vs_image_same_drop": {"MACs_saved_pts": saved_pts, "mIoU": 0.0},
                 "vs_image_equal_macs": None if equal is None else {"mIoU": equal}},
                {"row": "pixel ucb eps=0.05", "certified": certified, "val_risk": risk, "epsilon": 0.05}]
        return {"label": "DS", "fixed": {FINAL: {"mIoU": 60.0}},
                "curve": [{"max_drop": 1.0, "mIoU": 60.0 - 2 * drop, "drop": 2 * drop, "GMACs": 1.0, "MACs_saved_pct": 40.0}],
                "risk": [{"method": "ucb", "epsilon": 0.1, "feasible": certified, "val_risk": 2 * risk, "mIoU": 59.0,
                          "drop": 1.0, "GMACs": 0.5, "MACs_saved_pct": 50.0}],
                "pixel": {"rows": rows, "timed": {"pixel:sparse": {"time_to_macs_saving": ratio}}}}

    seeds = [result(0.2, 10.0, 0.4, True, 0.01, 0.7), result(0.5, 12.0, None, True, 0.03, 0.5),
             result(0.8, 20.0, 0.6, True, 0.05, 0.3)]
    folders = []
    for k, r in enumerate(seeds):
        (tmp_path / f"seed{k}").mkdir()
        (tmp_path / f"seed{k}" / "result_DS.json").write_text(json.dumps(r))
        folders.append(str(tmp_path / f"seed{k}"))
    summary = bench.main(["--output", str(tmp_path / "summary"), "--seeds-summary", *folders])["DS"]
    m = summary["mean"]
    drop = m["pixel/rows[pixel D=1]/drop"]
    # by hand: mean 0.5, sd 0.3, half-width t(0.975, 2) sd / sqrt(3) with t = 4.302653
    assert drop["n"] == 3 and drop["mean"] == pytest.approx(0.5) and drop["sd"] == pytest.approx(0.3)
    assert drop["hi"] - drop["mean"] == pytest.approx(4.302653 * 0.3 / math.sqrt(3), rel=1e-6)
    assert drop["lo"] == pytest.approx(0.5 - 4.302653 * 0.3 / math.sqrt(3), rel=1e-6)
    equal = m["pixel/rows[pixel D=1]/vs_image_equal_macs/mIoU"]  # one seed had none
    assert equal["n"] == 2 and equal["mean"] == pytest.approx(0.5)
    assert m["pixel/rows[pixel ucb eps=0.05]/certified"]["mean"] == 1.0
    a = summary["acceptance"]
    # 14 points more MACs saved on the mean (< 15), but +0.5 mIoU at equal MACs (>= 0.3): passes
    assert a["per_drop"] == [{"max_drop": 1.0, "drop": pytest.approx(0.5), "MACs_saved_pts_vs_image": pytest.approx(14.0),
                              "mIoU_vs_image_equal_macs": pytest.approx(0.5), "n_equal_macs": 2, "pass": True}]
    assert a["pixel_policy"] and a["time_half_of_macs"] and a["time_to_macs_saving"] == pytest.approx(0.5)
    assert a["ucb"] == [{"epsilon": 0.05, "certified_share": 1.0, "val_risk": pytest.approx(0.03), "pass": True}]
    assert (tmp_path / "summary" / "seeds_summary.md").read_text().count("pass") >= 2
    # the image-level policy's rows too: its drop at D = 1 is 2 x the pixel rows' (mean 1.0)
    assert m["curve[max_drop=1]/drop"]["mean"] == pytest.approx(1.0)
    md = (tmp_path / "summary" / "seeds_summary.md").read_text()
    assert "| confidence, D=1 | 59.00 [" in md and "| final | 60.00 [60.00, 60.00] (n=3) |" in md
    assert "| ucb eps=0.1 | 59.00 [59.00, 59.00] (n=3) |" in md and "(100%) |" in md  # certified in every seed
    assert m["risk[method=ucb epsilon=0.1]/val_risk"]["mean"] == pytest.approx(0.06)
    with pytest.raises(FileNotFoundError, match="result_<label>.json"):
        bench.main(["--output", str(tmp_path / "s2"), "--seeds-summary", str(tmp_path)])
