"""The CamVid table's protocols: the equal-compute block end to end on a tiny fixture (a method
with a costlier step gets fewer iterations at the block's budget), the weight-tuning protocol
(the pick is the grid point with the best held-out mIoU; the tuned row trains with it; it
resumes), and the named regimes of the confound runs."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_camvid_table import TINY, load_script, table_on_tiny_camvid  # noqa: E402


@pytest.fixture
def table(tmp_path, monkeypatch):
    return table_on_tiny_camvid(tmp_path, monkeypatch, n_train=6)


def test_pick_weight_takes_the_best_held_out_grid_point():
    mod = load_script("camvid_table")
    assert mod.pick_weight({0.1: [30.0, 31.0], 0.3: [33.0, 32.5], 1.0: [32.0, 33.0], 3.0: [20.0, 21.0]}) == 0.3
    assert mod.pick_weight({0.1: [30.0], 1.0: [30.0], 3.0: [30.0]}) == 1.0  # a tie: the authors' default
    with pytest.raises(ValueError):
        mod.pick_weight({0.1: [30.0], 1.0: []})


def test_tuning_protocol_picks_on_the_analysis_split_and_the_tuned_row_uses_it(table):
    mod, data, tmp = table
    out = tmp / "t"
    argv = ["--data-root", str(data), "--output", str(out), "--pretrained", "none", "--seeds", "2",
            "--blocks", "tuned", "--methods", "student,ifvd@tuned"] + TINY
    t = mod.Table(mod.parse_args(argv))
    jobs = {j.key: j for j in t.jobs()}
    grid = [k for k in jobs if k.startswith("tune/ifvd/")]
    assert len(grid) == 8 and "tune/teacher" in jobs  # 4 factors x 2 seeds, and a teacher that never saw the split
    j = jobs["tune/ifvd/x0.3/seed1"]
    cmd = " ".join(j.cmd)
    assert "camvid_train_hs3_reduced" in cmd and "camvid_train_hs3_analysis" in cmd and "camvid_val" not in cmd
    assert "MODEL.DISTILL.IFVD.WEIGHT 60.0" in cmd  # 0.3 x the authors' 200
    assert str(out / "tune" / "teacher" / "seed0" / "model_final.pth") in cmd
    assert "camvid_train_hs3_analysis" not in " ".join(jobs["tune/teacher"].cmd).split("DATASETS.TRAIN")[1].split()[0]
    row = jobs["ifvd@tuned/seed0"]
    assert "pick:ifvd" in row.needs and not t.ready(row)  # waits for the pick
    # fake held-out results: x3 is best
    scores = {0.1: [30.0, 30.5], 0.3: [31.0, 31.5], 1.0: [32.0, 31.0], 3.0: [33.0, 32.5]}
    for f, vals in scores.items():
        for seed, v in enumerate(vals):
            d = out / "tune" / "ifvd" / f"x{f:g}" / f"seed{seed}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "result.json").write_text(json.dumps({"mIoU": v}))
    for teacher in (out / "tune" / "teacher" / "seed0", out / "runs" / "teacher" / "seed0"):
        teacher.mkdir(parents=True, exist_ok=True)
        (teacher / "result.json").write_text("{}")
    assert t.ready(row)
    pick = json.loads((out / "tune" / "ifvd" / "pick.json").read_text())
    assert pick["factor"] == 3.0 and pick["weights"] == {"MODEL.DISTILL.IFVD.WEIGHT": 600.0}
    cmd = " ".join(row.prepare())
    assert "MODEL.DISTILL.IFVD.WEIGHT 600.0" in cmd and "<tuned>" not in cmd
    assert "hs3_reduced" not in cmd and str(out / "runs" / "teacher" / "seed0" / "model_final.pth") in cmd  # on val
    # the table reports the pick beside the grid's held-out scores
    text = mod.main(argv[: -len(TINY)] + ["--table-only"] + TINY)
    assert "**x3: 32.8**" in text and "x1: 31.5" in text and "MODEL.DISTILL.IFVD.WEIGHT 600" in text
    assert json.loads((out / "summary.json").read_text())["tuning"]["ifvd"]["factor"] == 3.0
    # resumed: the grid is done, nothing of it runs again
    assert not [j for j in mod.Table(mod.parse_args(argv)).jobs() if j.key.startswith("tune/")]


def test_equal_compute_block_end_to_end(table):
    mod, data, tmp = table
    out = tmp / "ec"
    argv = ["--data-root", str(data), "--output", str(out), "--pretrained", "none", "--seeds", "1",
            "--blocks", "equal_compute", "--methods", "student,teacher,pd@ec", "--budget-steps", "8"] + TINY
    text = mod.main(argv)
    budget = json.loads((out / "budget.json").read_text())
    pd = json.loads((out / "runs" / "pd@ec" / "seed0" / "budget.json").read_text())
    assert budget["unit"] == "flops" and budget["steps"] == 8.0
    assert pd["budget"] == 8 * budget["flops"]["student"] and pd["step_flops"]["total"] == budget["flops"]["pd"]
    # PD's step runs the teacher too: costlier than the student's, so fewer iterations than 8
    assert pd["step_flops"]["teacher"] > 0 and pd["step_flops"]["total"] > budget["flops"]["student"]
    assert 1 <= pd["iterations"] == int(pd["budget"] // pd["step_flops"]["total"]) < 8
    assert json.loads((out / "runs" / "pd@ec" / "seed0" / "result.json").read_text())["seed"] == 0
    assert "PD (equal compute)" in text and "equal compute" in text
    # the same command resumes with the same budget and trains nothing
    before = os.path.getmtime(out / "runs" / "pd@ec" / "seed0" / "result.json")
    mod.main(argv)
    assert os.path.getmtime(out / "runs" / "pd@ec" / "seed0" / "result.json") == before


def test_equal_cpu_time_budget_gives_the_iterations_of_the_reference_time(table, monkeypatch):
    mod, data, tmp = table
    argv = ["--data-root", str(data), "--output", str(tmp / "cpu"), "--pretrained", "none", "--seeds", "1",
            "--blocks", "equal_compute", "--methods", "student,teacher,pd@ec,skd@ec", "--budget-steps", "300",
            "--budget-unit", "cpu"] + TINY
    t = mod.Table(mod.parse_args(argv))
    # fake measures: PD's step takes 1.6x the student's CPU time, SKD's 2.5x; FLOPs as counted
    fake = {"student": (0.44, 100), "pd": (0.704, 330), "skd": (1.1, 870)}
    monkeypatch.setattr(mod.step_cost, "measure", lambda names, opts, rounds, warmup: {
        n: {"cpu_s": fake[n][0], "flops": {"total": fake[n][1]}} for n in names})
    b = {n: t.budget(n) for n in fake}
    assert [int(b[n] // fake[n][1]) for n in fake] == [300, 187, 120]  # 300 x 0.44 / t
    assert json.loads((tmp / "cpu" / "budget.json").read_text())["cpu_s"]["pd"] == 0.704
    cmd = " ".join(next(j for j in t.jobs() if j.key == "skd@ec/seed0").cmd)
    assert f"SOLVER.BUDGET {b['skd']!r}" in cmd


def test_regimes_name_their_rows_overrides_and_output(table):
    mod, data, tmp = table
    a = mod.parse_args(["--data-root", str(data), "--regime", "schedule_4x"])
    assert a.output == "output/camvid_table_schedule_4x" and a.methods == ["baseline", "ds", "sr"]
    assert a.opts[:2] == ["SOLVER.MAX_ITER", "1200"] and a.blocks == ["sr"]
    b = mod.parse_args(["--data-root", str(data), "--regime", "demo_pretraining", "--seeds", "5"])
    assert b.pretrained_map == {"resnet18": "resnet18_demo"} and b.output.endswith("demo_pretraining")
    c = mod.parse_args(["--data-root", str(data), "--regime", "heldout_exits", "--seeds", "3"])
    assert "camvid_train_hs3_reduced" in " ".join(c.opts) and c.seeds == 3
    assert c.output == "output/camvid_table_heldout_exits"
    c.output = str(tmp / "heldout")  # not the repository's output folder, where runs may have finished
    jobs = mod.Table(c).jobs()
    assert all("camvid_train_hs3_reduced" in " ".join(j.cmd) for j in jobs if j.method is not None)
    # the per-pixel anytime variants train beside DS and SR, each with its own switch and nothing else
    assert c.methods == ["baseline", "ds", "sr", "ds_rh", "ds_pixel"] and c.blocks == ["anytime_exits"]
    cmds = {j.key: " ".join(j.cmd) for j in jobs if j.method is not None}
    assert "MODEL.EXITS.HEAD rh" in cmds["ds_rh/seed2"] and "MODEL.EXITS.HEAD" not in cmds["ds/seed2"]
    assert "MODEL.EXITS.PIXEL.TRAIN_THRESHOLD 0.998" in cmds["ds_pixel/seed0"]
    assert "TRAIN_THRESHOLD" not in cmds["ds_rh/seed0"] and len(cmds) == 5 * 3


def test_step_cost_counts_and_times_in_one_run(tmp_path):
    cost = load_script("step_cost")
    out = tmp_path / "cost.json"
    cost.main(["--methods", "student", "pd", "--rounds", "1", "--warmup", "0", "--json", str(out),
               "SOLVER.IMS_PER_BATCH", "2", "INPUT.CROP.SIZE", "(32, 32)"])
    r = json.loads(out.read_text())["methods"]
    # PD's step is the student's plus the teacher's forward (and PD's own small term)
    assert r["pd"]["flops"]["teacher"] > 0 and "teacher" not in r["student"]["flops"]
    assert r["pd"]["flops"]["total"] > r["student"]["flops"]["total"] + r["pd"]["flops"]["teacher"] * 0.99
    assert r["student"]["cpu_s"] > 0 and len(r["pd"]["cpu"]) == 1
    with pytest.raises(SystemExit):
        cost.main(["--methods", "nope"])


def test_the_heldout_curves_plain_model_is_the_tables_baseline(tmp_path):
    """docs/results.md's held-out anytime command passes configs/camvid/table/baseline.yaml as the
    plain model: it must build as an AnytimeSegmentor without exits and take the baseline's weights."""
    import torch
    from detectron2.modeling import build_model

    from segdistill.config import load_yaml_config
    from segdistill.engine.anytime import anytime_cfg
    from segdistill.modeling.meta_arch.anytime import load_anytime_weights

    opts = ["MODEL.TIMM.CHECKPOINT", "", "MODEL.DEVICE", "cpu"]
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs/camvid/table/baseline.yaml")
    cfg = anytime_cfg(config, opts)
    assert cfg.MODEL.EXITS.MODE == "none"
    anytime = build_model(cfg)
    plain = build_model(load_yaml_config(config, opts))
    torch.save({"model": plain.state_dict()}, tmp_path / "plain.pth")
    load_anytime_weights(anytime, str(tmp_path / "plain.pth"), weights_format=cfg.MODEL.WEIGHTS_FORMAT)
    key = next(k for k in plain.state_dict() if k.endswith("weight"))
    assert torch.equal(anytime.state_dict()[key], plain.state_dict()[key])


