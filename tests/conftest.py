"""Shared test helpers: tiny configs, a temporary labelled dataset, repository paths."""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import sys
import tempfile

import numpy as np
import pytest
import torch

# One thread per process: tests start train_net.py subprocesses and 2-process gloo runs on a
# 2-core machine, where several OpenMP thread pools oversubscribe the cores (steps ran ~50x
# slower). Subprocesses inherit the variable.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The suite never downloads: a weights URL or timm tag not in a cache fails at once (before
# huggingface_hub is imported, which reads HF_HUB_OFFLINE then); subprocesses inherit both.
# Tests that serve files on a loopback server unset SEGDISTILL_OFFLINE themselves.
os.environ["SEGDISTILL_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
# Every test process (the single one, or each pytest-xdist worker) has caches of its own, empty
# when it starts and removed when it ends: the dataset-check markers and class weights
# ($SEGDISTILL_CACHE_DIR), downloaded weights ($SEGDISTILL_CACHE), torch.hub's and the Hugging Face
# Hub's folders. No test then reads what another worker, an earlier run or the user's own runs left
# in ~/.cache, and none writes there. Set before anything imports huggingface_hub (it reads HF_HOME
# then); subprocesses inherit them. What a test must control itself (an empty cache, a server's
# files) it still sets with monkeypatch or its subprocess's environment.
_CACHES = tempfile.mkdtemp(prefix=f"segdistill-tests-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")
atexit.register(shutil.rmtree, _CACHES, ignore_errors=True)
for _var, _sub in (("SEGDISTILL_CACHE_DIR", "segdistill"), ("SEGDISTILL_CACHE", "weights"), ("TORCH_HOME", "torch"),
                   ("HF_HOME", "huggingface")):
    os.environ[_var] = os.path.join(_CACHES, _sub)
os.environ.pop("HF_HUB_CACHE", None)  # would override HF_HOME's hub folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "projects"))  # also works without `pip install -e .`

import segdistill  # noqa: E402,F401
from detectron2.config import get_cfg  # noqa: E402
from segdistill import add_segdistill_config  # noqa: E402


def load_script(name, path, *, register=False):
    """A repository script (``train_net.py``, ``tools/*.py``, ``datasets/*.py``, ``benchmarks/*.py``)
    imported as a module from its path. ``register``: also put it in ``sys.modules`` under
    ``name`` (worker processes unpickle its functions by module name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    mod = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# Tiny runs of the demo configs on the mini demo set (train_net.py overrides): YAML (without its
# schedule: TINY adds 3 iterations) and lazy.
YAML_TINY = [
    "DATASETS.TRAIN", '("segdistill_demo_mini_train",)', "DATASETS.TEST", '("segdistill_demo_mini_val",)',
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "INPUT.CROP.SIZE", "(64,64)",
    "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "32", "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
]
TINY = YAML_TINY + ["SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "100"]
LAZY_TINY = [
    "dataloader.train.dataset.names=segdistill_demo_mini_train", "dataloader.test.dataset.names=segdistill_demo_mini_val",
    "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
    "model.sem_seg_head.aspp_channels=32", "dataloader.train.mapper.augmentations.1.crop_size=[64,64]",
    "train.eval_period=0",
]


def tiny_cfg(backbone="resnet18", head="SegDeepLabV3Head", output_stride=8, num_classes=5, **overrides):
    """A CPU config for a backbone x head pair at tiny sizes."""
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs/demo/Base-Demo.yaml"))
    hrnet = backbone.startswith("hrnet")
    cfg.MODEL.TIMM.NAME = backbone
    cfg.MODEL.TIMM.OUTPUT_STRIDE = 32 if hrnet else output_stride
    cfg.MODEL.SEM_SEG_HEAD.NAME = head
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    cfg.MODEL.SEM_SEG_HEAD.ASPP_CHANNELS = 32
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    cfg.MODEL.SEM_SEG_HEAD.AUX_CHANNELS = 16
    if head == "SegDeepLabV3PlusHead":
        feats = ["res2", "res5"]
        cfg.MODEL.SEM_SEG_HEAD.PROJECT_FEATURES = ["res2"]
        cfg.MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS = [16]
    else:
        feats = ["res5"]
    cfg.MODEL.TIMM.OUT_FEATURES = feats
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = feats
    # A fresh folder of this process's own, never the default ./output (the repository's, which
    # tests running in parallel would share); a test that reads what was written there sets its own.
    cfg.OUTPUT_DIR = tempfile.mkdtemp(prefix="output-", dir=_CACHES)
    return set_keys(cfg, **overrides)


def no_imagenet_start(cfg):
    """A real-data config (YAML CfgNode or lazy config) with its ImageNet start switched off, in
    place, the documented offline override: ``MODEL.TIMM.PRETRAINED "" MODEL.TIMM.CHECKPOINT ""``
    (a Distiller's teacher too), lazy ``model.backbone.pretrained="" model.backbone.checkpoint=""``."""
    from segdistill.engine import skip_backbone_init

    if "MODEL" in cfg:
        frozen = cfg.is_frozen()
        cfg.defrost()
        cfg.MODEL.TIMM.PRETRAINED = ""
        cfg.MODEL.TIMM.CHECKPOINT = ""
        cfg.MODEL.DISTILL.TEACHER.OPTS = list(cfg.MODEL.DISTILL.TEACHER.OPTS) + [
            "MODEL.TIMM.PRETRAINED", "", "MODEL.TIMM.CHECKPOINT", ""]
        if frozen:
            cfg.freeze()
    else:
        skip_backbone_init(cfg.model)  # a Distiller's teacher config: see its opts
    return cfg


def make_backbone(model_name="resnet18", **overrides):
    """A TimmBackbone (HRNetBackbone for hrnet*) with the config defaults (MODEL.TIMM.*) and
    constructor-argument ``overrides`` (its arguments are all required keyword-only)."""
    from detectron2.layers import ShapeSpec
    from segdistill.modeling.backbones import HRNetBackbone, TimmBackbone

    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.MODEL.TIMM.NAME = model_name
    cls = HRNetBackbone if model_name.startswith("hrnet") else TimmBackbone
    if cls is HRNetBackbone:
        cfg.MODEL.TIMM.OUTPUT_STRIDE = 32
    kwargs = cls.from_config(cfg, ShapeSpec(channels=3))
    kwargs.update(overrides)
    return cls(**kwargs)


def set_keys(cfg, **overrides):
    """Set dotted config keys given as keyword names: ``set_keys(cfg, **{"MODEL.EXITS.MODE": "sr"})``."""
    for k, v in overrides.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = getattr(node, p)
        setattr(node, last, v)
    return cfg


def trained_model(cfg, num_classes, steps=1):
    """A model after a few SGD steps on random 64x64 batches (BN statistics and weights off
    their init), returned in eval mode."""
    import torch
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for i in range(steps):
        losses = model(random_batch(2, 64, 64, num_classes, seed=i))
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    return model.eval()


def distill_run_opts(out_dir):
    """train_net.py overrides of a tiny distillation run with a random teacher, no evaluation."""
    return YAML_TINY + ["SOLVER.CHECKPOINT_PERIOD", "100", "MODEL.DISTILL.TEACHER.WEIGHTS", "",
                        "MODEL.DISTILL.TEACHER.ALLOW_RANDOM", "True", "MODEL.DISTILL.EVAL_TEACHER", "False",
                        "DATASETS.TEST", "()", "OUTPUT_DIR", out_dir]


def assert_deploys_as_the_plain_student(cfg, model):
    """A Distiller's deployed state dict has exactly the plain student's keys and shapes (no
    loss part: those stay in training checkpoints)."""
    from detectron2.modeling import build_model

    plain_cfg = cfg.clone()
    plain_cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    plain = build_model(plain_cfg).state_dict()
    deployed = model.deploy_state_dict()
    assert set(deployed) == set(plain) and all(deployed[k].shape == plain[k].shape for k in plain)
    assert not any(k.startswith("distill_losses") for k in deployed)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_batch(n, h, w, num_classes, seed=0, with_labels=True):
    import torch

    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n):
        d = {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8), "height": h, "width": w}
        if with_labels:
            label = torch.randint(0, num_classes, (h, w), generator=g)
            label[:2] = 255
            d["sem_seg"] = label
        batch.append(d)
    return batch


