"""PASCAL VOC 2012 semantic segmentation, with SBD's augmented training set (21 classes).

Names: ``voc_2012_sem_seg_train`` (1464 images), ``voc_2012_sem_seg_val`` (1449) and
``voc_2012_sem_seg_train_aug`` (10582: VOC train + SBD train + SBD val, minus VOC val; FAKD
Table 3's "10582, 1449" and mmsegmentation's ``voc12aug``). Labels: 0 = background,
1..20 the classes, 255 = the void boundaries (ignored).

Layout under ``$DETECTRON2_DATASETS`` (default ``./datasets``)::

    VOCdevkit/VOC2012/
      JPEGImages/*.jpg                                   VOCtrainval_11-May-2012.tar
      SegmentationClass/*.png                            (official palette PNGs)
      ImageSets/Segmentation/{train,val}.txt
      SegmentationClassAug/*.png                         made by datasets/prepare_voc_sbd.py
      ImageSets/Segmentation/train_aug.txt               made by datasets/prepare_voc_sbd.py
    VOCdevkit/VOCaug/dataset/{cls/*.mat,train.txt,val.txt}  SBD (benchmark.tgz: benchmark_RELEASE/dataset)

Each split is a list of image ids; loading checks that the list exists, that every id has its
image and label, and the labels' sizes and values like every dataset of the project
(:mod:`.folder`).
"""
from __future__ import annotations

import os
from typing import List, Optional

from .folder import DatasetLayoutError, _names, verify_sem_seg_dicts
from .palette import voc_colormap
from .pascal_meta import VOC_CLASSES
from .paths import datasets_root
from .registration import register_sem_seg

__all__ = ["VOC_CLASSES", "VOC_SPLITS", "load_split_list", "load_voc_sem_seg", "register_pascal_voc"]

#: dataset name -> (list file under ImageSets/Segmentation, label folder)
VOC_SPLITS = {
    "voc_2012_sem_seg_train": ("train.txt", "SegmentationClass"),
    "voc_2012_sem_seg_val": ("val.txt", "SegmentationClass"),
    "voc_2012_sem_seg_train_aug": ("train_aug.txt", "SegmentationClassAug"),
}
VOC_DIR = os.path.join("VOCdevkit", "VOC2012")
PREPARE = "python datasets/prepare_voc_sbd.py"

_LAYOUT = """PASCAL VOC 2012 is expected under $DETECTRON2_DATASETS (now {d2!r}):
  {root}/VOCdevkit/VOC2012/JPEGImages/*.jpg, SegmentationClass/*.png, ImageSets/Segmentation/{{train,val}}.txt
                                                          (VOCtrainval_11-May-2012.tar)
  {root}/VOCdevkit/VOCaug/dataset/{{cls/*.mat,train.txt,val.txt}}   (SBD, benchmark.tgz)
  {root}/VOCdevkit/VOC2012/SegmentationClassAug/*.png and ImageSets/Segmentation/train_aug.txt
                                                          made by `{prepare}`
See datasets/README.md."""


def _layout_help(root: str) -> str:
    return _LAYOUT.format(root=root, d2=os.environ.get("DETECTRON2_DATASETS", "./datasets (unset)"), prepare=PREPARE)


def load_split_list(list_file: str, image_dir: str, label_dir: str, *, dataset_name: str, layout_help: str,
                    image_ext: str = ".jpg", label_ext: str = ".png", missing_help: str = "") -> List[dict]:
    """Dataset dicts of the image ids in ``list_file`` (one id per line, first column); every id
    must have ``image_dir/<id><image_ext>`` and ``label_dir/<id><label_ext>``."""
    for kind, path, isdir in (("list", list_file, False), ("image", image_dir, True), ("label", label_dir, True)):
        if not (os.path.isdir(path) if isdir else os.path.isfile(path)):
            raise DatasetLayoutError(
                f"Dataset '{dataset_name}': {kind} {'folder' if isdir else 'file'} {path!r} does not exist."
                f"{(' ' + missing_help) if missing_help else ''}\n{layout_help}"
            )
    with open(list_file) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    if not ids:
        raise DatasetLayoutError(f"Dataset '{dataset_name}': {list_file!r} lists no image.\n{layout_help}")
    dicts, no_image, no_label = [], [], []
    for i in ids:
        image, label = os.path.join(image_dir, i + image_ext), os.path.join(label_dir, i + label_ext)
        if not os.path.isfile(image):
            no_image.append(i)
        if not os.path.isfile(label):
            no_label.append(i)
        dicts.append({"file_name": image, "sem_seg_file_name": label, "image_id": i})
    problems = []
    if no_image:
        problems.append(f"{len(no_image)} of {len(ids)} listed images are not in {image_dir!r}: {_names(no_image)}")
    if no_label:
        problems.append(f"{len(no_label)} of {len(ids)} listed images have no label in {label_dir!r}: {_names(no_label)}")
    if problems:
        raise DatasetLayoutError(f"Dataset '{dataset_name}' ({list_file}): " + "; ".join(problems) + f".\n{layout_help}")
    return dicts


def load_voc_sem_seg(root: str, name: str, check: Optional[str] = None) -> List[dict]:
    list_name, label_dir = VOC_SPLITS[name]
    voc = os.path.join(root, VOC_DIR)
    help_ = _layout_help(root)
    made = f"It is made by `{PREPARE}`." if label_dir == "SegmentationClassAug" else ""
    dicts = load_split_list(
        os.path.join(voc, "ImageSets", "Segmentation", list_name), os.path.join(voc, "JPEGImages"),
        os.path.join(voc, label_dir), dataset_name=name, layout_help=help_, missing_help=made,
    )
    verify_sem_seg_dicts(dicts, dataset_name=name, num_classes=len(VOC_CLASSES), ignore_value=255, mode=check,
                         fix_help=help_)
    return dicts


def register_pascal_voc(root: Optional[str] = None) -> None:
    """Register ``voc_2012_sem_seg_{train,val,train_aug}`` over ``root`` (default $DETECTRON2_DATASETS)."""
    root = root or datasets_root()
    voc = os.path.join(root, VOC_DIR)
    for name, (_, label_dir) in VOC_SPLITS.items():
        register_sem_seg(
            name, lambda r=root, n=name: load_voc_sem_seg(r, n),
            stuff_classes=list(VOC_CLASSES),
            stuff_colors=voc_colormap(len(VOC_CLASSES)),
            image_root=os.path.join(voc, "JPEGImages"),
            sem_seg_root=os.path.join(voc, label_dir),
        )
