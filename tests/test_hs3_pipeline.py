"""tools/hs3_pipeline.py end to end on the mini demo dataset, then a second run that redoes
nothing, then --redo-analysis with other clusters (Phase 2 retrained, the summary names the
clusters file); a folder without a record is refused; K = N for every exit is a warning."""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from segdistill.hs3.report import k_equals_n_warning, run_hs3_analysis
from segdistill.modeling.exits.hs3_clusters import clusters_fingerprint, load_clusters

TINY = [
    "DATASETS.TRAIN", '("segdistill_demo_mini_train",)', "DATASETS.TEST", '("segdistill_demo_mini_val",)',
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "100",
    "INPUT.CROP.SIZE", "(64,64)", "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "32", "MODEL.EXITS.CHANNELS", "16",
    "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0", "HS3_ANALYSIS.K_GRID", "2-10:2",
]


def pipeline(out_dir, *extra, ok=True):
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "projects") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "tools/hs3_pipeline.py", "--config-file", "configs/demo/hs3/hs3_r18.yaml",
                           "--output", out_dir, *extra, *TINY], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, out[-4000:]
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

    # a lost clusters file is redone from the saved confusion files: the same clusters (the
    # file's date differs), so the trainings stay skipped
    sha = clusters_fingerprint(load_clusters(outputs["clusters"]))
    os.remove(outputs["clusters"])
    steps, _ = pipeline(out_dir)
    assert not [s for s in steps if s.startswith("[hs3] run:")] and any("3/5 analysis" in s for s in steps)
    assert clusters_fingerprint(load_clusters(outputs["clusters"])) == sha

    # --redo-analysis with other settings writes other clusters: Phase 2 is retrained with them
    # (its old folder kept), Phase 1 is not, and the summary names the clusters file it used
    steps, out = pipeline(out_dir, "--redo-analysis", "HS3_ANALYSIS.METHOD", "manual", "HS3_ANALYSIS.MANUAL_RATIO", "0.3")
    runs = [s for s in steps if s.startswith("[hs3] run:")]
    new = load_clusters(outputs["clusters"])
    assert clusters_fingerprint(new) != sha and new.num_clusters("res4") == 3
    assert len(runs) == 1 and "--resume" in runs[0] and f"OUTPUT_DIR {out_dir}/phase2" in runs[0], steps
    assert "MODEL.EXITS.MODE ds" not in runs[0]  # Phase 1 stays
    assert any("4/5 phase 2" in s and "inputs changed (clusters_sha256)" in s for s in steps), steps
    assert os.path.isfile(os.path.join(out_dir, "phase2.stale-1", "model_final.pth"))
    summary = open(os.path.join(out_dir, "summary.md")).read()
    assert outputs["clusters"] in summary and clusters_fingerprint(new)[:16] in summary
    data = json.load(open(os.path.join(out_dir, "summary.json")))
    assert data["clusters"] == outputs["clusters"] and data["clusters_sha256"] == clusters_fingerprint(new)
    assert [r["hs3_classes"] for r in data["rows"]] == [10, new.num_clusters("res3"), 3]
    state = json.load(open(os.path.join(out_dir, "pipeline_state.json")))
    assert state["phase2"]["inputs"]["clusters_sha256"] == clusters_fingerprint(new)


def test_pipeline_refuses_outputs_without_a_record(tmp_path):
    """A phase-1 checkpoint no record explains (an older pipeline's, or copied by hand) is not
    trusted silently: the pipeline stops before training anything and names the folder."""
    out_dir = tmp_path / "hs3"
    (out_dir / "phase1").mkdir(parents=True)
    (out_dir / "phase1" / "model_final.pth").write_bytes(b"not a checkpoint")
    steps, out = pipeline(str(out_dir), ok=False)
    assert not [s for s in steps if s.startswith("[hs3] run:")]
    assert f"{out_dir}/phase1 holds" in out and "no record of the inputs" in out and "--adopt-existing" in out


def test_k_equal_to_n_for_every_exit_is_a_warning(tmp_path, caplog):
    """When the trade-off rule keeps all N classes at every exit (exits as good as the final
    output), HS3 is deep supervision: the analysis log and report.md say so."""
    names = [f"c{i}" for i in range(6)]
    folder = tmp_path / "inference"
    folder.mkdir()
    for key in ("sem_seg", "sem_seg_res3", "sem_seg_res4"):
        conf = np.diag([100 + 10 * i for i in range(6)]).astype(np.int64)  # every exit perfect
        np.save(folder / f"confusion_{key}.npy", conf)
        (folder / f"confusion_{key}.json").write_text(json.dumps({"prediction": key, "classes": names,
                                                                  "matrix": conf.tolist()}))
    caplog.set_level(logging.WARNING)
    paths = run_hs3_analysis(str(folder), str(tmp_path / "hs3"), exits=["res3", "res4"])
    clusters = load_clusters(paths["clusters"])
    assert [clusters.num_clusters(e) for e in ("res3", "res4")] == [6, 6]
    warning = k_equals_n_warning(clusters)
    assert "every exit keeps all 6 classes" in warning and "deep supervision" in warning
    assert any(warning in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert warning in open(paths["report"]).read()
    # one exit with fewer clusters: no warning
    clusters.exits["res3"].num_clusters = 3
    assert k_equals_n_warning(clusters) == ""
