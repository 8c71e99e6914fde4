"""The real CamVid, found where the package looks for it (``camvid_root()``:
``$SEGDISTILL_CAMVID_ROOT`` or ``$DETECTRON2_DATASETS/camvid``; never copied into the repo):
skipped when absent. On the project's machines: ``SEGDISTILL_CAMVID_ROOT=../shared/data/camvid``."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from detectron2.data import DatasetCatalog, MetadataCatalog
from segdistill.data import read_dataset_label
from segdistill.data.datasets import camvid as camvid_mod

CAMVID = os.path.abspath(camvid_mod.camvid_root())
pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(CAMVID, "trainannot")),
                                reason=f"CamVid not found at {CAMVID} (set {camvid_mod.ROOT_ENV})")


@pytest.fixture
def shared_camvid(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    camvid_mod.register_camvid(CAMVID, replace=True)
    yield CAMVID
    camvid_mod.register_camvid(camvid_mod.camvid_root(), replace=True)


def test_camvid_splits_load_through_the_catalog(shared_camvid):
    sizes = {"camvid_train": 367, "camvid_val": 101}
    for name, n in sizes.items():
        dicts = DatasetCatalog.get(name)  # layout + every label's size and values are checked here
        assert len(dicts) == n
        assert MetadataCatalog.get(name).stuff_classes == camvid_mod.CAMVID_CLASSES
        label = read_dataset_label(dicts[0])
        assert label.shape == (360, 480)
        assert set(np.unique(label).tolist()) <= set(range(11)) | {255}
    assert {d["file_name"] for d in DatasetCatalog.get("camvid_train")}.isdisjoint(
        d["file_name"] for d in DatasetCatalog.get("camvid_val"))


def _linked_subset(dst, counts):
    """A CamVid root of symbolic links to the first few real files of each split (nothing copied)."""
    for split, n in counts.items():
        for folder in (split, split + "annot"):
            os.makedirs(dst / folder)
            for f in sorted(os.listdir(os.path.join(CAMVID, folder)))[:n]:
                os.symlink(os.path.join(CAMVID, folder, f), dst / folder / f)
    return dst


@pytest.mark.slow
def test_train_net_on_camvid(tmp_path):
    """A few iterations of a tiny model through train_net.py, evaluated on 4 real val images."""
    out_dir = tmp_path / "run"
    root = _linked_subset(tmp_path / "camvid", {"train": 8, "val": 4})
    env = dict(os.environ, SEGDISTILL_CAMVID_ROOT=str(root), SEGDISTILL_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.path.join(REPO, "projects") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [
        "--config-file", "configs/camvid/deeplabv3_r18.yaml",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.CHECKPOINT_PERIOD", "100", "TEST.EVAL_PERIOD", "0", "INPUT.CROP.SIZE", "(64,64)",
        "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "16", "DATALOADER.NUM_WORKERS", "0",
        "INPUT.MIN_SIZE_TEST", "24", "INPUT.MAX_SIZE_TEST", "32", "OUTPUT_DIR", str(out_dir),
    ]
    proc = subprocess.run([sys.executable, "train_net.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "camvid_train" in out and re.search(r"copypaste: [\d.]+,[\d.]+,[\d.]+,[\d.]+", out), out[-3000:]
    assert os.path.isfile(out_dir / "model_final.pth")
    assert os.path.isfile(out_dir / "inference" / "camvid_val" / "confusion_sem_seg.json")
