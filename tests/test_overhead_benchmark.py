"""benchmarks/overhead.py end to end on a tiny setting (every method, batch 2, 32x32, one
warm-up and two timed rounds): every method and baseline reported, the deployed models of
the methods that drop their training-only parts equal to the baseline exactly (parameters
and FLOPs), HS3-Fuse larger, finite positive ratios, the distillation rows against CWD and
their loss-alone times, the targets, markdown and JSON written; ``--classes`` and KEY VALUE
overrides reach every model; and clear errors for bad method names. The rounds' order is
shuffled per round from a seed, references are medians of repeated rows (their spread: the
noise floor), ``--precisions`` adds bf16 / channels_last columns, ``--threads`` is 1 by default."""
import importlib.util
import json
import math
import os
import sys

import pytest

from conftest import REPO


def _load():
    spec = importlib.util.spec_from_file_location("overhead_benchmark", os.path.join(REPO, "benchmarks", "overhead.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


overhead = _load()
METHODS = ["ds", "mea", "mea_srl", "mea_srf", "sr", "hs3", "hs3_fuse",
           "pd", "cwd", "hwd", "fakd_cwd", "fakd_pd", "hwd_fakd_pd",
           "skd", "ifvd", "cirkd", "mgd", "dist", "fitnet", "at", "afdcd",
           "diffkd", "maskd"]
WITH_PARTS = {"skd", "ifvd", "cirkd", "mgd", "fitnet", "afdcd",
              "diffkd"}  # distillation rows with trainable loss parts


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("overhead")
    md, js = out / "overhead.md", out / "overhead.json"
    result = overhead.main(["--threads", "1", "--batch", "2", "--size", "32x32", "--warmup", "1", "--rounds", "2", "--reference-repeats", "1",
                            "--methods", "all", "--markdown", str(md), "--output-json", str(js)])
    return result, md, js


def test_every_method_against_its_baseline(run):
    result, _, _ = run
    assert overhead.CHOICES == METHODS
    train, infer = result["training"], result["inference"]
    assert list(train) == ["baseline", "student"] + METHODS
    assert list(infer) == ["plain", "student"] + METHODS
    for n in METHODS:
        assert train[n]["baseline"] == ("student" if n in METHODS[7:] else "baseline")
        assert infer[n]["baseline"] == ("student" if n in METHODS[7:] else "plain")
    for block in (train, infer):
        for n, v in block.items():
            for k in ("time_ratio", "wall_ratio") + (("memory_ratio",) if block is train else ()):
                assert v[k] > 0 and math.isfinite(v[k]), (n, k, v[k])
            assert v["wall_s"] > 0 and v["cpu_s"] > 0
    assert train["baseline"]["time_ratio"] == 1.0 and infer["plain"]["time_ratio"] == 1.0
    assert result["settings"]["timing"] == "cpu" and result["settings"]["memory"] == "saved_for_backward"


def test_deployed_models_cost_exactly_the_baseline(run):
    result, _, _ = run
    train, infer = result["training"], result["inference"]
    plain, student = infer["plain"], infer["student"]
    # the multi-exit baseline deploys to the plain DeepLabV3-R18, with the same cost
    assert (train["baseline"]["params_inference"], train["baseline"]["flops_inference"]) == \
        (plain["params"], plain["flops"])
    for n in METHODS:
        if n == "hs3_fuse":
            continue
        base = student if n in METHODS[7:] else plain
        assert infer[n]["params"] == base["params"] and infer[n]["flops"] == base["flops"], n
        assert infer[n]["params_equal"] and infer[n]["flops_equal"] and infer[n]["expected_equal"]
        assert train[n]["params_inference"] == base["params"]
    for n in ("ds", "sr", "hs3", "hs3_fuse"):  # exits cost parameters and FLOPs at training only
        assert train[n]["params"] > train["baseline"]["params"] and train[n]["flops"] > train["baseline"]["flops"]
    for n in METHODS[7:]:  # the frozen teacher is counted at training
        assert train[n]["params"] > 2 * train["student"]["params"]
        # the losses' trainable parts are counted apart: trained with the student, never deployed
        parts = train[n]["loss_parts_params"]
        assert (parts > 0) == (n in WITH_PARTS), (n, parts)
        assert train[n]["trainable_params"] == train["student"]["trainable_params"] + parts
    fuse = infer["hs3_fuse"]  # HS3-Fuse keeps its fuse blocks at inference
    assert fuse["params"] > plain["params"] and fuse["flops"] > plain["flops"]
    assert not fuse["params_equal"] and not fuse["expected_equal"]


def test_distillation_rows_against_cwd_and_the_targets(run):
    result, md, _ = run
    train = result["training"]
    distill = METHODS[7:]
    assert train["cwd"]["cwd_ratio"] == 1.0 and train["cwd"]["cwd_memory_ratio"] == 1.0
    for n in distill + ["student"]:  # the student row too: how much the teacher adds over it
        assert train[n]["cwd_ratio"] > 0 and train[n]["cwd_memory_ratio"] > 0
    for n in ["baseline"] + METHODS[:7]:
        assert train[n]["cwd_ratio"] is None and train[n]["loss_alone_s"] is None
    for n in distill:  # the distillation terms alone, from fixed logits
        assert 0 < train[n]["loss_alone_s"] < train[n]["cpu_s"]
    assert train["student"]["loss_alone_s"] is None
    targets = result["targets"]
    assert {n: (v["reference"], v["limit"]) for n, v in targets.items()} == {
        "sr": ("baseline", 1.15), "hwd": ("cwd", 1.05), "fakd_cwd": ("cwd", 1.2), "fakd_pd": ("cwd", 1.2)}
    for n, v in targets.items():
        assert v["ratio"] == pytest.approx(train[n]["cpu_s"] / train[v["reference"]]["cpu_s"])
        assert v["pass"] == (v["ratio"] <= v["limit"])
    text = md.read_text()
    assert "x CWD" in text and "loss alone (ms)" in text and "(target <= 1.15)" in text and "(target <= 1.05)" in text


def test_classes_and_overrides_reach_every_model(run):
    result, _, _ = run
    small = overhead.main(["--threads", "1", "--batch", "2", "--size", "32x32", "--warmup", "0", "--rounds", "1",
                           "--methods", "hs3", "cwd", "--classes", "12", "MODEL.EXITS.CHANNELS", "8"])
    assert small["settings"]["classes"] == 12 and result["settings"]["classes"] == 10
    train, base = small["training"], result["training"]
    assert list(train) == ["baseline", "student", "hs3", "cwd"]
    # 12 classes: the classifiers (student's and teacher's) grow; 8-channel exits: HS3's training params shrink
    assert train["student"]["params"] > base["student"]["params"] and train["cwd"]["params"] > base["cwd"]["params"]
    exits = train["hs3"]["params"] - train["baseline"]["params"]
    assert 0 < exits < base["hs3"]["params"] - base["baseline"]["params"]
    with pytest.raises(SystemExit):
        overhead.main(["--methods", "sr", "--classes", "1"])


def test_tables_markdown_and_json(run):
    result, md, js = run
    text = md.read_text()
    assert "| method" in text and "| deployed" in text
    for n in METHODS + ["baseline", "student", "plain"]:
        assert f"| {n} " in text, n
    assert "saved for bwd" in text and "no (by design)" in text
    assert "equal the baseline's exactly for" in text and ": yes" in text
    data = json.loads(js.read_text())
    assert set(data["training"]) == set(result["training"]) and data["settings"]["size"] == [32, 32]


def test_bad_method_names_are_clear_errors(capsys):
    with pytest.raises(SystemExit) as e:
        overhead.main(["--methods", "sr", "srf", "--rounds", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Unknown method(s) 'srf'" in err and "hwd_fakd_pd" in err and "hs3_fuse" in err
    with pytest.raises(ValueError, match=r"Unknown method\(s\) 'baseline'.*choose from ds, mea"):
        overhead.resolve_methods(["baseline"])  # a baseline is not a method: it always runs
    assert overhead.resolve_methods(["CWD,sr", "ds"]) == ["ds", "sr", "cwd"]
    assert overhead.resolve_methods(["all"]) == METHODS
    with pytest.raises(SystemExit):
        overhead.main(["--size", "12xfoo"])


def test_rounds_shuffle_the_order_afresh_each_round_from_a_seed():
    entries = list(range(8))
    orders = [overhead.shuffled(entries, r, 0) for r in range(6)]
    assert all(sorted(o) == entries for o in orders) and len({tuple(o) for o in orders}) == 6
    assert orders == [overhead.shuffled(entries, r, 0) for r in range(6)]  # seeded: the same run again
    assert orders != [overhead.shuffled(entries, r, 1) for r in range(6)]
    # a rotation keeps every neighbour; shuffled rounds do not
    pairs = [{(o[i], o[i + 1]) for i in range(len(o) - 1)} for o in orders]
    assert not set.intersection(*pairs)


def test_a_repeated_reference_is_the_median_of_its_repeats_and_its_spread_the_noise_floor():
    E = overhead.Entry
    rec = {E("a", "fp32", 0): [(1.0, 1.0), (3.0, 3.0)], E("a", "fp32", 1): [(2.0, 2.0)], E("a", "fp32", 2): [(10.0, 10.0)],
           E("a", "bf16", 0): [(1.0, 0.5)], E("b", "fp32", 0): [(4.0, 4.0)]}
    assert overhead.robust(rec, "a", "fp32", 1) == (2.0, 4.0)
    assert overhead.robust(rec, "b", "fp32", 1) == (4.0, None)
    assert overhead.precision_times(rec, "a", "bf16", cuda=False) == {"time_s": 0.5, "speedup": 4.0}


def test_precisions_noise_floor_and_one_thread_by_default(tmp_path):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        md = tmp_path / "p.md"
        res = overhead.main(["--batch", "2", "--size", "32x32", "--warmup", "0", "--rounds", "1", "--methods", "cwd",
                             "--precisions", "bf16", "channels_last", "teacher_bf16_channels_last",
                             "--reference-repeats", "2", "--markdown",
                             str(md)])
    finally:
        torch.set_num_threads(threads)
    assert "1 thread(s)" in res["settings"]["where"]
    precisions = ["fp32", "bf16", "channels_last", "teacher_bf16_channels_last"]
    assert res["settings"]["precisions"] == precisions
    for block in ("training", "inference"):
        for n, v in res[block].items():
            assert set(v["precision"]) == set(precisions) and v["precision"]["fp32"]["speedup"] == 1
            fp32 = v["precision"]["fp32"]["time_s"]
            # each speed-up is the fp32 time over that precision's, of the same row in the same run
            assert all(x["time_s"] > 0 and x["speedup"] == pytest.approx(fp32 / x["time_s"])
                       for x in v["precision"].values()), n
    assert set(res["noise"]["training"]) == {"student", "cwd"} and set(res["noise"]["inference"]) == {"student"}
    lo, hi = res["noise"]["inference_equal_rows"]
    assert lo == res["inference"]["cwd"]["time_ratio"] == hi
    text = md.read_text()
    assert "Noise floor (CPU time)" in text and "bf16 train |" in text and "channels_last infer |" in text
    with pytest.raises(SystemExit):
        overhead.main(["--methods", "cwd", "--precisions", "fp16"])  # fp16: CUDA only


def test_hs3_gmacs_toy_size():
    """benchmarks/hs3_gmacs.py on the demo HS3 config at 32x32: HS3 costs exactly the baseline
    at inference, HS3-Fuse more, its lighter variant in between (synthetic clusters written
    with the package's writer)."""
    spec = importlib.util.spec_from_file_location("hs3_gmacs", os.path.join(REPO, "benchmarks", "hs3_gmacs.py"))
    gmacs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gmacs)
    rows = gmacs.main(["--size", "32", "32", "MODEL.EXITS.CHANNELS", "16"])
    assert list(rows) == ["baseline", "HS3", "HS3-Fuse", "HS3-Fuse (lighter)"]
    assert rows["HS3"] == rows["baseline"]
    (base, p0), (fuse, p1), (light, p2) = rows["baseline"], rows["HS3-Fuse"], rows["HS3-Fuse (lighter)"]
    assert base < light < fuse and p0 < p2 < p1


def test_teacher_bf16_column_runs_the_teacher_alone_in_bf16():
    """--precisions teacher_bf16_channels_last: the Distiller's teacher forward in bf16, its
    student in float32 with channels_last weights (a forward hook sees the dtypes)."""
    import torch

    from segdistill.modeling.meta_arch.distill import Distiller

    settings = overhead.Settings(device="cpu")
    model = overhead.teacher_bf16_variant("cwd", settings)
    assert isinstance(model, Distiller) and model.teacher_precision == "bf16"
    seen = {}

    def hook(name):
        def record(mod, args, out):
            seen.setdefault(name, out.dtype)
        return record

    t_conv = next(mm for mm in model.teacher.modules() if isinstance(mm, torch.nn.Conv2d))
    s_conv = next(mm for mm in model.student.modules() if isinstance(mm, torch.nn.Conv2d))
    t_conv.register_forward_hook(hook("teacher"))
    s_conv.register_forward_hook(hook("student"))
    assert s_conv.weight.is_contiguous(memory_format=torch.channels_last)
    model(overhead.make_batch(2, (32, 32), 10))
    assert seen == {"teacher": torch.bfloat16, "student": torch.float32}
