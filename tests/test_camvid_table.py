"""The evidence chain end to end on a tiny CamVid-layout fixture (a few 48x64 images, 2 iterations
per training): benchmarks/pretrain.py (pre-training, export, resume), benchmarks/camvid_table.py
(every kind of run started from the pre-trained backbones: plain, multi-exit, HS3 with its
Phase 1, teacher, distiller), the premise check, the paired confidence intervals and the verdict
against a direct computation, and bad arguments."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
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
TINY_STR = " ".join(f"'{t}'" for t in TINY)


def table_on_tiny_camvid(tmp_path, monkeypatch, n_train=10):
    """(benchmarks/camvid_table.py, the data folder, tmp_path), with a tiny CamVid written into
    tmp_path and the environment pointing at it (and at a cache folder of its own)."""
    table = load_script("camvid_table")
    data = tmp_path / "camvid"
    write_camvid(data, n_train=n_train, n_val=2)
    monkeypatch.setenv("SEGDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SEGDISTILL_CAMVID_ROOT", str(data))
    return table, data, tmp_path


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    table, data, _ = table_on_tiny_camvid(tmp_path, monkeypatch)
    # one method of each kind, so that the test stays short: plain, multi-exit HS3 (+ Phase 1, DS),
    # teacher, and a distiller with two terms
    monkeypatch.setattr(table, "BLOCKS", {
        "sr": ("Self-Regulation", ["baseline"]),
        "hs3": ("HS3", ["baseline", "hs3"]),
        "distill": ("Distillation", ["student", "teacher", "hwd_fakd_pd"]),
    })
    return table, data, tmp_path


def run_pretrain(*argv):
    """benchmarks/pretrain.py in a subprocess, as camvid_table.py runs it."""
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "projects"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "pretrain.py")] + list(argv), cwd=REPO,
                          env=env, capture_output=True, text=True)


def test_chain_pretrain_table_verdict(tiny):
    table, data, tmp = tiny
    out, pre = tmp / "table", tmp / "pre"
    argv = ["--data-root", str(data), "--output", str(out), "--pretrain-output", str(pre), "--seeds", "1",
            "--jobs", "2", "--pretrain-opts", TINY_STR] + TINY
    text = table.main(argv)

    # 1. the pre-trainings ran first: each exported file is its run's trained backbone body,
    # every tensor, loadable by MODEL.TIMM.CHECKPOINT; trained on the reduced split, scored on
    # the analysis split, never on val
    path = str(pre / "resnet18_camvid.pth")
    body = torch.load(path, weights_only=True)
    final = torch.load(pre / "runs" / "resnet18_camvid" / "model_final.pth", weights_only=True)["model"]
    assert all(torch.equal(v, final["backbone.body." + k]) for k, v in body.items())
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone
    from segdistill.config import add_segdistill_config

    bcfg = get_cfg()
    add_segdistill_config(bcfg)
    bcfg.merge_from_file(os.path.join(table.ROOT, "configs", "camvid", "table", "baseline.yaml"))
    bcfg.MODEL.TIMM.CHECKPOINT = path
    own = build_backbone(bcfg).body.state_dict()
    assert set(own) == set(body) and all(torch.equal(own[k], body[k]) for k in own)
    info = json.loads((pre / "resnet18_camvid.json").read_text())
    assert info["backbone"] == "resnet18" and 0 <= info["held_out"]["sem_seg/mIoU"] <= 100
    cfg = (pre / "runs" / "resnet18_camvid" / "config.yaml").read_text()
    assert "camvid_train_hs3_reduced" in cfg and "camvid_train_hs3_analysis" in cfg and "camvid_val" not in cfg
    assert (pre / "mobilenetv2_camvid.pth").is_file()

    # 2. every run started from them with fresh heads and exits
    for name in ("baseline", "hs3", "student", "teacher", "hwd_fakd_pd"):
        r = json.loads((out / "runs" / name / "seed0" / "result.json").read_text())
        assert 0.0 <= r["mIoU"] <= 100.0 and r["method"] == name and r["seed"] == 0
        cfg = (out / "runs" / name / "seed0" / "config.yaml").read_text()
        want = "mobilenetv2_camvid.pth" if name in ("student", "hwd_fakd_pd") else "resnet18_camvid.pth"
        assert f"CHECKPOINT: {pre / want}" in cfg, name
        assert "WEIGHTS: ''" in cfg  # nothing else loaded: heads and exits start fresh
    hwd = (out / "runs" / "hwd_fakd_pd" / "seed0" / "config.yaml").read_text()
    assert str(out / "runs" / "teacher" / "seed0" / "model_final.pth") in hwd and "- MODEL.TIMM.CHECKPOINT" in hwd
    hs3 = json.loads((out / "runs" / "hs3" / "seed0" / "result.json").read_text())
    assert sorted(hs3["exits"]) == ["res2", "res3", "res4"]
    # HS3 Phase 1 ran once (from the pre-trained backbone too), both analyses are written, and
    # the HS3 run trained with the trade-off rule's clusters
    clusters = out / "hs3_clusters" / "hs3" / "clusters.json"
    assert clusters.is_file() and (out / "hs3_clusters" / "hs3_manual" / "clusters.json").is_file()
    assert str(pre / "resnet18_camvid.pth") in (out / "hs3_clusters" / "phase1" / "config.yaml").read_text()
    assert str(clusters) in (out / "runs" / "hs3" / "seed0" / "config.yaml").read_text()
    files = os.listdir(out / "runs" / "baseline" / "seed0")
    assert "model_final.pth" in files and not [f for f in files if f.startswith("model_0")]

    # 3. the table: premises with their margins, rows, the verdict (withheld or given)
    assert (out / "table.png").stat().st_size > 0
    assert (out / "table.md").read_text().strip() == text.strip()
    assert "final above every DS exit (Phase-1 DS model, analysis split): final " in text
    assert "teacher clearly above the student" in text and "margin" in text
    # the paper's rule in numbers: each exit's K and its mIoU in that K-cluster space, from the clusters file
    chosen = json.loads(clusters.read_text())["exits"]
    for e, info in chosen.items():
        assert f"- {e}: K = {info['num_clusters']}, mIoU {info['analysis_mIoU']:.1f} in its" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"]["hs3"][0]["mIoU"] == pytest.approx(hs3["mIoU"], abs=1e-3)
    assert summary["pretraining"]["resnet18_camvid"]["backbone"] == "resnet18"
    if all(c["ok"] for c in summary["premises"] if c["gate"]):
        assert "| claim |" in text
    else:
        assert "Reading withheld" in text and "| claim |" not in text

    # 4. resume: a second invocation finds everything done and trains nothing; a lost result is
    # run again, and only it; a lost export is redone from its finished pre-training, no step trained
    before = {p: os.path.getmtime(p) for p in (out / "runs").glob("*/seed0/result.json")}
    table.main(argv)
    assert before == {p: os.path.getmtime(p) for p in (out / "runs").glob("*/seed0/result.json")}
    os.remove(out / "runs" / "baseline" / "seed0" / "result.json")
    assert [j.key for j in table.Table(table.parse_args(argv)).jobs()] == ["baseline/seed0"]
    os.remove(path)
    metrics = pre / "runs" / "resnet18_camvid" / "metrics.json"
    steps = metrics.read_text().count("total_loss")
    r = run_pretrain("--output", str(pre), "--data-root", str(data), "resnet18_camvid", *TINY)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert torch.equal(torch.load(path, weights_only=True)["conv1.weight"], body["conv1.weight"])
    assert metrics.read_text().count("total_loss") == steps
    pretrain = load_script("pretrain")
    with pytest.raises(SystemExit):
        pretrain.main(["--output", str(pre), "nope"])
    with pytest.raises(ValueError, match="whole mobilenetv2_100 body"):  # another backbone's checkpoint
        pretrain.export_backbone(str(pre / "runs" / "resnet18_camvid" / "model_final.pth"), str(tmp / "x.pth"),
                                 "mobilenetv2_100")


def fake_run(out, method, seed, miou, exits=None, ious=None):
    d = out / "runs" / method / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    metrics = {f"sem_seg/IoU-{c}": v for c, v in (ious or {}).items()}
    (d / "result.json").write_text(json.dumps({"method": method, "seed": seed, "mIoU": miou, "exits": exits or {},
                                               **({"metrics": metrics} if ious else {})}))


def fake_phase1(out, final, exits):
    d = out / "hs3_clusters" / "phase1"
    d.mkdir(parents=True, exist_ok=True)
    m = {"sem_seg/mIoU": final, **{f"sem_seg_{e}/mIoU": v for e, v in exits.items()}}
    (d / "metrics.json").write_text(json.dumps(m) + "\n")


def test_premises_gate_the_verdict_and_cis_match_a_direct_t_interval(tiny):
    table, data, tmp = tiny
    out = tmp / "t"
    monkey_blocks = {"sr": ("SR", ["baseline", "ds", "mea", "mea_srl", "sr"]),
                     "distill": ("KD", ["student", "teacher", "cwd"])}
    table.BLOCKS.clear()
    table.BLOCKS.update(monkey_blocks)
    base = [40.0, 41.0, 39.5, 40.5, 40.2]
    srv = [41.5, 41.9, 41.1, 42.3, 41.0]  # clearly above: reproduced
    dsv = [40.1, 40.8, 39.9, 40.4, 40.6]  # tiny effect: inconclusive or excluded
    for s in range(5):
        fake_run(out, "baseline", s, base[s])
        fake_run(out, "ds", s, dsv[s], {"res2": 30.0, "res3": 35.0, "res4": 38.0})
        fake_run(out, "sr", s, srv[s], {"res2": 30.0, "res3": 35.0, "res4": 38.0})
        fake_run(out, "mea", s, base[s] + [0.1, -0.1, 0.05, 0.0, -0.05][s])  # tight around 0
        fake_run(out, "mea_srl", s, base[s] + [1.0, -1.0, 0.5, -0.5, 0.3][s])  # wide
        fake_run(out, "student", s, 30.0 + 0.1 * s)
        fake_run(out, "cwd", s, 29.0 + 0.1 * s)  # below the student in every seed
    fake_run(out, "teacher", 0, 45.0)
    fake_phase1(out, 42.0, {"res2": 30.0, "res3": 36.0, "res4": 41.0})
    for s in range(5):  # per-class IoU on the student's runs: where the variance lives
        fake_run(out, "student", s, 30.0 + 0.1 * s, ious={"tree": [20.0, 70.0, 40.0, 50.0, 60.0][s], "sky": 80.0 + s,
                                                          "pole": 0.5, "mystery": 3.0})
    argv = ["--output", str(out), "--table-only", "--seeds", "5", "--data-root", str(data), "--blocks", "sr,distill"]
    text = table.main(argv)
    assert "| student (MBV2) alone | 5 | 82.0 | 0.5 | 48.0 | 3.0 |" in text  # CamVid's order, then the others
    assert "Below 1 IoU in every run: pole (1 of 4 classes)." in text
    assert "Largest seed-to-seed range within one row: tree in student (MBV2) alone (20.0 to 70.0 IoU)" in text
    assert json.loads((out / "summary.json").read_text())["results"]["student"][1]["IoU"]["tree"] == 70.0
    assert "holds: final above every DS exit (Phase-1 DS model, analysis split)" in text
    assert "res4 +1.0" in text and "DS 40.4 (n=5; margins res2 +10.36" in text  # inside DS: its mean 40.36 vs res2 30
    assert "holds: teacher clearly above" in text and "| claim |" in text

    # the paired CI, against a direct computation: t(0.975, 4) = 2.776
    d = np.array(srv) - np.array(base)
    half = 2.7764451 * d.std(ddof=1) / math.sqrt(5)
    verdict = {(v["a"], v["b"]): v for v in json.loads((out / "summary.json").read_text())["verdict"]}
    v = verdict[("sr", "baseline")]
    assert v["mean"] == pytest.approx(d.mean()) and v["lo"] == pytest.approx(d.mean() - half, abs=1e-5)
    assert v["verdict"] == "reproduced" and v["raw_verdict"] == "reproduced" and v["n"] == 5
    assert f"{d.mean():+.1f} [{d.mean() - half:+.1f}, {d.mean() + half:+.1f}] (n=5)" in text
    assert verdict[("cwd", "student")]["verdict"] == "not reproduced (below 0 after Holm)"
    # a tight interval around 0 excludes the paper's +0.4: not reproduced; a wide one: inconclusive
    assert verdict[("mea", "baseline")]["raw_verdict"] == "not reproduced (the CI excludes the paper's gain)"
    assert verdict[("mea", "baseline")]["verdict"] == "not reproduced (below the paper's gain after Holm)"
    assert verdict[("mea_srl", "mea")]["verdict"] == "inconclusive"

    # a premise fails: the table is written with the margins, the reading is withheld
    fake_phase1(out, 40.0, {"res2": 30.0, "res3": 36.0, "res4": 41.0})
    text = table.main(argv)
    assert "FAILS: final above every DS exit" in text and "res4 -1.0" in text
    assert "Reading withheld" in text and "| claim |" not in text
    fake_phase1(out, 42.0, {"res2": 30.0, "res3": 36.0, "res4": 41.0})
    fake_run(out, "teacher", 0, 31.0)  # above the student by less than the margin
    text = table.main(argv)
    assert "FAILS: teacher clearly above" in text and "Reading withheld" in text


def test_paired_intervals(tiny):
    table, _, _ = tiny
    rows = lambda vals: [{"seed": i, "mIoU": v} for i, v in enumerate(vals)]  # noqa: E731
    assert table.paired(rows([1, 2]), rows([1]))["n"] == 1
    d = table.paired(rows([0, 0, 0]), rows([1.0, 2.0, 3.0]))
    assert d["mean"] == pytest.approx(2.0) and d["lo"] == pytest.approx(2.0 - 4.302653 / math.sqrt(3), abs=1e-5)
    # only seeds both rows finished are paired
    assert table.paired(rows([0, 0, 0, 0]), [{"seed": 3, "mIoU": 1.0}, {"seed": 7, "mIoU": 5.0}])["n"] == 1


def test_dry_run_and_bad_arguments(tiny, capsys):
    table, data, tmp = tiny
    out = tmp / "dry"
    table.main(["--data-root", str(data), "--output", str(out), "--pretrain-output", str(tmp / "p"), "--seeds", "2",
                "--dry-run"])
    said = capsys.readouterr().out
    # 2 pre-trainings, Phase 1, 2 seeds of each of 4 methods and one teacher
    assert "12 jobs to run" in said and said.count("would run") == 12
    assert not (out / "runs").exists()
    for bad in (["--blocks", "sr,nope"], ["--methods", "nope"], ["--pretrained", "resnet18=nope"], ["SOLVER.MAX_ITER"]):
        with pytest.raises(SystemExit):
            table.parse_args(["--data-root", str(data)] + bad)
    with pytest.raises(SystemExit):
        table.parse_args(["--data-root", str(tmp / "missing")])
    # from scratch: no pre-training jobs, and the rows say so
    table.main(["--data-root", str(data), "--output", str(out), "--seeds", "1", "--pretrained", "none", "--dry-run",
                "--methods", "baseline"])
    said = capsys.readouterr().out
    assert "1 jobs to run" in said and "pretrain" not in said
