"""`make demo` end to end at toy size (tools/demo.py on the mini demo set, a few iterations per
training): the three trainings, the side-by-side table and metrics of the baseline and the
method, both training curves, pictures with a legend, and resuming without retraining."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from segdistill.data.datasets.demo import DEMO_CLASSES, DEMO_COLORS
from segdistill.evaluation import metrics_from_confusion

pytestmark = pytest.mark.slow

SCALE = 2  # tools/demo.py enlarges the tiles twice
CAPTION = 14


def run_demo(out, datasets):
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets), PYTHONPATH=os.path.join(REPO, "projects"))
    cmd = [sys.executable, os.path.join(REPO, "tools", "demo.py"), "--output", str(out),
           "--dataset", "segdistill_demo_mini", "--max-iter", "2", "--pictures", "3"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out, datasets = root / "out", root / "datasets"
    return out, datasets, run_demo(out, datasets)


def test_both_models_metrics_and_the_table(demo):
    out, datasets, stdout = demo
    summary = json.load(open(out / "summary.json"))
    assert summary["baseline"] == "student" and summary["method"] == "cwd"
    for step in ("teacher", "student", "cwd"):
        saved = json.load(open(out / step / "inference" / "segdistill_demo_mini_val" / "confusion_sem_seg.json"))
        want = metrics_from_confusion(np.asarray(saved["matrix"]), saved["classes"])
        assert summary["metrics"][step]["mIoU"] == pytest.approx(want["mIoU"])  # from that run's own evaluation
        assert 0 <= want["mIoU"] <= 100
    m = summary["metrics"]
    assert summary["gain_mIoU"] == pytest.approx(m["cwd"]["mIoU"] - m["student"]["mIoU"])
    assert summary["teacher_better"] == (m["teacher"]["mIoU"] > m["student"]["mIoU"])

    table = open(out / "comparison.md").read()
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert "\n".join(lines) in stdout  # printed as written
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["val (%)", "teacher (DeepLabV3-R18)", "student alone", "student + CWD",
                      "student + CWD - student alone"]
    rows = {c[0]: c[1:] for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines[2:])}
    assert set(DEMO_CLASSES) <= set(rows)
    assert rows["**mIoU**"] == [f"{m['teacher']['mIoU']:.1f}", f"{m['student']['mIoU']:.1f}",
                                f"{m['cwd']['mIoU']:.1f}", f"{m['cwd']['mIoU'] - m['student']['mIoU']:+.1f}"]
    iou = m["cwd"]["IoU-road"]
    assert rows["road"][2] == ("" if iou != iou else f"{iou:.1f}")
    assert "val mIoU: student alone" in stdout and "check: the teacher" in stdout


def test_training_curves_of_both(demo):
    out, _, _ = demo
    for step in ("student", "cwd"):
        assert any("sem_seg/mIoU" in json.loads(line) for line in open(out / step / "metrics.json"))
    img = Image.open(out / "training_curves.png")
    assert img.size[0] > 600 and img.size[1] > 200


def test_pictures_have_both_predictions_and_a_legend(demo):
    out, datasets, _ = demo
    pics = sorted(p for p in os.listdir(out / "pictures") if p != "overview.png")
    assert len(pics) == 3 and os.path.isfile(out / "pictures" / "overview.png")
    label_dir = datasets / "segdistill_demo_mini" / "labels" / "val"
    for name in pics:
        pic = np.asarray(Image.open(out / "pictures" / name).convert("RGB"))
        gt = np.asarray(Image.open(next(label_dir.glob(os.path.splitext(name)[0] + ".*"))))
        h, w = gt.shape
        assert pic.shape[1] == 4 * w * SCALE  # image | ground truth | student alone | student + CWD
        legend = pic[CAPTION + h * SCALE:]
        assert legend.shape[0] > 10, "no legend below the tiles"
        colors = {tuple(c) for c in legend.reshape(-1, 3).tolist()}
        for c in np.unique(gt):
            if c < len(DEMO_COLORS):  # every class of the ground truth has its swatch
                assert tuple(DEMO_COLORS[c]) in colors, (name, DEMO_CLASSES[c])
        # the ground-truth tile is the ground truth in the dataset's colours
        tile = pic[CAPTION:CAPTION + h * SCALE:SCALE, w * SCALE:2 * w * SCALE:SCALE]
        known = gt < len(DEMO_COLORS)
        assert (tile[known] == np.asarray(DEMO_COLORS)[gt[known]]).all()


def test_rerun_resumes_without_training(demo):
    out, datasets, _ = demo
    stamps = {s: os.path.getmtime(out / s / "model_final.pth") for s in ("teacher", "student", "cwd")}
    stdout = run_demo(out, datasets)
    assert stdout.count("done earlier") == 3
    assert {s: os.path.getmtime(out / s / "model_final.pth") for s in stamps} == stamps
