"""The papers' recipes (configs/reproduce/, docs/reproduce.md).

* Each teacher and student config builds exactly the model of the file it names: the
  full-width model of mmsegmentation's own config (built on the meta device, no memory)
  converts into it with no tensor left over or missing and the same parameter count; for
  CIRKD's (HWD) files the check is by names and shapes against tests/data/cirkd_manifest.json,
  written from CIRKD's public model definitions.
* Every recipe (YAML and lazy) builds and runs two iterations on 64x64 inputs on CPU, random
  weights standing in for the checkpoints: two training steps (then inference) for students
  and distillation, two inference batches for teachers (their recipe is ``--eval-only``);
  a lazy recipe builds the same model as its YAML twin.
* docs/reproduce.md names every recipe, and every config it names exists.
"""
from __future__ import annotations

import glob
import json
import os
import re

import pytest
import torch

from conftest import REPO, random_batch
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.modeling import build_model
from segdistill import add_segdistill_config
from segdistill.convert import convert_backbone_state, convert_model_state

RECIPES = os.path.join(REPO, "configs", "reproduce")
YAMLS = sorted(p for p in glob.glob(os.path.join(RECIPES, "**", "*.yaml"), recursive=True)
               if not os.path.basename(p).startswith("Base-"))
LAZY = sorted(glob.glob(os.path.join(RECIPES, "**", "*.py"), recursive=True))
NUM_CLASSES = 19


def _rel(p):
    return os.path.relpath(p, REPO)



def _cfg(path, device="cpu"):
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = device
    cfg.MODEL.NORM = "BN"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.TIMM.CHECKPOINT = ""  # no ImageNet file here: random weights
    if cfg.MODEL.META_ARCHITECTURE == "Distiller":
        cfg.MODEL.DISTILL.TEACHER.WEIGHTS = ""
        cfg.MODEL.DISTILL.TEACHER.ALLOW_RANDOM = True
    return cfg


# ---- the recipes build their sources' architectures ---------------------------------------------
MIM = None


def _mmseg_model(config: str):
    """mmsegmentation's model of one of its own configs, on the meta device (shapes only)."""
    from mmseg_oracle import import_mmseg

    models = import_mmseg()
    from mmengine.config import Config

    import mmseg

    path = os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs", config)
    if not os.path.isfile(path):
        pytest.skip(f"mmsegmentation's config {config} is not installed")
    model = Config.fromfile(path).model.to_dict()
    return _build_meta(models, model)


def _build_meta(models, model: dict):
    model.pop("data_preprocessor", None)
    model.pop("pretrained", None)

    def bn(d):
        if isinstance(d, dict):
            return {k: (dict(type="BN", requires_grad=True) if k == "norm_cfg" else bn(v)) for k, v in d.items()}
        if isinstance(d, list):
            return [bn(v) for v in d]
        return d

    with torch.device("meta"):
        return models.build(bn(model))


def _ours_meta(path):
    with torch.device("meta"):
        return build_model(_cfg(path, device="meta"))


def _isanet_r18():
    """mmsegmentation has no ISANet-R18: its R50 config with the widths of its R18 models."""
    from mmseg_oracle import import_mmseg

    models = import_mmseg()
    from mmengine.config import Config

    import mmseg

    path = os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs",
                        "isanet", "isanet_r50-d8_4xb2-80k_cityscapes-512x1024.py")
    model = Config.fromfile(path).model.to_dict()
    model["backbone"]["depth"] = 18
    model["decode_head"].update(in_channels=512, channels=128, isa_channels=64)
    model["auxiliary_head"].update(in_channels=256, channels=64)
    return _build_meta(models, model)


