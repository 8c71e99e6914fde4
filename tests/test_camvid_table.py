"""benchmarks/camvid_table.py end to end on a tiny CamVid-layout fixture (a few 48x64 images,
2 iterations per training): every kind of run (plain, multi-exit, HS3 with its Phase 1,
teacher, distiller), the table, the plot, resume, and bad arguments."""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script():
    spec = importlib.util.spec_from_file_location("camvid_table", os.path.join(REPO, "benchmarks", "camvid_table.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["camvid_table"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def write_camvid(root, n_train=10, n_val=2, h=48, w=64):
    """SegNet-layout CamVid: every image has all 11 classes (vertical bands) and some void."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        os.makedirs(root / split)
        os.makedirs(root / f"{split}annot")
        for i in range(n):
            label = np.repeat(((np.arange(w) * 11) // w + i)[None, :] % 11, h, axis=0).astype(np.uint8)
            label[:4] = 11  # void
            image = (rng.integers(0, 40, (h, w, 3)) + label[..., None] * 20).astype(np.uint8)
            Image.fromarray(image).save(root / split / f"f{i:03d}.png")
            Image.fromarray(label).save(root / f"{split}annot" / f"f{i:03d}.png")


TINY = ["SOLVER.MAX_ITER", "2", "TEST.EVAL_PERIOD", "2", "SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.IMS_PER_BATCH", "2",
        "INPUT.CROP.SIZE", "(32, 32)", "INPUT.RESIZE_RATIO_RANGE", "(0.8, 1.0)", "INPUT.MIN_SIZE_TEST", "48",
        "INPUT.MAX_SIZE_TEST", "64"]


@pytest.fixture
def tiny_table(tmp_path, monkeypatch):
    mod = load_script()
    # one method of each kind, so that the test stays short: plain, SR, HS3 (+ Phase 1),
    # teacher, and a distiller with two terms
    monkeypatch.setattr(mod, "BLOCKS", {
        "sr": ("Self-Regulation", ["baseline", "sr"]),
        "hs3": ("HS3", ["baseline", "hs3"]),
        "distill": ("Distillation", ["student", "teacher", "hwd_fakd_pd"]),
    })
    data = tmp_path / "camvid"
    write_camvid(data)
    monkeypatch.setenv("SEGDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    return mod, data, tmp_path / "table"


def test_table_end_to_end_and_resume(tiny_table):
    mod, data, out = tiny_table
    argv = ["--data-root", str(data), "--output", str(out), "--seeds", "1", "--jobs", "2"] + TINY
    text = mod.main(argv)

    # every run kept its result; the distiller's teacher is the teacher run's checkpoint
    for name in ("baseline", "sr", "hs3", "student", "teacher", "hwd_fakd_pd"):
        with open(out / "runs" / name / "seed0" / "result.json") as f:
            r = json.load(f)
        assert 0.0 <= r["mIoU"] <= 100.0
        assert r["method"] == name and r["seed"] == 0
        assert "SEED 0" in r["command"]
    sr = json.loads((out / "runs" / "sr" / "seed0" / "result.json").read_text())
    assert sorted(sr["exits"]) == ["res2", "res3", "res4"]
    hwd = (out / "runs" / "hwd_fakd_pd" / "seed0" / "result.json").read_text()
    assert "teacher/seed0/model_final.pth" in hwd and '[\\"hwd\\", \\"fakd_pd\\"]' in hwd
    # HS3 Phase 1 ran once, and its clusters file is what the HS3 run trained with
    clusters = out / "hs3_clusters" / "hs3" / "clusters.json"
    assert clusters.is_file()
    cfg_text = (out / "runs" / "hs3" / "seed0" / "config.yaml").read_text()
    assert str(clusters) in cfg_text
    # periodic checkpoints of finished runs are removed, the final one kept
    files = os.listdir(out / "runs" / "baseline" / "seed0")
    assert "model_final.pth" in files and not [f for f in files if f.startswith("model_0")]

    # the table: every row with a number, deltas against the block's baseline
    assert (out / "table.png").stat().st_size > 0
    table = (out / "table.md").read_text()
    assert table.strip() == text.strip()
    results = json.loads((out / "results.json").read_text())["results"]
    base = results["baseline"][0]["mIoU"]
    sr_row = [line for line in table.splitlines() if line.startswith("| SR |")][0]
    assert f"{sr['mIoU']:.1f} ± 0.0" in sr_row and f"{sr['mIoU'] - base:+.1f}" in sr_row
    assert "(not run)" not in table and "HS3 clusters: res2 (K = " in table

    # a second invocation finds everything done: nothing trains, results untouched
    before = {p: os.path.getmtime(p) for p in (out / "runs").glob("*/seed0/result.json")}
    mod.main(argv)
    assert before == {p: os.path.getmtime(p) for p in (out / "runs").glob("*/seed0/result.json")}
    # a lost result is run again (a one-seed block with the baseline only)
    os.remove(out / "runs" / "baseline" / "seed0" / "result.json")
    table = mod.Table(mod.parse_args(argv))
    assert [j.key for j in table.jobs()] == ["baseline/seed0"]


def test_dry_run_lists_every_training(tiny_table, capsys):
    mod, data, out = tiny_table
    mod.main(["--data-root", str(data), "--output", str(out), "--seeds", "2", "--dry-run"])
    said = capsys.readouterr().out
    # Phase 1, 2 seeds of each of 5 methods and one teacher
    assert "12 trainings to run" in said
    assert said.count("would run") == 12
    assert not (out / "runs").exists()


def test_bad_arguments(tiny_table, tmp_path):
    mod, data, out = tiny_table
    with pytest.raises(SystemExit):
        mod.parse_args(["--data-root", str(data), "--blocks", "sr,nope"])
    with pytest.raises(SystemExit):
        mod.parse_args(["--data-root", str(tmp_path / "missing")])
    with pytest.raises(SystemExit):
        mod.parse_args(["--data-root", str(data), "SOLVER.MAX_ITER"])
