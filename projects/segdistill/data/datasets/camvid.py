"""CamVid in the SegNet distribution: 11 classes, label 11 = void (mapped to ignore 255).

Layout (root = ``$SEGDISTILL_CAMVID_ROOT`` or ``$DETECTRON2_DATASETS/camvid``)::

    camvid/
      train/ trainannot/    *.png, same file names
      val/   valannot/
      test/  testannot/
"""
from __future__ import annotations

import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from .folder import load_sem_seg_folder

__all__ = ["CAMVID_CLASSES", "CAMVID_COLORS", "CAMVID_VALUE_MAP", "register_camvid"]

CAMVID_CLASSES = ["sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car", "pedestrian", "bicyclist"]
CAMVID_COLORS = [
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (0, 0, 192), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
]
CAMVID_VOID = 11

_LAYOUT = """CamVid is expected in the SegNet layout:
  {root}/train/*.png  {root}/trainannot/*.png
  {root}/val/*.png    {root}/valannot/*.png
  {root}/test/*.png   {root}/testannot/*.png
(labels 0..10, 11 = void). Set SEGDISTILL_CAMVID_ROOT to the folder, or put it at
$DETECTRON2_DATASETS/camvid (DETECTRON2_DATASETS now: {d2}). See datasets/README.md."""


# Raw value -> training label, applied where labels are read (mapper, evaluator).
CAMVID_VALUE_MAP = {CAMVID_VOID: 255}


def _load(root: str, split: str):
    dicts = load_sem_seg_folder(
        os.path.join(root, split), os.path.join(root, split + "annot"),
        dataset_name=f"camvid_{split}",
        layout_help=_LAYOUT.format(root=root, d2=os.environ.get("DETECTRON2_DATASETS", "./datasets (unset)")),
    )
    for d in dicts:
        d["sem_seg_value_map"] = CAMVID_VALUE_MAP  # one shared dict, not a copy per image
    return dicts


def register_camvid(root: str) -> None:
    for split in ("train", "val", "test"):
        name = f"camvid_{split}"
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda s=split: _load(root, s))
        MetadataCatalog.get(name).set(
            stuff_classes=list(CAMVID_CLASSES),
            stuff_colors=[list(c) for c in CAMVID_COLORS],
            ignore_label=255,
            evaluator_type="sem_seg",
            image_root=os.path.join(root, split),
            sem_seg_root=os.path.join(root, split + "annot"),
            sem_seg_value_map=dict(CAMVID_VALUE_MAP),
        )
