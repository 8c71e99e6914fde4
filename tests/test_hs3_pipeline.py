"""tools/hs3_pipeline.py end to end on the mini demo dataset, then a second run that redoes nothing."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

TINY = [
    "DATASETS.TRAIN", '("segdistill_demo_mini_train",)', "DATASETS.TEST", '("segdistill_demo_mini_val",)',
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "100",
    "INPUT.CROP.SIZE", "(64,64)", "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "32", "MODEL.EXITS.CHANNELS", "16",
    "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0", "HS3_ANALYSIS.K_GRID", "2-10:2",
]


def pipeline(out_dir):
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "projects") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "tools/hs3_pipeline.py", "--config-file", "configs/demo/hs3/hs3_r18.yaml",
                           "--output", out_dir, *TINY], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return [line for line in out.splitlines() if line.startswith("[hs3]")], out


@pytest.mark.slow
def test_pipeline_runs_all_phases_then_resumes_without_redoing(tmp_path):
    out_dir = str(tmp_path / "hs3")
    steps, out = pipeline(out_dir)
    runs = [s for s in steps if s.startswith("[hs3] run:")]
    assert len(runs) == 3  # phase-1 training, phase-1 test evaluation, phase-2 training
    assert "MODEL.EXITS.MODE ds" in runs[0] and "segdistill_demo_mini_train_hs3_reduced" in runs[0]
    assert "--eval-only" in runs[1] and f"MODEL.EXITS.HS3.CLUSTERS_FILE {out_dir}/hs3/clusters.json" in runs[2]
    outputs = {
        "phase1": os.path.join(out_dir, "phase1", "model_final.pth"),
        "confusion": os.path.join(out_dir, "phase1", "inference", "segdistill_demo_mini_train_hs3_analysis",
                                  "confusion_sem_seg_res3.npy"),
        "clusters": os.path.join(out_dir, "hs3", "clusters.json"),
        "phase2": os.path.join(out_dir, "phase2", "model_final.pth"),
    }
    mtimes = {k: os.path.getmtime(p) for k, p in outputs.items()}
    for f in ("tradeoff.png", "report.md"):
        assert os.path.isfile(os.path.join(out_dir, "hs3", f))
    clusters = json.load(open(outputs["clusters"]))
    assert list(clusters["exits"]) == ["res3", "res4"]
    # phase 2's per-exit metrics are in each exit's cluster space
    for e in ("res3", "res4"):
        saved = json.load(open(os.path.join(out_dir, "phase2", "inference", "segdistill_demo_mini_val",
                                            f"confusion_sem_seg_{e}.json")))
        assert saved["classes"] == clusters["exits"][e]["cluster_names"]
    summary = json.load(open(os.path.join(out_dir, "summary.json")))
    assert [r["output"] for r in summary["rows"]] == ["final", "exit res3", "exit res4"]
    assert [r["hs3_classes"] for r in summary["rows"]] == [10] + [clusters["exits"][e]["num_clusters"] for e in ("res3", "res4")]
    assert "ds (phase 1)" in out and "hs3 (phase 2)" in out

    # second run: every step skipped, nothing rewritten, the table printed again
    steps, out = pipeline(out_dir)
    assert not [s for s in steps if s.startswith("[hs3] run:")], steps
    assert sum("skip" in s for s in steps) == 6, steps
    assert {k: os.path.getmtime(p) for k, p in outputs.items()} == mtimes
    assert "hs3 (phase 2)" in out

    # a lost clusters file is redone from the saved confusion files; the trainings stay skipped
    os.remove(outputs["clusters"])
    steps, _ = pipeline(out_dir)
    assert not [s for s in steps if s.startswith("[hs3] run:")] and any("3/5 analysis" in s for s in steps)
    assert os.path.isfile(outputs["clusters"])
