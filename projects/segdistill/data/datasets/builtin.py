"""Register the project's datasets in detectron2's catalogs (on import of segdistill).

Registration happens on package import, never in ``setup()`` or ``__main__``, so that
worker processes started by ``launch()`` see the same catalog. Roots are read from the
environment at import: ``$DETECTRON2_DATASETS`` (default ``./datasets``) and
``$SEGDISTILL_CAMVID_ROOT``; ``register_*`` functions re-register a dataset elsewhere.
"""
from __future__ import annotations

import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from .ade20k import register_ade20k
from .camvid import camvid_root, register_camvid
from .cityscapes import register_cityscapes
from .coco_stuff import register_coco_stuff
from .demo import DEMO_CLASSES, DEMO_COLORS, DEMO_SPECS, demo_split_dirs, ensure_demo_dataset
from .folder import load_sem_seg_folder, verify_sem_seg_dicts
from .pascal_context import register_pascal_context
from .pascal_voc import register_pascal_voc
from .paths import datasets_root

__all__ = ["register_all", "register_demo"]


def _load_demo(name: str, split: str):
    folder = ensure_demo_dataset(name)
    image_dir, label_dir = demo_split_dirs(folder, split)
    help_ = (f"The demo dataset is generated under $DETECTRON2_DATASETS/{name}/ "
             f"(now {os.path.abspath(folder)}); delete that folder to regenerate it.")
    dicts = load_sem_seg_folder(image_dir, label_dir, dataset_name=f"{name}_{split}", layout_help=help_)
    verify_sem_seg_dicts(dicts, dataset_name=f"{name}_{split}", num_classes=len(DEMO_CLASSES), fix_help=help_)
    return dicts


def register_demo(root: str) -> None:
    """``segdistill_demo_{train,val}`` and ``segdistill_demo_mini_{train,val}``."""
    for name in DEMO_SPECS:
        for split in ("train", "val"):
            key = f"{name}_{split}"
            if key in DatasetCatalog.list():
                continue
            image_dir, label_dir = demo_split_dirs(os.path.join(root, name), split)
            DatasetCatalog.register(key, lambda n=name, s=split: _load_demo(n, s))
            MetadataCatalog.get(key).set(
                stuff_classes=list(DEMO_CLASSES),
                stuff_colors=[list(c) for c in DEMO_COLORS],
                ignore_label=255,
                evaluator_type="sem_seg",
                image_root=image_dir,
                sem_seg_root=label_dir,
            )


def register_all() -> None:
    root = datasets_root()
    register_demo(root)
    register_camvid(camvid_root())
    register_coco_stuff(root)
    register_cityscapes(root)
    register_ade20k(root)
    register_pascal_voc(root)
    register_pascal_context(root)
