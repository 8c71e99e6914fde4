"""COCO-Stuff evaluation: the 171-class metrics and the breakdowns against brute force."""
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation.testing import print_csv_format
from segdistill.data.datasets import coco_stuff_meta as meta
from segdistill.data.datasets import load_sem_seg_folder
from segdistill.engine import Trainer
from segdistill.evaluation import CocoStuffEvaluator
from segdistill.evaluation.coco_stuff import HEADLINE_KEYS

C = 171


def brute_iou(gt, pred, classes):
    """{class: IoU} over pixel arrays for the classes present in gt (masks, no confusion matrix)."""
    out = {}
    for c in classes:
        g, p = gt == c, pred == c
        if g.any():
            out[c] = (g & p).sum() / (g | p).sum()
    return out


def brute_level(gt, pred, group_of):
    """mIoU, fwIoU, mACC, pACC (percent) after mapping both arrays through ``group_of`` (class -> group)."""
    g = np.array([group_of[int(c)] for c in gt], dtype=object)
    p = np.array([group_of[int(c)] for c in pred], dtype=object)
    names = sorted(set(group_of.values()))
    ious, accs, freqs = [], [], []
    for n in names:
        gm, pm = g == n, p == n
        if gm.any():
            ious.append((gm & pm).sum() / (gm | pm).sum())
            accs.append((gm & pm).sum() / gm.sum())
            freqs.append(gm.sum() / len(g))
    ious, accs, freqs = map(np.array, (ious, accs, freqs))
    return {"mIoU": 100 * ious.mean(), "fwIoU": 100 * (ious * freqs).sum(), "mACC": 100 * accs.mean(),
            "pACC": 100 * (g == p).mean()}


