"""Demo dataset generator, registration, the mapper, and dataset errors."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from segdistill.data import LabelValueError, SemSegDatasetMapper
from segdistill.data.datasets import DEMO_CLASSES, DatasetLayoutError, ensure_demo_dataset, generate_scene, load_sem_seg_folder
from segdistill.data.datasets.demo import DEMO_SPECS
from segdistill.config import ConfigError, check_dataset_names


def test_generator_is_deterministic_and_seed_dependent():
    a_img, a_lbl = generate_scene(np.random.default_rng([0, 0, 7]), 128, 128)
    b_img, b_lbl = generate_scene(np.random.default_rng([0, 0, 7]), 128, 128)
    c_img, _ = generate_scene(np.random.default_rng([0, 0, 8]), 128, 128)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lbl, b_lbl)
    assert not np.array_equal(a_img, c_img)
    assert a_img.shape == (128, 128, 3) and a_img.dtype == np.uint8 and a_lbl.shape == (128, 128)


def test_generator_makes_a_real_problem():
    labels, images = [], []
    for i in range(40):
        img, lbl = generate_scene(np.random.default_rng([5, 0, i]), 160, 160)
        labels.append(lbl)
        images.append(img)
    lbl = np.stack(labels)
    img = np.stack(images).astype(np.float64)
    values = set(np.unique(lbl).tolist())
    assert set(range(len(DEMO_CLASSES))) <= values and 255 in values  # all 10 classes and ignore
    freq = np.bincount(lbl[lbl != 255], minlength=10) / (lbl != 255).sum()
    assert freq.max() < 0.35  # no class dominates: the majority class is a poor predictor
    assert freq[[7, 8, 9]].max() < 0.02  # poles, wires, signs are small/thin
    # wires are 1-2 px thin: no wire pixel has wire pixels both above and below it very often
    wire = lbl == 8
    thick = wire[:, 1:-1] & wire[:, :-2] & wire[:, 2:]
    assert thick.sum() < 0.2 * wire.sum()
    # colour alone does not give the class: a nearest-mean-colour classifier is far from perfect
    means = np.stack([img[lbl == c].mean(0) for c in range(10)])
    flat, target = img.reshape(-1, 3), lbl.reshape(-1)
    keep = target != 255
    pred = np.argmin(((flat[keep, None, :] - means[None]) ** 2).sum(-1), 1)
    assert np.mean(pred == target[keep]) < 0.6


def test_demo_dataset_files_are_deterministic_and_generated_once(tmp_path):
    a = ensure_demo_dataset("segdistill_demo_mini", str(tmp_path / "a"))
    b = ensure_demo_dataset("segdistill_demo_mini", str(tmp_path / "b"))
    spec = DEMO_SPECS["segdistill_demo_mini"]
    for split, n in (("train", spec.num_train), ("val", spec.num_val)):
        files = sorted(os.listdir(os.path.join(a, "labels", split)))
        assert len(files) == n
        for f in files[:3]:
            for kind in ("images", "labels"):
                pa, pb = os.path.join(a, kind, split, f), os.path.join(b, kind, split, f)
                assert np.array_equal(np.asarray(Image.open(pa)), np.asarray(Image.open(pb)))
    marker = os.path.join(a, "labels", "train", "train_00000.png")
    before = os.stat(marker).st_mtime_ns
    ensure_demo_dataset("segdistill_demo_mini", str(tmp_path / "a"))
    assert os.stat(marker).st_mtime_ns == before  # not regenerated
    assert not [p for p in os.listdir(tmp_path / "a") if p.startswith(".segdistill_demo_mini-")]


def test_demo_registration_and_metadata():
    for split in ("train", "val"):
        name = f"segdistill_demo_mini_{split}"
        meta = MetadataCatalog.get(name)
        assert meta.stuff_classes == DEMO_CLASSES and len(meta.stuff_colors) == 10
        assert meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == getattr(DEMO_SPECS["segdistill_demo_mini"], f"num_{split}")
        assert all(os.path.isfile(d["file_name"]) and os.path.isfile(d["sem_seg_file_name"]) for d in dicts)
    assert {"segdistill_demo_train", "segdistill_demo_val", "camvid_train", "camvid_val"} <= set(DatasetCatalog.list())


def test_mapper_resizes_crops_with_ignore_padding_and_flips():
    cfg = tiny_cfg(num_classes=10)
    cfg.INPUT.CROP.SIZE = (200, 150)  # larger than the 96x96 mini images: padded
    cfg.INPUT.RESIZE_RATIO_RANGE = (1.0, 1.0)
    cfg.INPUT.RANDOM_FLIP = "none"  # padding stays bottom/right; flips are tested below
    rec = DatasetCatalog.get("segdistill_demo_mini_train")[0]
    out = SemSegDatasetMapper(cfg, True)(rec)
    assert out["image"].shape == (3, 200, 150) and out["image"].dtype == torch.uint8
    assert out["sem_seg"].shape == (200, 150) and out["sem_seg"].dtype == torch.uint8  # int64 on the device
    assert (out["sem_seg"][96:] == 255).all() and (out["sem_seg"][:, 96:] == 255).all()
    assert (out["height"], out["width"]) == (96, 96)
    raw = np.asarray(Image.open(rec["sem_seg_file_name"]))
    assert np.array_equal(np.sort(np.unique(out["sem_seg"][:96, :96])), np.unique(raw))

    cfg.INPUT.CROP.SIZE = (64, 64)
    cfg.INPUT.RESIZE_RATIO_RANGE = (0.5, 0.5)
    out = SemSegDatasetMapper(cfg, True)(rec)  # 48x48 after resizing, padded to 64
    assert out["sem_seg"].shape == (64, 64) and (out["sem_seg"][48:] == 255).all()

    test = SemSegDatasetMapper(cfg, False)(rec)
    assert "sem_seg" not in test and test["image"].shape == (3, 96, 96)
    assert np.array_equal(test["image"].permute(1, 2, 0).numpy(), np.asarray(Image.open(rec["file_name"]).convert("RGB")))


def test_mapper_flip_moves_image_and_label_together():
    cfg = tiny_cfg(num_classes=10)
    cfg.INPUT.CROP.ENABLED = False
    cfg.INPUT.RESIZE_RATIO_RANGE = (1.0, 1.0)
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    rec = DatasetCatalog.get("segdistill_demo_mini_train")[1]
    img = np.asarray(Image.open(rec["file_name"]).convert("RGB"))
    lbl = np.asarray(Image.open(rec["sem_seg_file_name"]))
    seen = set()
    mapper = SemSegDatasetMapper(cfg, True)
    for _ in range(20):
        out = mapper(rec)
        flipped = np.array_equal(out["image"].permute(1, 2, 0).numpy(), img[:, ::-1])
        if flipped:
            assert np.array_equal(out["sem_seg"].numpy(), lbl[:, ::-1])
        else:
            assert np.array_equal(out["sem_seg"].numpy(), lbl)
        seen.add(flipped)
    assert seen == {True, False}


def test_mapper_rejects_bad_labels(write_label_dataset):
    bad = np.zeros((20, 20), np.uint8)
    bad[0, 0] = 9
    name = write_label_dataset("map_bad", [bad], 5)
    cfg = tiny_cfg(num_classes=5)
    with pytest.raises(LabelValueError, match=r"000\.png.*\[9\]"):
        SemSegDatasetMapper(cfg, True)(DatasetCatalog.get(name)[0])


def test_mapper_rejects_label_of_wrong_size(write_label_dataset):
    name = write_label_dataset("map_size", [np.zeros((20, 20), np.uint8)], 5,
                               images=[np.zeros((20, 24, 3), np.uint8)])
    with pytest.raises(ValueError, match="is 20x20 but its image"):
        SemSegDatasetMapper(tiny_cfg(num_classes=5), True)(DatasetCatalog.get(name)[0])


def test_missing_dataset_folder_says_layout_and_where(tmp_path, monkeypatch):
    from segdistill.data.datasets.camvid import _load

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with pytest.raises(DatasetLayoutError) as e:
        _load(str(tmp_path / "camvid"), "train")
    msg = str(e.value)
    assert "does not exist" in msg and "trainannot" in msg and "DETECTRON2_DATASETS" in msg and str(tmp_path) in msg


def test_unpaired_images_and_labels_are_counted(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lbl").mkdir()
    for n in ("a", "b", "c"):
        Image.new("RGB", (4, 4)).save(tmp_path / "img" / f"{n}.png")
    Image.new("L", (4, 4)).save(tmp_path / "lbl" / "a.png")
    Image.new("L", (4, 4)).save(tmp_path / "lbl" / "z.png")
    with pytest.raises(DatasetLayoutError, match=r"2 of 3 images have no label.*b, c.*1 labels have no image.*z"):
        load_sem_seg_folder(str(tmp_path / "img"), str(tmp_path / "lbl"), dataset_name="t", layout_help="HELP")
    dicts = load_sem_seg_folder(str(tmp_path / "img"), str(tmp_path / "img"), dataset_name="t", layout_help="")
    assert len(dicts) == 3


def test_dataset_name_checks():
    with pytest.raises(ConfigError, match=r"not_a_dataset.*Registered datasets"):
        check_dataset_names("DATASETS.TRAIN", ("not_a_dataset",))
    with pytest.raises(ConfigError, match="letter by letter"):
        check_dataset_names("DATASETS.TEST", "segdistill_demo_val")
    check_dataset_names("DATASETS.TEST", ("segdistill_demo_val",))