MMSEG_SOURCES = {
    "fakd/pspnet_r101_teacher.yaml": "pspnet/pspnet_r101-d8_4xb2-80k_cityscapes-512x1024.py",
    "fakd/fcn_hr48_teacher.yaml": "hrnet/fcn_hr48_4xb2-160k_cityscapes-512x1024.py",
    "fakd/deeplabv3plus_r101_teacher.yaml": "deeplabv3plus/deeplabv3plus_r101-d8_4xb2-80k_cityscapes-512x1024.py",
    "fakd/isanet_r101_teacher.yaml": "isanet/isanet_r101-d8_4xb2-80k_cityscapes-769x769.py",
    "fakd/pspnet_r18_student.yaml": "pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py",
    "fakd/fcn_hr18s_student.yaml": "hrnet/fcn_hr18s_4xb2-40k_cityscapes-512x1024.py",
    "fakd/deeplabv3plus_mv2_student.yaml": "mobilenet_v2/mobilenet-v2-d8_deeplabv3plus_4xb2-80k_cityscapes-512x1024.py",
    "fakd/isanet_r18_student.yaml": None,  # built by _isanet_r18
    "mmseg/deeplabv3_r101_teacher.yaml": "deeplabv3/deeplabv3_r101-d8_4xb2-80k_cityscapes-512x1024.py",
}


@pytest.mark.parametrize("recipe", sorted(MMSEG_SOURCES))
def test_fakd_recipe_is_the_mmseg_model(recipe):
    source = MMSEG_SOURCES[recipe]
    mm = _mmseg_model(source) if source else _isanet_r18()
    ours = _ours_meta(os.path.join(RECIPES, recipe))
    conv = convert_model_state(mm.state_dict(), ours, "mmseg", source=source or "isanet r18")
    assert conv is not None and not conv.unmatched and not conv.dropped
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in mm.parameters())


def _manifest():
    with open(os.path.join(REPO, "tests", "data", "cirkd_manifest.json")) as f:
        return json.load(f)["models"]