def _fake_run(out, method, seed, miou):
    d = out / "runs" / method / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "result.json").write_text(json.dumps({"method": method, "seed": seed, "mIoU": miou, "exits": {},
                                               "metrics": {"sem_seg/mIoU": miou}}))


def test_merge_summary_completes_the_rows_only_where_the_runs_reproduce(table):
    """Rows run here are completed by a published summary's seeds, and every run both have must
    agree (a pre-training too): otherwise the merge is refused, naming each disagreement."""
    mod, data, tmp = table
    published = tmp / "pub" / "summary.json"
    published.parent.mkdir()
    pub = {"seeds": [0, 1, 2], "blocks": {}, "premises": [], "verdict": [], "phase1": {}, "tuning": {},
           "pretraining": {"mobilenetv2_camvid": {"held_out": {"sem_seg/mIoU": 35.27}}},
           "results": {"student": [{"seed": s, "mIoU": v} for s, v in enumerate([30.0, 31.0, 32.0])],
                       "pd": [{"seed": s, "mIoU": v} for s, v in enumerate([31.0, 32.5, 33.0])],
                       "teacher": [{"seed": 0, "mIoU": 40.0}]}}
    published.write_text(json.dumps(pub))
    out = tmp / "m"
    argv = ["--data-root", str(data), "--output", str(out), "--pretrained", "none", "--seeds", "3",
            "--blocks", "bf16_student,bf16_pd", "--merge-summary", str(published), "--table-only"]
    for s, v in enumerate([30.0, 31.0, 32.0]):  # student seeds made again here: they reproduce
        _fake_run(out, "student", s, v)
    for s, v in enumerate([30.5, 31.0, 33.0]):
        _fake_run(out, "student@bf16", s, v)
    for s, v in enumerate([31.5, 32.5, 33.5]):
        _fake_run(out, "pd@bf16", s, v)
    t = mod.Table(mod.parse_args(argv))
    res = t.collect()
    assert [r["mIoU"] for r in res["pd"]] == [31.0, 32.5, 33.0]  # from the summary
    assert [r["mIoU"] for r in res["student@bf16"]] == [30.5, 31.0, 33.0]  # made here
    assert res["teacher"][0]["mIoU"] == 40.0
    text = mod.main(argv)
    # each bf16 row against its own float32 row, paired by seed: +0.5 and +0.33 on average
    assert "| student (MBV2) alone in bf16 | 31.5 ± 1.3 | 3 | +0.5 [" in text
    assert "| PD in bf16 | 32.5 ± 1.0 | 3 | +0.3 [" in text
    # a run made here that the summary has with another value: refused, naming it
    _fake_run(out, "pd", 1, 32.0)
    with pytest.raises(SystemExit, match="pd seed 1: 32.000 here, 32.500 published"):
        mod.Table(mod.parse_args(argv)).collect()
    _fake_run(out, "pd", 1, 32.5)
    # a pre-training made here with other held-out scores: refused
    assert mod.merge_pretraining({"x": {"held_out": {"sem_seg/mIoU": 1.0}}}, {"x": {"held_out": {"sem_seg/mIoU": 1.0}}})
    with pytest.raises(SystemExit, match="pre-training 'mobilenetv2_camvid'"):
        mod.merge_pretraining({"mobilenetv2_camvid": {"held_out": {"sem_seg/mIoU": 35.2}}}, pub["pretraining"])
    with pytest.raises(SystemExit):
        mod.parse_args(argv + ["--from-summary", str(published)])


