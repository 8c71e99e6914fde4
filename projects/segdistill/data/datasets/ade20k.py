"""ADE20K (SceneParsing, 150 classes): detectron2's ``ade20k_sem_seg_{train,val}``.

detectron2 registers these names over ``ADEChallengeData2016/annotations_detectron2`` (made
by its ``datasets/prepare_ade20k_sem_seg.py``) without checking anything. segdistill
re-registers the same names with the same metadata (detectron2's 150 class names,
``evaluator_type="sem_seg"``, ignore 255) plus colours, with a loader that checks the layout,
says when the official annotations are there but not converted, and checks the labels like
every dataset of the project (:mod:`.folder`).

Layout under ``$DETECTRON2_DATASETS`` (default ``./datasets``), as detectron2 and
Mask2Former document it::

    ADEChallengeData2016/
      images/{training,validation}/ADE_*.jpg                 20210 / 2000 images
      annotations/{training,validation}/ADE_*.png            official: 0 = other, 1..150 classes
      annotations_detectron2/{training,validation}/ADE_*.png made by datasets/prepare_ade20k_sem_seg.py:
                                                             0..149 classes, 255 = ignore
"""
from __future__ import annotations

import os
from typing import List, Optional

from .folder import DatasetLayoutError, load_sem_seg_folder, verify_sem_seg_dicts
from .palette import spread_colors
from .paths import datasets_root
from .registration import register_sem_seg

__all__ = ["ADE20K_SPLITS", "ade20k_classes", "load_ade20k_sem_seg", "register_ade20k"]

#: dataset name -> folder of the split.
ADE20K_SPLITS = {"ade20k_sem_seg_train": "training", "ade20k_sem_seg_val": "validation"}
ROOT_DIR = "ADEChallengeData2016"
LABEL_DIR = "annotations_detectron2"
PREPARE = "python datasets/prepare_ade20k_sem_seg.py"

_LAYOUT = """ADE20K is expected under $DETECTRON2_DATASETS (now {d2!r}):
  {root}/ADEChallengeData2016/images/{{training,validation}}/*.jpg                  ADEChallengeData2016.zip
  {root}/ADEChallengeData2016/annotations/{{training,validation}}/*.png             (official, 0 = other)
  {root}/ADEChallengeData2016/annotations_detectron2/{{training,validation}}/*.png  made by `{prepare}`
See datasets/README.md."""


def ade20k_classes() -> List[str]:
    """detectron2's 150 ADE20K class names (``ADE20K_SEM_SEG_CATEGORIES``), as detectron2 registers them."""
    from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES

    return list(ADE20K_SEM_SEG_CATEGORIES)


def _layout_help(root: str) -> str:
    return _LAYOUT.format(root=root, d2=os.environ.get("DETECTRON2_DATASETS", "./datasets (unset)"), prepare=PREPARE)


def load_ade20k_sem_seg(root: str, split: str, check: Optional[str] = None) -> List[dict]:
    """Dataset dicts of ``split`` (``training``/``validation``) with the converted labels."""
    name = {v: k for k, v in ADE20K_SPLITS.items()}[split]
    base = os.path.join(root, ROOT_DIR)
    label_dir = os.path.join(base, LABEL_DIR, split)
    raw = os.path.join(base, "annotations", split)
    if not os.path.isdir(label_dir) and os.path.isdir(raw):
        raise DatasetLayoutError(
            f"Dataset '{name}': the converted labels {label_dir!r} do not exist, but the official annotations "
            f"{raw!r} do. Convert them (1..150 -> 0..149, 0 -> 255) with:\n  {PREPARE}\n{_layout_help(root)}"
        )
    dicts = load_sem_seg_folder(os.path.join(base, "images", split), label_dir, dataset_name=name,
                                layout_help=_layout_help(root), image_ext=".jpg", label_ext=".png")
    verify_sem_seg_dicts(
        dicts, dataset_name=name, num_classes=150, ignore_value=255, mode=check,
        fix_help=(f"Labels with the value 150 are the official annotations, not converted ones: run `{PREPARE}`.\n"
                  + _layout_help(root)),
    )
    return dicts


def register_ade20k(root: Optional[str] = None) -> None:
    """(Re-)register ``ade20k_sem_seg_{train,val}`` over ``root`` with the checking loader."""
    root = root or datasets_root()
    classes = ade20k_classes()
    for name, split in ADE20K_SPLITS.items():
        register_sem_seg(
            name, lambda r=root, s=split: load_ade20k_sem_seg(r, s),
            stuff_classes=classes,
            stuff_colors=spread_colors(len(classes)),
            image_root=os.path.join(root, ROOT_DIR, "images", split),
            sem_seg_root=os.path.join(root, ROOT_DIR, LABEL_DIR, split),
        )