def _fake_state(shapes):
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.mark.parametrize("recipe,model", [
    ("hwd/deeplabv3_r101_teacher.yaml", "deeplabv3_resnet101_citys"),
    ("hwd/deeplabv3_r18_student.yaml", "deeplabv3_resnet18_citys"),
])
def test_hwd_recipe_fits_cirkd_manifest(recipe, model):
    """Names and shapes only: every tensor of CIRKD's model maps to one of ours and back."""
    shapes = _manifest()[model]
    ours = _ours_meta(os.path.join(RECIPES, recipe))
    conv = convert_model_state(_fake_state(shapes), ours, "cirkd", source=model)
    assert conv is not None and not conv.unmatched and not conv.dropped
    assert len(conv.mapped) == len(shapes)
    n_cirkd = sum(torch.Size(s).numel() for k, s in shapes.items()
                  if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert sum(p.numel() for p in ours.parameters()) == n_cirkd


@pytest.mark.parametrize("model", ["psp_resnet18_citys", "psp_resnet101_citys"])
def test_cirkd_pspnet_key_map(model):
    """CIRKD's PSPNet (pooling branches of in/4 channels, bottleneck 128 on R18 and 512 on R101)."""
    shapes = _manifest()[model]
    depth = 18 if "resnet18" in model else 101
    cfg = _cfg(os.path.join(RECIPES, "hwd", "deeplabv3_r18_student.yaml"), device="meta")
    cfg.MODEL.TIMM.NAME = f"resnet{depth}"
    c = cfg.MODEL.SEM_SEG_HEAD
    c.NAME, c.PSP_POOL_CHANNELS, c.CONVS_DIM = "PSPHead", 0, 128 if depth == 18 else 512
    c.AUX_CHANNELS = 64 if depth == 18 else 256
    with torch.device("meta"):
        ours = build_model(cfg)
    conv = convert_model_state(_fake_state(shapes), ours, "cirkd", source=model)
    assert not conv.unmatched and len(conv.mapped) == len(shapes)


@pytest.mark.parametrize("model,depth", [("resnet18-imagenet", 18), ("resnet101-imagenet", 101)])
def test_cirkd_imagenet_resnet_key_map(model, depth):
    from conftest import make_backbone

    shapes = dict(_manifest()[model], **{"fc.weight": [1000, 512 if depth == 18 else 2048], "fc.bias": [1000]})
    with torch.device("meta"):
        body = make_backbone(f"resnet{depth}", stem_type="deep", stem_width=64).body
    conv = convert_backbone_state(_fake_state(shapes), body, "auto", source=model)
    assert conv.source_format == "cirkd" and not conv.unmatched and [k for k, _ in conv.dropped] == ["fc.weight", "fc.bias"]


# ---- every recipe builds and trains ------------------------------------------------------------
_SIGNATURES = {}


def _signature(model):
    seg = model.student if type(model).__name__ == "Distiller" else model
    head = seg.sem_seg_head
    return {
        "modules": [type(m).__name__ for m in model.modules()],
        "params": {k: tuple(v.shape) for k, v in model.named_parameters()},
        "head": (head.common_stride, head.ignore_value, head.loss_weight, head.align_corners, head.output_resize,
                 head.layout,
                 None if head.aux_head is None else (head.aux_head.in_feature, head.aux_head.loss_weight)),
    }


def _is_teacher(path):
    return os.path.basename(path).split(".")[0].endswith("_teacher")


def _two_iterations(model, optimizer):
    """Two SGD steps on random 64x64 batches, then inference: what a student or distillation
    recipe does; returns the first step's losses."""
    model.train()
    first = None
    for i in range(2):
        losses = model(random_batch(2, 64, 64, NUM_CLASSES, seed=i))
        total = sum(losses.values())
        assert torch.isfinite(total), losses
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        first = first or {k: v.item() for k, v in losses.items()}
    assert "loss_sem_seg" in first
    _two_evaluations(model)
    return first


def _two_evaluations(model):
    """What a teacher recipe does (--eval-only): inference, here on two random batches."""
    model.eval()
    with torch.no_grad():
        for i in range(2):
            batch = random_batch(2, 64, 64, NUM_CLASSES, seed=i, with_labels=False)
            out = model([{**b, "height": 48, "width": 80} for b in batch])
            assert out[0]["sem_seg"].shape == (NUM_CLASSES, 48, 80) and torch.isfinite(out[0]["sem_seg"]).all()


@pytest.mark.parametrize("path", YAMLS, ids=_rel)
def test_yaml_recipe_runs_two_iterations(path):
    from segdistill.engine import Trainer

    cfg = _cfg(path)
    torch.manual_seed(0)
    model = build_model(cfg)
    _SIGNATURES[path] = _signature(model)
    if _is_teacher(path):
        _two_evaluations(model)
        return
    losses = _two_iterations(model, Trainer.build_optimizer(cfg, model))
    if cfg.MODEL.META_ARCHITECTURE == "Distiller":
        assert {f"loss_{n}" for n in cfg.MODEL.DISTILL.LOSSES} <= set(losses)


def _lazy_cfg(path):
    cfg = LazyConfig.load(path)
    cfg.train.device = "cpu"
    cfg.train.init_checkpoint = ""
    model = cfg.model
    if "teacher" in model:
        model.teacher.weights = ""
        model.teacher.allow_random = True
        model = model.student
    model.backbone.checkpoint = ""
    return cfg


@pytest.mark.parametrize("path", LAZY, ids=_rel)
def test_lazy_recipe_matches_yaml_and_runs(path):
    cfg = _lazy_cfg(path)
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    twin = path[:-3] + ".yaml"
    assert os.path.isfile(twin), f"{_rel(path)} has no YAML twin"
    if twin not in _SIGNATURES:
        _SIGNATURES[twin] = _signature(build_model(_cfg(twin)))
    assert _signature(model) == _SIGNATURES[twin], f"{_rel(path)} and {_rel(twin)} build different models"
    assert cfg.train.max_iter == 40000 and cfg.optimizer.lr == 0.01
    if _is_teacher(path):
        _two_evaluations(model)
        return
    cfg.optimizer.params.model = model
    _two_iterations(model, instantiate(cfg.optimizer))


def test_reproduce_doc_names_every_recipe_and_only_existing_files():
    with open(os.path.join(REPO, "docs", "reproduce.md")) as f:
        doc = f.read()
    for p in YAMLS:
        assert _rel(p) in doc, f"docs/reproduce.md does not mention {_rel(p)}"
    for ref in set(re.findall(r"configs/[\w/.-]+\.(?:yaml|py)", doc)):
        assert os.path.isfile(os.path.join(REPO, ref)), f"docs/reproduce.md names a missing config {ref}"
