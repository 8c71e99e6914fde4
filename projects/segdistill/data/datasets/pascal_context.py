"""PASCAL-Context with 59 classes (FAKD Table 2, Self-Regulation Table 5).

Names: ``pascal_context_59_sem_seg_{train,val}`` (4998 / 5105 images: PASCAL VOC 2010's
``Main`` train/val sets, which PASCAL-Context annotates). Labels 0..58 are the 59 most
frequent classes (alphabetical, as mmsegmentation's ``PascalContextDataset59``); every other
pixel (the background and the 400 rarer classes) is 255 and ignored, the usual "59 classes
without background" protocol (FAKD reports mmsegmentation's, which ignores the background
the same way).

Layout under ``$DETECTRON2_DATASETS`` (default ``./datasets``), the one detectron2 projects
built on Mask2Former use::

    VOCdevkit/VOC2010/
      JPEGImages/*.jpg                              VOCtrainval_03-May-2010.tar
      ImageSets/Main/{train,val}.txt
      trainval/*.mat, labels.txt                    PASCAL-Context trainval.tar.gz (459-class LabelMap)
      annotations_detectron2/pc59_{train,val}/*.png made by datasets/prepare_pascal_context.py
"""
from __future__ import annotations

import os
from typing import List, Optional

from .folder import DatasetLayoutError, _list, verify_sem_seg_dicts
from .palette import spread_colors
from .pascal_meta import PC59, PC59_CLASSES, PC59_IDS
from .paths import datasets_root
from .registration import register_sem_seg

__all__ = ["PC59", "PC59_CLASSES", "PC59_IDS", "PASCAL_CONTEXT_SPLITS", "load_pascal_context_59", "register_pascal_context"]

PASCAL_CONTEXT_SPLITS = {"pascal_context_59_sem_seg_train": "train", "pascal_context_59_sem_seg_val": "val"}
VOC2010_DIR = os.path.join("VOCdevkit", "VOC2010")
LABEL_DIR = "annotations_detectron2"
PREPARE = "python datasets/prepare_pascal_context.py"

_LAYOUT = """PASCAL-Context is expected under $DETECTRON2_DATASETS (now {d2!r}):
  {root}/VOCdevkit/VOC2010/JPEGImages/*.jpg, ImageSets/Main/{{train,val}}.txt  (VOCtrainval_03-May-2010.tar)
  {root}/VOCdevkit/VOC2010/trainval/*.mat, labels.txt                     (PASCAL-Context trainval.tar.gz)
  {root}/VOCdevkit/VOC2010/annotations_detectron2/pc59_{{train,val}}/*.png made by `{prepare}`
See datasets/README.md."""


def _layout_help(root: str) -> str:
    return _LAYOUT.format(root=root, d2=os.environ.get("DETECTRON2_DATASETS", "./datasets (unset)"), prepare=PREPARE)


def load_pascal_context_59(root: str, split: str, check: Optional[str] = None) -> List[dict]:
    name = {v: k for k, v in PASCAL_CONTEXT_SPLITS.items()}[split]
    base = os.path.join(root, VOC2010_DIR)
    label_dir = os.path.join(base, LABEL_DIR, f"pc59_{split}")
    image_dir = os.path.join(base, "JPEGImages")
    help_ = _layout_help(root)
    if not os.path.isdir(label_dir):
        raw = os.path.join(base, "trainval")
        hint = (f"the PASCAL-Context annotations {raw!r} are there: convert them with\n  {PREPARE}\n"
                if os.path.isdir(raw) else "")
        raise DatasetLayoutError(f"Dataset '{name}': label folder {label_dir!r} does not exist; {hint}{help_}")
    if not os.path.isdir(image_dir):
        raise DatasetLayoutError(f"Dataset '{name}': image folder {image_dir!r} does not exist.\n{help_}")
    labels = _list(label_dir, ".png")
    missing = sorted(s for s in labels if not os.path.isfile(os.path.join(image_dir, s + ".jpg")))
    if missing:
        raise DatasetLayoutError(
            f"Dataset '{name}': {len(missing)} of {len(labels)} labels have no image in {image_dir!r}: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}.\n{help_}"
        )
    if not labels:
        raise DatasetLayoutError(f"Dataset '{name}': no label in {label_dir!r}; re-run `{PREPARE}`.\n{help_}")
    dicts = [{"file_name": os.path.join(image_dir, s + ".jpg"), "sem_seg_file_name": labels[s], "image_id": s}
             for s in sorted(labels)]
    verify_sem_seg_dicts(dicts, dataset_name=name, num_classes=59, ignore_value=255, mode=check,
                         fix_help=f"Labels with values above 58 are not converted ones: run `{PREPARE}`.\n" + help_)
    return dicts


def register_pascal_context(root: Optional[str] = None) -> None:
    """Register ``pascal_context_59_sem_seg_{train,val}`` over ``root`` (default $DETECTRON2_DATASETS)."""
    root = root or datasets_root()
    base = os.path.join(root, VOC2010_DIR)
    for name, split in PASCAL_CONTEXT_SPLITS.items():
        register_sem_seg(
            name, lambda r=root, s=split: load_pascal_context_59(r, s),
            stuff_classes=list(PC59_CLASSES),
            stuff_colors=spread_colors(59),
            image_root=os.path.join(base, "JPEGImages"),
            sem_seg_root=os.path.join(base, LABEL_DIR, f"pc59_{split}"),
        )
