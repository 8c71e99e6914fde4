"""ADE20K, PASCAL VOC 2012 + SBD and PASCAL-Context-59: preparation from the official layouts
(generated fixtures), registration, labels after conversion, and the load-time errors."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from detectron2.data import DatasetCatalog, MetadataCatalog
from segdistill.data import read_dataset_label
from segdistill.data.datasets import DatasetContentError, DatasetLayoutError


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "datasets", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _jpg(path, h, w, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _png(path, label, palette=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(label.astype(np.uint8), mode="L")
    if palette:  # VOC's labels are palette PNGs whose pixel values are the class indices
        im = im.convert("P")
        im.putpalette([v for k in range(256) for v in (k, 255 - k, (7 * k) % 256)])
    im.save(path)


@pytest.fixture
def check_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGDISTILL_CACHE_DIR", str(tmp_path / "cache"))


# ---- ADE20K ---------------------------------------------------------------------------------------
def test_ade20k_prepare_register_and_labels(tmp_path, check_cache):
    from segdistill.data.datasets.ade20k import ade20k_classes, register_ade20k

    base = tmp_path / "ADEChallengeData2016"
    raw = {}
    for split, n in (("training", 3), ("validation", 2)):
        for k in range(n):
            stem = f"ADE_{split[:5]}_{k:08d}"
            _jpg(str(base / "images" / split / f"{stem}.jpg"), 24, 32, seed=k)
            label = np.random.default_rng(k).integers(0, 151, (24, 32))
            label[0, 0], label[0, 1] = 0, 150
            raw[stem] = label
            _png(str(base / "annotations" / split / f"{stem}.png"), label)
    register_ade20k(str(tmp_path))
    try:
        with pytest.raises(DatasetLayoutError, match=r"(?s)official annotations.*prepare_ade20k_sem_seg\.py"):
            DatasetCatalog.get("ade20k_sem_seg_val")
        prep = _script("prepare_ade20k_sem_seg")
        assert prep.main(["--root", str(tmp_path), "--workers", "1"]) == 0
        dicts = DatasetCatalog.get("ade20k_sem_seg_train")
        assert len(dicts) == 3 and len(DatasetCatalog.get("ade20k_sem_seg_val")) == 2
        d = dicts[0]
        label = read_dataset_label(d)
        expected = raw[d["image_id"]].astype(np.int64) - 1
        expected[expected < 0] = 255
        assert np.array_equal(label, expected) and label[0, 0] == 255 and label[0, 1] == 149
        meta = MetadataCatalog.get("ade20k_sem_seg_val")
        assert meta.stuff_classes == ade20k_classes() and len(meta.stuff_classes) == 150
        assert meta.evaluator_type == "sem_seg" and meta.ignore_label == 255 and len(meta.stuff_colors) == 150
        # a second run keeps what is there
        assert prep.main(["--root", str(tmp_path), "--workers", "1"]) == 0
        # the official annotations pointed at by mistake are a content error naming the fix
        os.replace(base / "annotations_detectron2" / "validation", base / "converted")
        os.symlink(base / "annotations" / "validation", base / "annotations_detectron2" / "validation")
        with pytest.raises(DatasetContentError, match=r"(?s)150.*prepare_ade20k_sem_seg\.py"):
            DatasetCatalog.get("ade20k_sem_seg_val")
    finally:
        register_ade20k()  # back to $DETECTRON2_DATASETS


# ---- PASCAL VOC 2012 + SBD -----------------------------------------------------------------------
def _sbd_mat(path, label):
    from scipy.io import savemat

    os.makedirs(os.path.dirname(path), exist_ok=True)
    savemat(path, {"GTcls": {"Segmentation": label.astype(np.uint8), "Boundaries": np.zeros(1),
                             "CategoriesPresent": np.unique(label)}})


def test_voc_sbd_prepare_register_and_labels(tmp_path, check_cache):
    from segdistill.data.datasets.pascal_voc import VOC_CLASSES, register_pascal_voc

    voc = tmp_path / "VOCdevkit" / "VOC2012"
    sbd = tmp_path / "VOCdevkit" / "VOCaug" / "dataset"
    rng = np.random.default_rng(0)
    voc_train, voc_val, sbd_train, sbd_val = ["2007_000001", "2007_000002"], ["2007_000003"], \
        ["2008_000001", "2007_000003"], ["2008_000002", "2007_000001"]
    labels = {}
    for i in sorted(set(voc_train + voc_val + sbd_train + sbd_val)):
        _jpg(str(voc / "JPEGImages" / f"{i}.jpg"), 20, 30, seed=hash(i) % 100)
        label = rng.integers(0, 21, (20, 30))
        label[0, :] = 255  # VOC's void boundary
        labels[i] = label
        if i in voc_train + voc_val:
            _png(str(voc / "SegmentationClass" / f"{i}.png"), label, palette=True)
        if i in sbd_train + sbd_val:  # SBD's own label of the image differs from VOC's
            _sbd_mat(str(sbd / "cls" / f"{i}.mat"), np.where(label == 255, 0, (label + 1) % 21))
    for name, ids in (("train", voc_train), ("val", voc_val)):
        (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (voc / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    (sbd / "train.txt").write_text("\n".join(sbd_train) + "\n")
    (sbd / "val.txt").write_text("\n".join(sbd_val) + "\n")
    register_pascal_voc(str(tmp_path))
    try:
        with pytest.raises(DatasetLayoutError, match=r"(?s)train_aug\.txt.*does not exist.*prepare_voc_sbd\.py"):
            DatasetCatalog.get("voc_2012_sem_seg_train_aug")
        assert _script("prepare_voc_sbd").main(["--root", str(tmp_path), "--workers", "1"]) == 0
        aug = {d["image_id"]: d for d in DatasetCatalog.get("voc_2012_sem_seg_train_aug")}
        # (VOC train + SBD train + SBD val) - VOC val; VOC's labels win over SBD's
        assert sorted(aug) == ["2007_000001", "2007_000002", "2008_000001", "2008_000002"]
        assert np.array_equal(read_dataset_label(aug["2007_000001"]), labels["2007_000001"])
        sbd_label = np.where(labels["2008_000001"] == 255, 0, (labels["2008_000001"] + 1) % 21)
        assert np.array_equal(read_dataset_label(aug["2008_000001"]), sbd_label)
        val = DatasetCatalog.get("voc_2012_sem_seg_val")  # the palette PNGs as they are
        assert len(val) == 1 and np.array_equal(read_dataset_label(val[0]), labels["2007_000003"])
        assert len(DatasetCatalog.get("voc_2012_sem_seg_train")) == 2
        meta = MetadataCatalog.get("voc_2012_sem_seg_train_aug")
        assert meta.stuff_classes == VOC_CLASSES and meta.stuff_colors[1] == [128, 0, 0]
        # a listed image without its file is a layout error naming it
        os.remove(voc / "JPEGImages" / "2008_000002.jpg")
        with pytest.raises(DatasetLayoutError, match=r"1 of 4 listed images are not in .*2008_000002"):
            DatasetCatalog.get("voc_2012_sem_seg_train_aug")
    finally:
        register_pascal_voc()


# ---- PASCAL-Context-59 ---------------------------------------------------------------------------
def test_pascal_context_prepare_register_and_labels(tmp_path, check_cache):
    from segdistill.data.datasets.pascal_context import PC59_CLASSES, PC59_IDS, register_pascal_context
    from scipy.io import savemat

    voc = tmp_path / "VOCdevkit" / "VOC2010"
    splits = {"train": ["2008_000002", "2008_000003"], "val": ["2008_000007"]}
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    raw = {}
    rng = np.random.default_rng(0)
    for split, ids in splits.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i in ids:
            _jpg(str(voc / "JPEGImages" / f"{i}.jpg"), 16, 24)
            label = rng.integers(0, 460, (16, 24)).astype(np.uint16)
            label[0, :3] = [2, 3, 458]  # aeroplane, a class outside the 59, wood
            raw[i] = label
            os.makedirs(voc / "trainval", exist_ok=True)
            savemat(str(voc / "trainval" / f"{i}.mat"), {"LabelMap": label})
    names = {i: f"other{i}" for i in range(1, 460)}
    names.update(dict(zip(PC59_IDS, PC59_CLASSES)))
    (voc / "labels.txt").write_text("".join(f"{i}: {n}\n" for i, n in sorted(names.items())))
    register_pascal_context(str(tmp_path))
    try:
        with pytest.raises(DatasetLayoutError, match=r"(?s)pc59_train.*does not exist.*prepare_pascal_context\.py"):
            DatasetCatalog.get("pascal_context_59_sem_seg_train")
        assert _script("prepare_pascal_context").main(["--root", str(tmp_path), "--workers", "1"]) == 0
        train = DatasetCatalog.get("pascal_context_59_sem_seg_train")
        assert [d["image_id"] for d in train] == splits["train"]
        label = read_dataset_label(train[0])
        assert list(label[0, :3]) == [0, 255, 58]
        lut = {pid: k for k, pid in enumerate(PC59_IDS)}
        expected = np.vectorize(lambda v: lut.get(int(v), 255))(raw[train[0]["image_id"]])
        assert np.array_equal(label, expected)
        assert len(DatasetCatalog.get("pascal_context_59_sem_seg_val")) == 1
        assert MetadataCatalog.get("pascal_context_59_sem_seg_val").stuff_classes == PC59_CLASSES
        # a labels.txt with other ids is refused
        (voc / "labels.txt").write_text("2: bag\n")
        with pytest.raises(SystemExit, match="expected ids of the 59 classes"):
            _script("prepare_pascal_context").main(["--root", str(tmp_path), "--workers", "1", "--force"])
    finally:
        register_pascal_context()
