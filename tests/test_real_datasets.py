"""COCO-Stuff-164k, Cityscapes and CamVid loaders on small files written in the official layouts."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import load_script
from detectron2.data import DatasetCatalog, MetadataCatalog
from segdistill.data import read_dataset_label
from segdistill.data.datasets import DatasetContentError, DatasetLayoutError
from segdistill.data.datasets import camvid as camvid_mod
from segdistill.data.datasets import coco_stuff_meta as meta
from segdistill.data.datasets.cityscapes import register_cityscapes
from segdistill.data.datasets.coco_stuff import register_coco_stuff
from segdistill.data.datasets.paths import datasets_root


def _script(name):
    return load_script(name, f"datasets/{name}.py", register=True)


@pytest.fixture(autouse=True)
def _private_check_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SEGDISTILL_DATASET_CHECK", raising=False)


# ----------------------------------------------------------------------------- COCO-Stuff ids
# Independent of the package: the 11 COCO thing classes without segmentation (COCO-Stuff README)
# and the official position of a few ids in labels.txt.
UNUSED_NAMES = {"street sign", "hat", "shoe", "eye glasses", "plate", "mirror", "window", "desk", "door",
                "blender", "hair brush"}


def expected_raw_to_train():
    """raw value (COCO id - 1) -> training label, from the 182 names and the unused names."""
    out, k = {}, 0
    for raw in range(182):
        if meta.COCO_STUFF_ALL_NAMES[raw + 1] in UNUSED_NAMES:
            out[raw] = 255
        else:
            out[raw] = k
            k += 1
    out[255] = 255
    return out


def test_coco_stuff_class_list_and_every_raw_id():
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    assert {meta.COCO_STUFF_ALL_NAMES[i] for i in meta.UNUSED_IDS} == UNUSED_NAMES
    things = [c["name"] for c in COCO_CATEGORIES if c["isthing"]]  # detectron2's 80 COCO classes
    assert meta.COCO_STUFF_CLASSES[:80] == things
    stuff = meta.COCO_STUFF_CLASSES[80:]
    assert len(stuff) == 91 and stuff == sorted(stuff) and stuff[0] == "banner" and stuff[-1] == "wood"
    exp = expected_raw_to_train()
    lut = meta.raw_to_contiguous_lut()
    assert [int(lut[v]) for v in range(182)] == [exp[v] for v in range(182)]  # all 182 ids
    assert lut[255] == 255 and (lut[182:255] == 255).all()
    # anchors from labels.txt: id 1 person, 12 street sign (unused), 13 stop sign, 92 banner, 182 wood
    assert (lut[0], lut[11], lut[12], lut[90], lut[91], lut[181]) == (0, 255, 11, 255, 80, 170)
    id_map = meta.stuff_dataset_id_to_contiguous_id()
    assert id_map == {raw + 1: t for raw, t in exp.items() if raw < 182 and t != 255}
    assert meta.COCO_STUFF_CLASSES[id_map[182]] == "wood" and meta.COCO_STUFF_CLASSES[id_map[13]] == "stop sign"
    # hierarchy: 12 thing + 15 stuff supercategories, every class in one, indoor/outdoor above them
    supers = meta.COCO_STUFF_SUPERCATEGORY
    assert len(set(supers[:80])) == 12 and len(set(supers[80:])) == 15
    assert supers[meta.COCO_STUFF_CLASSES.index("giraffe")] == "animal-things"
    assert supers[meta.COCO_STUFF_CLASSES.index("fog")] == "water-stuff"
    assert meta.COCO_STUFF_LEVELS["scene"][meta.COCO_STUFF_CLASSES.index("sea")] == "outdoor-stuff"
    assert meta.COCO_STUFF_LEVELS["scene"][meta.COCO_STUFF_CLASSES.index("fork")] == "indoor-things"


# ----------------------------------------------------------------------------- COCO-Stuff files
def write_coco_fixture(root, rng=None):
    """coco/{train2017,val2017}/*.jpg + coco/stuffthingmaps/<split>/*.png (official raw values).

    val: 000...1 holds every raw id 0..181 and 255; 000...2 is all unlabeled; 000...3 is random.
    """
    rng = rng or np.random.default_rng(0)
    labels = {}
    for split, n in (("val2017", 3), ("train2017", 2)):
        os.makedirs(root / "coco" / split)
        os.makedirs(root / "coco" / "stuffthingmaps" / split)
        for i in range(n):
            h, w = 16, 12 + 2 * i
            if split == "val2017" and i == 0:
                lbl = np.full(h * w, 255, np.uint8)
                lbl[:182] = np.arange(182)
                lbl = lbl.reshape(h, w)
            elif split == "val2017" and i == 1:
                lbl = np.full((h, w), 255, np.uint8)
            else:
                used = np.array([c - 1 for c in meta.COCO_STUFF_IDS], np.uint8)
                lbl = rng.choice(np.append(used, 255), size=(h, w)).astype(np.uint8)
            stem = f"{i + 1:012d}"
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "coco" / split / f"{stem}.jpg")
            Image.fromarray(lbl).save(root / "coco" / "stuffthingmaps" / split / f"{stem}.png")
            labels[(split, stem)] = lbl
    return labels


def fixture_root(tmp_path, write, register):
    """A fixture dataset written by ``write(root)`` under ``tmp_path``: yields (root, what write
    returned), then registers the dataset back over the default root."""
    root = tmp_path / "d2"
    written = write(root)
    yield root, written
    register(datasets_root())


@pytest.fixture
def coco_root(tmp_path):
    yield from fixture_root(tmp_path, write_coco_fixture, register_coco_stuff)


def test_coco_stuff_conversion_registration_idempotence_and_resume(coco_root, caplog):
    root, raw = coco_root
    prep = _script("prepare_coco_stuff_164k")
    assert prep.main(["--root", str(root), "--workers", "2"]) == 0
    exp = expected_raw_to_train()
    lut = np.array([exp.get(v, 255) for v in range(256)], np.uint8)
    out_dir = root / "coco" / "stuffthingmaps_detectron2"
    for (split, stem), lbl in raw.items():
        out = np.asarray(Image.open(out_dir / split / f"{stem}.png"))
        assert np.array_equal(out, lut[lbl]), (split, stem)
    everything = np.asarray(Image.open(out_dir / "val2017" / "000000000001.png")).ravel()[:182]
    assert sorted(set(everything.tolist()) - {255}) == list(range(171))  # every class reached once
    report = json.load(open(out_dir / "val2017_report.json"))
    assert report["all_ignore"] == ["000000000002.png"] and report["labels"] == 3
    assert report["unused_id_pixels"] == {str(i): 1 for i in meta.UNUSED_IDS}  # one pixel each in image 1
    assert not report["size_mismatch"] and not report["missing_images"]

    # the converter checked the labels only: it leaves no marker, so the first load of each split
    # decodes its images too and leaves one (the load-time check decodes every image, so a corrupt
    # file fails there, not in the middle of training)
    from segdistill.data.datasets.folder import dataset_check_cache_dir

    def markers():
        cache = dataset_check_cache_dir()
        return sorted(f for f in os.listdir(cache) if f.endswith(".json")) if os.path.isdir(cache) else []

    assert markers() == []

    # registration over this root
    register_coco_stuff(str(root))
    m = MetadataCatalog.get("coco_2017_val_stuff_sem_seg")
    assert m.stuff_classes == meta.COCO_STUFF_CLASSES and len(m.stuff_colors) == 171
    assert all(len(c) == 3 and all(0 <= x <= 255 for x in c) for c in m.stuff_colors)
    assert len({tuple(c) for c in m.stuff_colors}) > 150
    assert m.stuff_dataset_id_to_contiguous_id == meta.stuff_dataset_id_to_contiguous_id()
    assert m.ignore_label == 255 and m.evaluator_type == "coco_stuff_sem_seg"
    val = DatasetCatalog.get("coco_2017_val_stuff_sem_seg")
    assert [os.path.basename(d["file_name"]) for d in val] == [f"{i:012d}.jpg" for i in (1, 2, 3)]  # all-ignore kept
    assert len(DatasetCatalog.get("coco_2017_train_stuff_sem_seg")) == 2
    assert len(markers()) == 2

    # idempotent: nothing converted again, files untouched
    stamp = os.stat(out_dir / "val2017" / "000000000003.png").st_mtime_ns
    assert prep.main(["--root", str(root), "--workers", "1"]) == 0
    assert json.load(open(out_dir / "val2017_report.json"))["converted_this_run"] == 0
    assert os.stat(out_dir / "val2017" / "000000000003.png").st_mtime_ns == stamp

    # resume after an interruption: last output missing, journal cut mid-line, a stray temp file
    journal = out_dir / ".val2017.journal.jsonl"
    lines = open(journal).read().splitlines()
    last = json.loads(lines[-1])["name"]
    os.remove(out_dir / "val2017" / last)
    open(journal, "w").write("\n".join(lines[:-1]) + "\n" + lines[-1][:10])
    (out_dir / "val2017" / f"{last}.tmp123.png").write_bytes(b"partial")
    assert prep.main(["--root", str(root), "--workers", "1", "--splits", "val2017"]) == 0
    report = json.load(open(out_dir / "val2017_report.json"))
    assert report["converted_this_run"] == 1 and report["all_ignore"] == ["000000000002.png"]
    stem = last[:-4]
    assert np.array_equal(np.asarray(Image.open(out_dir / "val2017" / last)), lut[raw[("val2017", stem)]])


def test_coco_stuff_errors(coco_root, monkeypatch):
    root, _ = coco_root
    from segdistill.data.datasets.coco_stuff import load_coco_stuff_sem_seg

    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    with pytest.raises(DatasetLayoutError, match=r"(?s)converted labels .* do not exist.*prepare_coco_stuff_164k\.py"):
        load_coco_stuff_sem_seg(str(root), "val2017")
    with pytest.raises(DatasetLayoutError, match=r"(?s)image folder .*nowhere.*does not exist.*DETECTRON2_DATASETS"):
        load_coco_stuff_sem_seg(str(root / "nowhere"), "val2017")
    # converter: a missing input folder and non-official raw values are errors naming files
    with pytest.raises(SystemExit, match="stuffthingmaps_trainval2017.zip"):
        _script("prepare_coco_stuff_164k").main(["--root", str(root / "nowhere")])
    bad = np.zeros((16, 12), np.uint8)
    bad[0, :3] = (190, 200, 254)
    Image.fromarray(bad).save(root / "coco" / "stuffthingmaps" / "train2017" / "000000000001.png")
    prep = _script("prepare_coco_stuff_164k")
    assert prep.main(["--root", str(root), "--workers", "1"]) == 1
    report = json.load(open(root / "coco" / "stuffthingmaps_detectron2" / "train2017_report.json"))
    assert report["invalid_values"] == {"000000000001.png": [190, 200, 254]}

    conv = root / "coco" / "stuffthingmaps_detectron2" / "val2017"
    # an image without a label, and a label without an image
    Image.new("RGB", (8, 8)).save(root / "coco" / "val2017" / "000000000009.jpg")
    Image.new("L", (8, 8)).save(conv / "000000000042.png")
    with pytest.raises(DatasetLayoutError, match=r"1 of 4 images have no label.*000000000009.*1 labels have no image.*000000000042"):
        load_coco_stuff_sem_seg(str(root), "val2017")
    os.remove(root / "coco" / "val2017" / "000000000009.jpg")
    os.remove(conv / "000000000042.png")
    # wrong size and raw (unconverted) values: one error naming both files, counts and the fix
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(conv / "000000000003.png")
    raw = np.full((16, 12), 181, np.uint8)
    Image.fromarray(raw).save(conv / "000000000001.png")
    with pytest.raises(DatasetContentError) as e:
        load_coco_stuff_sem_seg(str(root), "val2017")
    msg = str(e.value)
    assert "1 of 3 labels do not have their image's size" in msg and "000000000003.png' is 10x10" in msg
    assert "is 16x16" in msg  # image 3 is 16 wide, 16 high
    assert "1 of 3 labels hold values [181]" in msg and "0..170" in msg and "192 pixels" in msg
    assert "prepare_coco_stuff_164k.py" in msg and "DETECTRON2_DATASETS" in msg


def test_dataset_check_is_cached_and_rechecks_changed_files(tmp_path):
    from segdistill.data.datasets import folder

    img, lbl = tmp_path / "img", tmp_path / "lbl"
    img.mkdir(), lbl.mkdir()
    for i in range(3):
        Image.new("RGB", (6, 4)).save(img / f"{i}.png")
        Image.fromarray(np.full((4, 6), i, np.uint8)).save(lbl / f"{i}.png")
    dicts = folder.load_sem_seg_folder(str(img), str(lbl), dataset_name="t", layout_help="")
    folder.verify_sem_seg_dicts(dicts, dataset_name="t", num_classes=3)
    markers = os.listdir(folder.dataset_check_cache_dir())
    assert len([m for m in markers if m.endswith(".json")]) == 1
    folder._VERIFIED.clear()  # a new process: the marker is enough
    folder.verify_sem_seg_dicts(dicts, dataset_name="t", num_classes=3)
    Image.fromarray(np.full((4, 6), 7, np.uint8)).save(lbl / "2.png")  # changed file -> checked again
    with pytest.raises(DatasetContentError, match=r"values \[7\]"):
        folder.verify_sem_seg_dicts(dicts, dataset_name="t", num_classes=3)
    folder.verify_sem_seg_dicts(dicts, dataset_name="t", num_classes=3, mode="layout")  # opt-out
    Image.new("RGB", (6, 4)).save(lbl / "2.png")
    with pytest.raises(DatasetContentError, match=r"not single-channel.*mode RGB"):
        folder.verify_sem_seg_dicts(dicts, dataset_name="t", num_classes=3)


# ----------------------------------------------------------------------------- Cityscapes
def write_cityscapes_fixture(root):
    """Two cities in train, one in val; 40x20 images; rectangles of known classes."""
    objects = [  # (label, x0, y0, x1, y1), drawn in order
        ("road", 0, 10, 39, 19), ("sky", 0, 0, 39, 4), ("car", 4, 8, 15, 15), ("cargroup", 20, 8, 27, 15),
        ("ego vehicle", 30, 16, 39, 19), ("license plate", 6, 12, 9, 13),
    ]
    stems = []
    for split, cities in (("train", ("aachen", "bremen")), ("val", ("lindau",))):
        for city in cities:
            for k in range(2 if split == "train" else 1):
                stem = f"{city}_000000_{k:06d}"
                idir = root / "cityscapes" / "leftImg8bit" / split / city
                gdir = root / "cityscapes" / "gtFine" / split / city
                idir.mkdir(parents=True, exist_ok=True)
                gdir.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40, 20), (k * 40, 90, 20)).save(idir / f"{stem}_leftImg8bit.png")
                polys = [{"label": n, "polygon": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]} for n, x0, y0, x1, y1 in objects]
                json.dump({"imgHeight": 20, "imgWidth": 40, "objects": polys}, open(gdir / f"{stem}_gtFine_polygons.json", "w"))
                stems.append((split, city, stem))
    return stems


@pytest.fixture
def cityscapes_root(tmp_path):
    yield from fixture_root(tmp_path, write_cityscapes_fixture, register_cityscapes)


def test_cityscapes_prepare_register_and_evaluate(cityscapes_root, monkeypatch, tmp_path):
    from cityscapesscripts.helpers.labels import trainId2label

    root, stems = cityscapes_root
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    register_cityscapes(str(root))
    # before preparation: our error, with the count and the command
    with pytest.raises(DatasetLayoutError, match=r"(?s)4 of 4 images have no \*_gtFine_labelTrainIds\.png.*"
                                                 r"4 \*_gtFine_polygons\.json.*python datasets/prepare_cityscapes\.py"):
        DatasetCatalog.get("cityscapes_fine_sem_seg_train")
    prep = _script("prepare_cityscapes")
    assert prep.main(["--root", str(root), "--workers", "2"]) == 0
    split, city, stem = stems[0]
    out = root / "cityscapes" / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png"
    lbl = np.asarray(Image.open(out))
    # train ids of the Cityscapes benchmark: road 0, sky 10, car 13, ego vehicle / unlabeled 255;
    # license plate is not drawn (the car stays), cargroup is car.
    assert lbl[17, 2] == 0 and lbl[2, 20] == 10 and lbl[10, 10] == 13 and lbl[12, 7] == 13 and lbl[10, 24] == 13
    assert lbl[18, 35] == 255 and lbl[6, 20] == 255
    stamp = os.stat(out).st_mtime_ns
    assert prep.main(["--root", str(root), "--workers", "1"]) == 0  # idempotent
    assert os.stat(out).st_mtime_ns == stamp

    meta_ = MetadataCatalog.get("cityscapes_fine_sem_seg_val")
    assert meta_.evaluator_type == "cityscapes_sem_seg" and meta_.ignore_label == 255 and len(meta_.stuff_classes) == 19
    assert [tuple(c) for c in meta_.stuff_colors] == [trainId2label[i].color for i in range(19)]
    assert [trainId2label[i].name for i in range(19)] == meta_.stuff_classes
    train = DatasetCatalog.get("cityscapes_fine_sem_seg_train")
    assert len(train) == 4 and train[0]["sem_seg_file_name"].endswith("_gtFine_labelTrainIds.png")
    val = DatasetCatalog.get("cityscapes_fine_sem_seg_val")

    # our evaluator on it: perfect predictions score 100 on the classes present
    import torch

    from conftest import tiny_cfg
    from segdistill.engine import Trainer
    from segdistill.evaluation import SemSegEvaluator

    # the evaluator writes its confusion matrix under OUTPUT_DIR/inference: the test's own folder
    cfg = tiny_cfg(num_classes=19, OUTPUT_DIR=str(tmp_path / "out"))
    ev = Trainer.build_evaluator(cfg, "cityscapes_fine_sem_seg_val", output_folder=None)
    assert type(ev) is SemSegEvaluator
    ev._distributed = False
    gt = torch.as_tensor(read_dataset_label(val[0]))
    scores = torch.nn.functional.one_hot(gt.clamp(max=18), 19).permute(2, 0, 1).float()
    ev.reset()
    ev.process([{"file_name": val[0]["file_name"]}], [{"sem_seg": scores}])
    res = ev.evaluate()["sem_seg"]
    assert res["mIoU"] == pytest.approx(100.0) and res["IoU-car"] == pytest.approx(100.0)
    assert (tmp_path / "out" / "inference" / "cityscapes_fine_sem_seg_val" / "confusion_sem_seg.json").is_file()


def test_cityscapes_layout_errors(tmp_path):
    prep = _script("prepare_cityscapes")
    with pytest.raises(SystemExit, match=r"does not exist"):
        prep.main(["--root", str(tmp_path)])
    write_cityscapes_fixture(tmp_path)
    os.remove(tmp_path / "cityscapes/gtFine/train/bremen/bremen_000000_000001_gtFine_polygons.json")
    with pytest.raises(SystemExit, match=r"(?s)train: 1 of 4 images have no \*_gtFine_polygons\.json: bremen/bremen_000000_000001"):
        prep.main(["--root", str(tmp_path), "--splits", "train", "val"])
    from segdistill.data.datasets.cityscapes import load_cityscapes_sem_seg

    with pytest.raises(DatasetLayoutError, match=r"image folder .*leftImg8bit/test.* does not exist"):
        load_cityscapes_sem_seg(str(tmp_path), "test")


# ----------------------------------------------------------------------------- CamVid (fixture)
def write_camvid_fixture(root, splits=("train", "val")):
    rng = np.random.default_rng(3)
    for split in splits:
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(root / split / f"f{i}.png")
            Image.fromarray(rng.integers(0, 12, (12, 16), dtype=np.uint8)).save(root / f"{split}annot" / f"f{i}.png")


@pytest.fixture
def camvid_fixture(tmp_path):
    root = tmp_path / "camvid"
    write_camvid_fixture(root)
    camvid_mod.register_camvid(str(root), replace=True)
    yield root
    camvid_mod.register_camvid(camvid_mod.camvid_root(), replace=True)


def test_camvid_registration_void_and_errors(camvid_fixture):
    root = camvid_fixture
    m = MetadataCatalog.get("camvid_val")
    assert m.stuff_classes == camvid_mod.CAMVID_CLASSES and len(m.stuff_colors) == 11 and m.ignore_label == 255
    assert m.image_root == str(root / "val")
    d = DatasetCatalog.get("camvid_train")[0]
    raw = np.asarray(Image.open(d["sem_seg_file_name"]))
    lbl = read_dataset_label(d)
    assert (lbl[raw == 11] == 255).all() and np.array_equal(lbl[raw < 11], raw[raw < 11]) and (raw == 11).any()
    # missing split: names the folder, the layout and both environment variables
    with pytest.raises(DatasetLayoutError) as e:
        DatasetCatalog.get("camvid_test")
    assert "'" + str(root / "test") + "' does not exist" in str(e.value)
    assert "SEGDISTILL_CAMVID_ROOT" in str(e.value) and "DETECTRON2_DATASETS" in str(e.value)
    # values beyond void, wrong sizes, colour labels
    Image.fromarray(np.full((12, 16), 12, np.uint8)).save(root / "valannot" / "f0.png")
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(root / "valannot" / "f1.png")
    with pytest.raises(DatasetContentError) as e:
        DatasetCatalog.get("camvid_val")
    msg = str(e.value)
    assert "1 of 2 labels hold values [12]" in msg and "{11: 255}" in msg and "192 pixels" in msg
    assert "f1.png' is 8x6 but its image" in msg and "is 16x12" in msg
    Image.new("RGB", (16, 12)).save(root / "valannot" / "f1.png")
    with pytest.raises(DatasetContentError, match=r"1 of 2 labels are not single-channel.*f1\.png' \(mode RGB\)"):
        DatasetCatalog.get("camvid_val")
