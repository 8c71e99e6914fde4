"""Prediction pictures: tiles in the dataset's colours and a legend of exactly the classes (and
the ignore value) that appear, for one model or several side by side; tools/visualize_predictions.py
writes them."""
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from conftest import REPO, tiny_cfg
from segdistill.utils.visualize import IGNORE_COLOR, prediction_grid, prediction_panel

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
NAMES = ["red thing", "green thing", "blue thing", "yellow thing", "cyan thing"]
H, W = 8, 10


def legend_colors(pic, rows=1, scale=1):
    legend = pic[rows * (14 + H * scale):]
    return {tuple(c) for c in legend.reshape(-1, 3).tolist()}, legend


def test_panel_tiles_and_legend():
    img = np.full((H, W, 3), 128, np.uint8)
    gt = np.zeros((H, W), np.int64)
    gt[:, 5:] = 2
    gt[0, 0] = 255
    pred = np.full((H, W), 2, np.int64)
    pred[:2] = 3
    pic = prediction_panel(img, gt, pred, COLORS, 255, class_names=NAMES)
    assert pic.shape[1] == 3 * W  # image | ground truth | prediction
    tiles = pic[14:14 + H]
    assert (tiles[:, W:2 * W][gt == 2] == COLORS[2]).all() and (tiles[0, W] == IGNORE_COLOR).all()
    assert (tiles[:, 2 * W:][pred == 3] == COLORS[3]).all()
    colors, legend = legend_colors(pic)
    assert {COLORS[0], COLORS[2], COLORS[3], IGNORE_COLOR} <= colors  # in gt or prediction, and ignore
    assert COLORS[1] not in colors and COLORS[4] not in colors  # absent classes get no swatch
    # without ignore pixels there is no black swatch
    gt[0, 0] = 0
    colors, _ = legend_colors(prediction_panel(img, gt, pred, COLORS, 255, class_names=NAMES))
    assert IGNORE_COLOR not in colors


def test_several_models_and_a_grid_share_one_legend():
    img = np.zeros((H, W, 3), np.uint8)
    gt = np.zeros((H, W), np.int64)
    a, b = np.full((H, W), 1, np.int64), np.full((H, W), 4, np.int64)
    pic = prediction_panel(img, gt, {"baseline": a, "method": b}, COLORS, class_names=NAMES, scale=2)
    assert pic.shape[1] == 4 * 2 * W
    colors, _ = legend_colors(pic, scale=2)
    assert {COLORS[0], COLORS[1], COLORS[4]} <= colors and COLORS[2] not in colors
    grid = prediction_grid([(img, gt, {"m": a}), (img, gt, {"m": np.full((H, W), 2, np.int64)})], COLORS,
                           class_names=NAMES)
    assert grid.shape[1] == 3 * W
    colors, _ = legend_colors(grid, rows=2)
    assert {COLORS[0], COLORS[1], COLORS[2]} <= colors and COLORS[3] not in colors


def test_many_classes_wrap_onto_several_legend_lines():
    names = [f"class number {i}" for i in range(40)]
    colors = [(i * 6, 255 - i * 6, (i * 37) % 256) for i in range(40)]
    label = np.arange(H * W).reshape(H, W) % 40
    pic = prediction_panel(np.zeros((H, W, 3), np.uint8), label, label, colors, class_names=names, scale=4)
    found, legend = legend_colors(pic, scale=4)
    assert all(tuple(c) in found for c in colors)
    assert legend.shape[0] > 3 * 16  # several lines at this width


def test_visualize_predictions_tool(tmp_path):
    cfg = tiny_cfg(num_classes=10)
    cfg.DATASETS.TEST = ("segdistill_demo_mini_val",)
    cfg_path, weights = tmp_path / "cfg.yaml", tmp_path / "model.pth"
    cfg_path.write_text(cfg.dump())
    torch.manual_seed(0)
    from detectron2.modeling import build_model

    torch.save({"model": build_model(cfg).state_dict()}, weights)
    out = tmp_path / "pics"
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), PYTHONPATH=os.path.join(REPO, "projects"))
    res = subprocess.run([sys.executable, os.path.join(REPO, "tools", "visualize_predictions.py"), "--config-file",
                          str(cfg_path), "--weights", str(weights), "--output", str(out), "--max-images", "2",
                          "--overview", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert files == ["overview.png", "val_00000.png", "val_00001.png"]
    pic = np.asarray(Image.open(out / "val_00000.png").convert("RGB"))
    from segdistill.data.datasets.demo import DEMO_COLORS

    gt = np.asarray(Image.open(tmp_path / "datasets" / "segdistill_demo_mini" / "labels" / "val" / "val_00000.png"))
    assert pic.shape[1] == 3 * gt.shape[1]
    legend = pic[14 + gt.shape[0]:]
    found = {tuple(c) for c in legend.reshape(-1, 3).tolist()}
    assert all(tuple(DEMO_COLORS[c]) in found for c in np.unique(gt) if c < len(DEMO_COLORS))