@pytest.fixture
def coco_stuff_like(tmp_path):
    """A registered dataset with COCO-Stuff's metadata: random labels (some classes absent, ignore pixels)."""
    rng = np.random.default_rng(7)
    img_dir, lbl_dir = tmp_path / "img", tmp_path / "lbl"
    img_dir.mkdir(), lbl_dir.mkdir()
    present = rng.choice(C, size=120, replace=False)  # 51 classes never in the ground truth
    labels = []
    for i in range(3):
        h, w = 24, 32
        lbl = rng.choice(present, size=(h, w)).astype(np.uint8)
        lbl[rng.random((h, w)) < 0.1] = 255
        labels.append(lbl)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img_dir / f"{i}.png")
        Image.fromarray(lbl).save(lbl_dir / f"{i}.png")
    name = "test_coco_stuff_eval"
    DatasetCatalog.register(name, lambda: load_sem_seg_folder(str(img_dir), str(lbl_dir), dataset_name=name, layout_help=""))
    src = MetadataCatalog.get("coco_2017_val_stuff_sem_seg")
    MetadataCatalog.get(name).set(**{k: getattr(src, k) for k in (
        "stuff_classes", "stuff_colors", "stuff_is_thing", "stuff_hierarchy", "ignore_label", "evaluator_type")})
    yield name, labels
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_breakdown_matches_brute_force(coco_stuff_like, tmp_path, caplog):
    name, labels = coco_stuff_like
    rng = np.random.default_rng(8)
    ev = Trainer.build_evaluator(tiny_cfg(num_classes=C), name, output_folder=str(tmp_path / "out"))
    assert isinstance(ev, CocoStuffEvaluator)
    ev._distributed = False
    records = DatasetCatalog.get(name)
    gts, preds = [], []
    for rec, gt in zip(records, labels):
        # mostly right, sometimes another class (also classes absent from the ground truth)
        pred = np.where(rng.random(gt.shape) < 0.6, np.minimum(gt, C - 1), rng.integers(0, C, gt.shape))
        scores = torch.nn.functional.one_hot(torch.as_tensor(pred), C).permute(2, 0, 1).float()
        ev.process([{"file_name": rec["file_name"]}], [{"sem_seg": scores}])
        keep = gt != 255
        gts.append(gt[keep].astype(int))
        preds.append(pred[keep])
    with caplog.at_level(logging.INFO, logger="segdistill.evaluation.sem_seg"):
        res = ev.evaluate()["sem_seg"]
    logged = list(caplog.records)
    gt, pred = np.concatenate(gts), np.concatenate(preds)

    iou = brute_iou(gt, pred, range(C))
    assert res["mIoU"] == pytest.approx(100 * np.mean(list(iou.values())))
    things = [v for c, v in iou.items() if c < 80]
    stuff = [v for c, v in iou.items() if c >= 80]
    assert res["mIoU_things"] == pytest.approx(100 * np.mean(things))
    assert res["mIoU_stuff"] == pytest.approx(100 * np.mean(stuff))
    assert res["mIoU_182"] == pytest.approx(100 * sum(iou.values()) / 182)
    acc = {c: ((gt == c) & (pred == c)).sum() / (gt == c).sum() for c in iou}
    assert res["mACC-things"] == pytest.approx(100 * np.mean([v for c, v in acc.items() if c < 80]))

    # the hierarchy, from the official supercategory names (not the evaluator's merged matrices)
    supers = dict(enumerate(meta.COCO_STUFF_SUPERCATEGORY))
    for level, group_of in (
        ("super", supers),
        ("scene", {c: meta.SUPERCATEGORY_PARENT[s] for c, s in supers.items()}),
        ("kind", {c: "things" if c < 80 else "stuff" for c in range(C)}),
    ):
        want = brute_level(gt, pred, group_of)
        for k, v in want.items():
            key = "mIoU_super" if (k, level) == ("mIoU", "super") else f"{k}-{level}"
            assert res[key] == pytest.approx(v), (level, k)
    g_sup = np.array([supers[c] for c in gt])
    p_sup = np.array([supers[c] for c in pred])
    animal = (g_sup == "animal-things")
    assert res["IoU-super-animal-things"] == pytest.approx(100 * (animal & (p_sup == "animal-things")).sum()
                                                           / (animal | (p_sup == "animal-things")).sum())
    in_plant = [v for c, v in iou.items() if supers[c] == "plant-stuff"]
    assert res["mIoU-in-plant-stuff"] == pytest.approx(100 * np.mean(in_plant))

    # 2017 Stuff Challenge: 91 stuff classes + "other" for every thing pixel
    challenge = {c: ("other" if c < 80 else f"s{c}") for c in range(C)}
    for k, v in brute_level(gt, pred, challenge).items():
        assert res["mIoU_challenge" if k == "mIoU" else f"{k}-challenge"] == pytest.approx(v), k
    challenge_super = {c: ("other" if c < 80 else supers[c]) for c in range(C)}
    for k, v in brute_level(gt, pred, challenge_super).items():
        assert res[f"{k}-challenge-super"] == pytest.approx(v), k

    # the copypaste lines carry the four class-level numbers and the breakdown's headline
    # numbers; the rest of the breakdown stays in the results dict (metrics.json, TensorBoard)
    headline = ["mIoU", "fwIoU", "mACC", "pACC", "mIoU_things", "mIoU_stuff", "mIoU_182", "mIoU_super",
                "mIoU_challenge"]
    assert [k for k in res if "-" not in k and not k.startswith(("IoU-", "ACC-"))] == headline
    assert set(HEADLINE_KEYS) <= set(res)
    assert {"mACC-things", "fwIoU-super", "pACC-scene", "mIoU-kind", "IoU-super-animal-things",
            "mIoU-in-plant-stuff", "mACC-challenge", "mIoU-challenge-super"} <= set(res)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="detectron2.evaluation.testing"):
        print_csv_format({"sem_seg": res})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("copypaste: ")]
    assert lines[1] == "copypaste: " + ",".join(headline)
    assert lines[2] == "copypaste: " + ",".join(f"{res[k]:.4f}" for k in headline)
    # the breakdown as tables in the log
    table = [r.getMessage() for r in logged if "COCO-Stuff breakdown of 'sem_seg'" in r.getMessage()]
    assert len(table) == 1
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table[0].splitlines() if line.startswith("|")}
    assert rows["supercategories (27)"] == [f"{res[k]:.2f}" for k in ("mIoU_super", "fwIoU-super", "mACC-super",
                                                                       "pACC-super")]
    assert rows["things (80 classes)"][0] == f"{res['mIoU_things']:.2f}"
    assert rows["2017 challenge (91 stuff + other)"][0] == f"{res['mIoU_challenge']:.2f}"
    assert rows["plant-stuff"] == [f"{res['IoU-super-plant-stuff']:.2f}", f"{res['mIoU-in-plant-stuff']:.2f}"]
    saved = json.load(open(os.path.join(tmp_path, "out", "breakdown_sem_seg.json")))
    assert saved["metrics"]["mIoU_super"] == pytest.approx(res["mIoU_super"])
    assert os.path.isfile(os.path.join(tmp_path, "out", "confusion_sem_seg.json"))


def test_coco_stuff_evaluator_needs_the_hierarchy(write_label_dataset):
    name = write_label_dataset("no_hierarchy", [np.zeros((4, 4), np.uint8)], 3)
    delattr(MetadataCatalog.get(name), "evaluator_type")
    MetadataCatalog.get(name).set(evaluator_type="coco_stuff_sem_seg")
    with pytest.raises(ValueError, match="stuff_hierarchy"):
        Trainer.build_evaluator(tiny_cfg(num_classes=3), name)
