"""The three ways a foreign file reaches a model: ``tools/convert_checkpoint.py``,
``MODEL.WEIGHTS`` (the trainer's checkpointer) and ``MODEL.DISTILL.TEACHER.WEIGHTS``; each
gives mmsegmentation's own logits (a DeepLabV3 on ResNetV1c-18, random weights)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from mmseg_oracle import TINY_DEEPLABV3, TINY_DEEPLABV3_YAML, build_mmseg, mmseg_logits
from segdistill import add_segdistill_config
from segdistill.convert import SegDistillCheckpointer

MM_CFG = TINY_DEEPLABV3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("convert_paths")
    mm = build_mmseg(MM_CFG)
    ckpt = d / "deeplabv3_r18-d8_512x1024_80k_cityscapes_20201225_021506-23dffbe2.pth"
    torch.save({"meta": {"CLASSES": ("a", "b", "c", "d", "e")}, "state_dict": mm.state_dict()}, ckpt)
    config = d / "teacher.yaml"
    config.write_text(TINY_DEEPLABV3_YAML.format(repo=REPO, weights_format="auto"))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    return {"mm": mm, "ckpt": str(ckpt), "config": str(config), "x": x, "expected": mmseg_logits(mm, x)}


def _cfg(config, **keys):
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(config)
    for k, v in keys.items():
        cfg.merge_from_list([k, v])
    return cfg


def _logits(segmentor, x):
    segmentor.eval()
    with torch.no_grad():
        return segmentor.sem_seg_head(segmentor.backbone(x))[0]


def test_convert_checkpoint_tool(files, tmp_path):
    out = tmp_path / "teacher_converted.pth"
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "projects"))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "--config-file", files["config"],
         files["ckpt"], str(out)], capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "(mmseg): " in proc.stdout and " tensors mapped" in proc.stdout and out.exists()
    assert "backbone.stem.0.weight -> backbone.body.conv1.0.weight" in proc.stdout  # what was mapped
    model = build_model(_cfg(files["config"], **{"MODEL.WEIGHTS": str(out)}))
    SegDistillCheckpointer(model).load(str(out))  # the project's own format now
    assert (_logits(model, files["x"]) - files["expected"]).abs().max() < 1e-4
    # a file that does not fit (another class count): the reason names the tensor and both shapes
    from segdistill.convert import CheckpointMismatchError, load_model_weights

    model = build_model(_cfg(files["config"], **{"MODEL.SEM_SEG_HEAD.NUM_CLASSES": "7"}))
    with pytest.raises(CheckpointMismatchError, match=r"another shape.*sem_seg_head\.predictor\.weight: \(5, 16, 1, 1\) vs \(7"):
        load_model_weights(model, files["ckpt"])


def test_model_weights_converts_foreign_files(files):
    cfg = _cfg(files["config"], **{"MODEL.WEIGHTS": files["ckpt"]})
    model = build_model(cfg)
    SegDistillCheckpointer(model, weights_format=cfg.MODEL.WEIGHTS_FORMAT).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    assert (_logits(model, files["x"]) - files["expected"]).abs().max() < 1e-4
    # naming the wrong format is an error, not a silent partial load
    model = build_model(cfg)
    with pytest.raises(ValueError, match="does not fit"):
        SegDistillCheckpointer(model, weights_format="cirkd").load(files["ckpt"])


def test_teacher_weights_convert_foreign_files(files):
    from segdistill.modeling.meta_arch.distill import build_teacher

    teacher = build_teacher(files["config"], files["ckpt"])
    assert (_logits(teacher, files["x"]) - files["expected"]).abs().max() < 1e-4