def test_bf16_rows_train_with_autocast_against_their_float32_rows(table):
    mod, data, tmp = table
    t = mod.Table(mod.parse_args(["--data-root", str(data), "--output", str(tmp / "b"), "--pretrained", "none",
                                  "--seeds", "1", "--blocks", "bf16_student,bf16_pd"] + TINY))
    jobs = {j.key: j for j in t.jobs()}
    assert set(jobs) == {"teacher/seed0", "student/seed0", "student@bf16/seed0", "pd/seed0", "pd@bf16/seed0"}
    assert "SOLVER.AMP.ENABLED True" in " ".join(jobs["pd@bf16/seed0"].cmd)
    assert "SOLVER.AMP.ENABLED" not in " ".join(jobs["pd/seed0"].cmd) + " ".join(jobs["teacher/seed0"].cmd)
    assert mod.METHODS["pd@bf16"].baseline == "pd"


def test_step_cost_default_methods_all_build_their_configs(tmp_path):
    """Every method step_cost.py times by default has a config it can build (no variant with a
    placeholder value, such as the equal-compute rows' budget, reaches the config)."""
    cost = load_script("step_cost")
    names = cost.default_methods()
    assert "student" in names and "maskd" in names and not [n for n in names if "@" in n]
    for n in names:
        assert cost.method_config(n, clusters_dir=str(tmp_path)).MODEL.DEVICE == "cpu"


