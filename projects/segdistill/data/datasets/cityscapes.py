"""Cityscapes (fine) semantic segmentation: detectron2's ``cityscapes_fine_sem_seg_{train,val,test}``.

detectron2 registers these names with a loader that asserts only that the *first*
``*_gtFine_labelTrainIds.png`` exists. segdistill re-registers them (same names, same
metadata, ``evaluator_type="cityscapes_sem_seg"``, plus ``stuff_colors``,
``image_root``/``sem_seg_root``) with a loader that checks the layout, counts missing
labelTrainIds files and names the command that makes them, then checks the labels
(19 classes, ignore 255) like every dataset of the project (:mod:`.folder`).

Layout under ``$DETECTRON2_DATASETS`` (default ``./datasets``)::

    cityscapes/
      leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
      gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_polygons.json   (official)
                                    .../<...>_gtFine_labelTrainIds.png           (datasets/prepare_cityscapes.py)
"""
from __future__ import annotations

import os
from typing import List, Optional

from .folder import DatasetLayoutError, _list, _names, load_sem_seg_folder, verify_sem_seg_dicts
from .paths import datasets_root
from .registration import register_sem_seg

__all__ = ["CITYSCAPES_CLASSES", "CITYSCAPES_COLORS", "CITYSCAPES_THING_CLASSES", "load_cityscapes_sem_seg",
           "register_cityscapes"]

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]
CITYSCAPES_THING_CLASSES = ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
# The colours of the 19 train ids in cityscapesscripts' helpers/labels.py.
CITYSCAPES_COLORS = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]
SPLITS = ("train", "val", "test")
PREPARE = "python datasets/prepare_cityscapes.py"
IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit", "_gtFine_labelTrainIds"

_LAYOUT = """Cityscapes is expected under $DETECTRON2_DATASETS (now {d2!r}):
  {root}/cityscapes/leftImg8bit/{{train,val,test}}/<city>/*_leftImg8bit.png   (leftImg8bit_trainvaltest.zip)
  {root}/cityscapes/gtFine/{{train,val,test}}/<city>/*_gtFine_polygons.json   (gtFine_trainvaltest.zip)
  {root}/cityscapes/gtFine/{{train,val,test}}/<city>/*_gtFine_labelTrainIds.png made by `{prepare}`
See datasets/README.md."""


def _layout_help(root: str) -> str:
    return _LAYOUT.format(root=root, d2=os.environ.get("DETECTRON2_DATASETS", "./datasets (unset)"), prepare=PREPARE)


def load_cityscapes_sem_seg(root: str, split: str, check: Optional[str] = None) -> List[dict]:
    """Dataset dicts of one split, with our errors for a wrong layout or missing labelTrainIds."""
    name = f"cityscapes_fine_sem_seg_{split}"
    image_dir = os.path.join(root, "cityscapes", "leftImg8bit", split)
    gt_dir = os.path.join(root, "cityscapes", "gtFine", split)
    help_ = _layout_help(root)
    for kind, folder in (("image", image_dir), ("ground-truth", gt_dir)):
        if not os.path.isdir(folder):
            raise DatasetLayoutError(f"Dataset '{name}': {kind} folder {folder!r} does not exist.\n{help_}")
    images = {s[: -len(IMAGE_SUFFIX)] for s in _list(image_dir, ".png") if s.endswith(IMAGE_SUFFIX)}
    train_ids = {s[: -len(LABEL_SUFFIX)] for s in _list(gt_dir, ".png") if s.endswith(LABEL_SUFFIX)}
    missing = images - train_ids
    if missing and split != "test":
        polygons = len(_list(gt_dir, "_gtFine_polygons.json"))
        raise DatasetLayoutError(
            f"Dataset '{name}': {len(missing)} of {len(images)} images have no *{LABEL_SUFFIX}.png in {gt_dir!r} "
            f"({_names(missing)}); {polygons} *_gtFine_polygons.json files are there. Generate the train-id "
            f"labels (cityscapesscripts) with:\n  {PREPARE}\n{help_}"
        )
    dicts = load_sem_seg_folder(
        image_dir, gt_dir, dataset_name=name, layout_help=help_, image_suffix=IMAGE_SUFFIX,
        label_suffix=LABEL_SUFFIX, allow_unlabeled=split == "test",
    )
    verify_sem_seg_dicts(
        dicts, dataset_name=name, num_classes=len(CITYSCAPES_CLASSES), ignore_value=255, mode=check,
        fix_help=f"Labels other than train ids (0..18, 255) are not *_labelTrainIds.png: re-run `{PREPARE} --force`.\n"
        + help_,
    )
    return dicts


def register_cityscapes(root: Optional[str] = None) -> None:
    """(Re-)register ``cityscapes_fine_sem_seg_{train,val,test}`` over ``root`` with our loader."""
    root = root or datasets_root()
    for split in SPLITS:
        image_dir = os.path.join(root, "cityscapes", "leftImg8bit", split)
        gt_dir = os.path.join(root, "cityscapes", "gtFine", split)
        register_sem_seg(
            f"cityscapes_fine_sem_seg_{split}", lambda r=root, s=split: load_cityscapes_sem_seg(r, s),
            thing_classes=list(CITYSCAPES_THING_CLASSES),
            stuff_classes=list(CITYSCAPES_CLASSES),
            stuff_colors=[list(c) for c in CITYSCAPES_COLORS],
            evaluator_type="cityscapes_sem_seg",
            image_dir=image_dir,
            gt_dir=gt_dir,
            image_root=image_dir,
            sem_seg_root=gt_dir,
        )