@pytest.fixture
def write_label_dataset(tmp_path):
    """Write a folder dataset of random images/labels and register it under a fresh name."""
    from PIL import Image

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from segdistill.data.datasets import load_sem_seg_folder

    made = []

    def make(name, labels, num_classes, images=None):
        img_dir, lbl_dir = tmp_path / name / "img", tmp_path / name / "lbl"
        img_dir.mkdir(parents=True)
        lbl_dir.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i, label in enumerate(labels):
            h, w = label.shape
            img = images[i] if images is not None else rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(img).save(img_dir / f"{i:03d}.png")
            Image.fromarray(label.astype(np.uint8)).save(lbl_dir / f"{i:03d}.png")
        DatasetCatalog.register(
            name, lambda: load_sem_seg_folder(str(img_dir), str(lbl_dir), dataset_name=name, layout_help="")
        )
        MetadataCatalog.get(name).set(
            stuff_classes=[f"c{k}" for k in range(num_classes)], ignore_label=255, evaluator_type="sem_seg"
        )
        made.append(name)
        return name

    yield make
    for name in made:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def write_clusters(path, assignments, class_names=None, num_classes=None):
    """An HS3 clusters file ``{exit: assignment}`` written with the package's writer
    (class names ``c0..`` when not given)."""
    from segdistill.modeling.exits.hs3_clusters import clusters_from_dict, save_clusters

    n = num_classes or len(next(iter(assignments.values())))
    names = list(class_names) if class_names else [f"c{i}" for i in range(n)]
    data = {"class_names": names, "exits": {e: {"assignment": list(a)} for e, a in assignments.items()}}
    return save_clusters(str(path), clusters_from_dict(data))


def run_train_net(args, env=None, timeout=600):
    """``python train_net.py ARGS`` in the repository (the checkout's package first on the path);
    asserts it succeeded and returns its stdout + stderr."""
    import subprocess

    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.path.join(REPO, "projects") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "train_net.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"train_net.py {' '.join(args)} failed ({proc.returncode}):\n{out[-4000:]}"
    return out