def test_equal_cpu_time_budget_from_a_quiet_step_cost_file(table, monkeypatch):
    """--budget-cpu-from: the block's CPU times come from a step_cost.py file (measured on a quiet
    machine), not from a measurement beside the trainings; a file of the wrong kind is refused."""
    mod, data, tmp = table
    doc = {"reference": "student", "threads": 1, "rounds": 5, "opts": [], "methods": {
        n: {"cpu_s": t, "flops": {"total": f}} for n, (t, f) in
        {"student": (0.32, 100), "pd": (0.48, 330), "skd": (1.1, 870)}.items()}}
    path = tmp / "step_cost.json"
    path.write_text(json.dumps(doc))
    monkeypatch.setattr(mod.step_cost, "measure", lambda *a: pytest.fail("measured beside the trainings"))
    argv = ["--data-root", str(data), "--output", str(tmp / "q"), "--pretrained", "none", "--seeds", "1",
            "--blocks", "equal_compute", "--methods", "student,teacher,pd@ec,skd@ec", "--budget-steps", "300",
            "--budget-unit", "cpu", "--budget-cpu-from", str(path)]
    t = mod.Table(mod.parse_args(argv))
    b = {n: t.budget(n) for n in ("student", "pd", "skd")}
    assert [int(b[n] // f) for n, f in (("student", 100), ("pd", 330), ("skd", 870))] == [300, 200, 87]
    assert json.loads((tmp / "q" / "budget.json").read_text())["source"] == str(path)
    doc["threads"] = 2
    path.write_text(json.dumps(doc))
    with pytest.raises(SystemExit, match="1 thread"):
        mod.Table(mod.parse_args([str(tmp / "r") if a == str(tmp / "q") else a for a in argv])).budget("pd")
