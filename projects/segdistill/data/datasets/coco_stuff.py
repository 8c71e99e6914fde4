"""COCO-Stuff-164k semantic segmentation: ``coco_2017_{train,val}_stuff_sem_seg``.

Layout under ``$DETECTRON2_DATASETS`` (default ``./datasets``)::

    coco/
      train2017/*.jpg  val2017/*.jpg                      COCO 2017 images
      stuffthingmaps/{train2017,val2017}/*.png            official maps (COCO id - 1, 255)
      stuffthingmaps_detectron2/{train2017,val2017}/*.png  made by datasets/prepare_coco_stuff_164k.py
                                                           (labels 0..170, 255 = ignore)

The 171 classes, their ids and the official hierarchy are in :mod:`.coco_stuff_meta`.
detectron2 itself registers no ``*_stuff_sem_seg`` name (only the panoptic
``coco_2017_*_panoptic_stuffonly``); a name registered earlier by another project (e.g.
MaskFormer's registration of the same name) is replaced, with a log line, so that the
metadata the evaluator needs (hierarchy, ``evaluator_type``) is ours.
"""
from __future__ import annotations

import colorsys
import logging
import os
from typing import List, Optional

from .coco_stuff_meta import (
    COCO_STUFF_CLASSES, COCO_STUFF_IDS, COCO_STUFF_IS_THING, COCO_STUFF_LEVELS, COCO_STUFF_SUPERCATEGORY,
    stuff_dataset_id_to_contiguous_id,
)
from .folder import DatasetLayoutError, load_sem_seg_folder, verify_sem_seg_dicts
from .paths import datasets_root
from .registration import register_sem_seg

__all__ = ["COCO_STUFF_SPLITS", "COCO_STUFF_COLORS", "load_coco_stuff_sem_seg", "register_coco_stuff",
           "coco_stuff_colors"]

logger = logging.getLogger(__name__)

#: dataset name -> COCO split folder.
COCO_STUFF_SPLITS = {
    "coco_2017_train_stuff_sem_seg": "train2017",
    "coco_2017_val_stuff_sem_seg": "val2017",
}
LABEL_DIR = "stuffthingmaps_detectron2"
RAW_LABEL_DIRS = ("stuffthingmaps", "stuffthingmaps_trainval2017")
PREPARE = "python datasets/prepare_coco_stuff_164k.py"

_LAYOUT = """COCO-Stuff-164k is expected under $DETECTRON2_DATASETS (now {d2!r}):
  {root}/coco/{{train2017,val2017}}/*.jpg                          COCO 2017 images
  {root}/coco/stuffthingmaps/{{train2017,val2017}}/*.png           official stuffthingmaps_trainval2017.zip
  {root}/coco/stuffthingmaps_detectron2/{{train2017,val2017}}/*.png made by `{prepare}`
See datasets/README.md."""


def coco_stuff_colors() -> List[List[int]]:
    """One RGB colour per class: detectron2's COCO colours where the id and name match, else
    evenly spread hues (deterministic)."""
    try:
        from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

        known = {c["id"]: (c["name"], c["color"]) for c in COCO_CATEGORIES}
    except ImportError:  # pragma: no cover
        known = {}
    colors = []
    for k, (cid, name) in enumerate(zip(COCO_STUFF_IDS, COCO_STUFF_CLASSES)):
        if cid in known and known[cid][0] == name:
            colors.append(list(known[cid][1]))
        else:
            h = (k * 0.618033988749895) % 1.0
            r, g, b = colorsys.hsv_to_rgb(h, 0.55 + 0.35 * ((k * 7) % 3) / 2, 0.65 + 0.3 * ((k * 5) % 2))
            colors.append([int(round(255 * x)) for x in (r, g, b)])
    return colors


COCO_STUFF_COLORS = coco_stuff_colors()


def _layout_help(root: str) -> str:
    return _LAYOUT.format(root=root, d2=os.environ.get("DETECTRON2_DATASETS", "./datasets (unset)"), prepare=PREPARE)


def load_coco_stuff_sem_seg(root: str, split: str, check: Optional[str] = None) -> List[dict]:
    """Dataset dicts of ``split`` (``train2017``/``val2017``) with converted 0..170 labels."""
    name = f"coco_2017_{split[:-4]}_stuff_sem_seg"
    coco = os.path.join(root, "coco")
    label_dir = os.path.join(coco, LABEL_DIR, split)
    if not os.path.isdir(label_dir):
        raw = [os.path.join(coco, d, split) for d in RAW_LABEL_DIRS if os.path.isdir(os.path.join(coco, d, split))]
        if raw:
            raise DatasetLayoutError(
                f"Dataset '{name}': the converted labels {label_dir!r} do not exist, but the official maps "
                f"{raw[0]!r} do. Convert them (ids -> 0..170, 255 = ignore) with:\n  {PREPARE}\n{_layout_help(root)}"
            )
    dicts = load_sem_seg_folder(
        os.path.join(coco, split), label_dir, dataset_name=name, layout_help=_layout_help(root),
        image_ext=".jpg", label_ext=".png",
    )
    verify_sem_seg_dicts(
        dicts, dataset_name=name, num_classes=len(COCO_STUFF_CLASSES), ignore_value=255, mode=check,
        fix_help=(f"Labels with values up to 181 are the official maps, not converted ones: run `{PREPARE}`.\n"
                  + _layout_help(root)),
    )
    return dicts


def register_coco_stuff(root: Optional[str] = None) -> None:
    """Register ``coco_2017_{train,val}_stuff_sem_seg`` over ``root`` (default $DETECTRON2_DATASETS),
    replacing a registration of the same names by another project."""
    root = root or datasets_root()

    def ours(metadata) -> bool:
        """Keep our own registration over the same root; replace another project's, saying so."""
        if metadata.get("evaluator_type") == "coco_stuff_sem_seg" and metadata.get("image_root") == os.path.join(
                root, "coco", COCO_STUFF_SPLITS[metadata.name]):
            return True
        logger.info("Replacing the registration of '%s' with segdistill's.", metadata.name)
        return False

    for name, split in COCO_STUFF_SPLITS.items():
        register_sem_seg(
            name, lambda r=root, s=split: load_coco_stuff_sem_seg(r, s), keep=ours,
            stuff_classes=list(COCO_STUFF_CLASSES),
            stuff_colors=[list(c) for c in COCO_STUFF_COLORS],
            stuff_dataset_id_to_contiguous_id=stuff_dataset_id_to_contiguous_id(),
            stuff_is_thing=list(COCO_STUFF_IS_THING),
            stuff_supercategories=list(COCO_STUFF_SUPERCATEGORY),
            stuff_hierarchy={level: list(groups) for level, groups in COCO_STUFF_LEVELS.items()},
            evaluator_type="coco_stuff_sem_seg",
            image_root=os.path.join(root, "coco", split),
            sem_seg_root=os.path.join(root, "coco", LABEL_DIR, split),
        )
