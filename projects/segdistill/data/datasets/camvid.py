"""CamVid in the SegNet distribution: 11 classes, label 11 = void (mapped to ignore 255).

Layout (root = ``$SEGDISTILL_CAMVID_ROOT`` or ``$DETECTRON2_DATASETS/camvid``)::

    camvid/
      train/ trainannot/    *.png, same file names (367 images, 480x360)
      val/   valannot/      (101)
      test/  testannot/     (233)

Registered as ``camvid_{train,val,test}``. The label files keep their raw values; the
records carry ``sem_seg_value_map`` ({11: 255}), which the mapper and the evaluator apply
where they read a label. Loading checks the layout and, once per version of the files,
every label's size and values (see :mod:`.folder`).
"""
from __future__ import annotations

import os
from typing import List, Optional

from .folder import load_sem_seg_folder, verify_sem_seg_dicts
from .paths import datasets_root
from .registration import keep_registered, register_sem_seg

__all__ = ["CAMVID_CLASSES", "CAMVID_COLORS", "CAMVID_VALUE_MAP", "CAMVID_SPLITS", "camvid_root",
           "load_camvid", "register_camvid"]

CAMVID_CLASSES = ["sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car", "pedestrian", "bicyclist"]
CAMVID_COLORS = [
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (0, 0, 192), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
]
CAMVID_VOID = 11
CAMVID_SPLITS = ("train", "val", "test")
ROOT_ENV = "SEGDISTILL_CAMVID_ROOT"

_LAYOUT = """CamVid is expected in the SegNet layout:
  {root}/train/*.png  {root}/trainannot/*.png
  {root}/val/*.png    {root}/valannot/*.png
  {root}/test/*.png   {root}/testannot/*.png
(single-channel labels 0..10, 11 = void). Set SEGDISTILL_CAMVID_ROOT to the folder, or put it
at $DETECTRON2_DATASETS/camvid (DETECTRON2_DATASETS now: {d2}). See datasets/README.md."""

# Raw value -> training label, applied where labels are read (mapper, evaluator).
CAMVID_VALUE_MAP = {CAMVID_VOID: 255}


def camvid_root() -> str:
    """``$SEGDISTILL_CAMVID_ROOT`` or ``$DETECTRON2_DATASETS/camvid``."""
    return os.path.expanduser(os.environ.get(ROOT_ENV) or os.path.join(datasets_root(), "camvid"))


def _layout_help(root: str) -> str:
    return _LAYOUT.format(root=root, d2=os.environ.get("DETECTRON2_DATASETS", "./datasets (unset)"))


def load_camvid(root: str, split: str, check: Optional[str] = None) -> List[dict]:
    """Dataset dicts of one split; layout and label errors name the files and the fix."""
    name = f"camvid_{split}"
    dicts = load_sem_seg_folder(
        os.path.join(root, split), os.path.join(root, split + "annot"),
        dataset_name=name, layout_help=_layout_help(root),
    )
    verify_sem_seg_dicts(
        dicts, dataset_name=name, num_classes=len(CAMVID_CLASSES), ignore_value=255,
        value_map=CAMVID_VALUE_MAP, fix_help=_layout_help(root), mode=check,
    )
    for d in dicts:
        d["sem_seg_value_map"] = CAMVID_VALUE_MAP  # one shared dict, not a copy per image
    return dicts


_load = load_camvid  # older name


def register_camvid(root: Optional[str] = None, replace: bool = False) -> None:
    """Register ``camvid_{train,val,test}`` over ``root`` (default :func:`camvid_root`).

    ``replace=True`` re-registers names that exist (tests pointing at another root).
    """
    root = root or camvid_root()
    for split in CAMVID_SPLITS:
        register_sem_seg(
            f"camvid_{split}", lambda r=root, s=split: load_camvid(r, s), keep=None if replace else keep_registered,
            stuff_classes=list(CAMVID_CLASSES),
            stuff_colors=[list(c) for c in CAMVID_COLORS],
            image_root=os.path.join(root, split),
            sem_seg_root=os.path.join(root, split + "annot"),
            sem_seg_value_map=dict(CAMVID_VALUE_MAP),
        )
