"""Register the project's datasets in detectron2's catalogs (on import of segdistill).

Registration happens on package import, never in ``setup()`` or ``__main__``, so that
worker processes started by ``launch()`` see the same catalog.
"""
from __future__ import annotations

import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from .camvid import register_camvid
from .demo import DEMO_CLASSES, DEMO_COLORS, DEMO_SPECS, demo_split_dirs, ensure_demo_dataset
from .folder import load_sem_seg_folder
from .paths import datasets_root

__all__ = ["register_all"]


def _load_demo(name: str, split: str):
    folder = ensure_demo_dataset(name)
    image_dir, label_dir = demo_split_dirs(folder, split)
    return load_sem_seg_folder(
        image_dir, label_dir, dataset_name=f"{name}_{split}",
        layout_help=f"The demo dataset is generated under $DETECTRON2_DATASETS/{name}/ "
        f"(now {os.path.abspath(folder)}); delete that folder to regenerate it.",
    )


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
    register_camvid(os.environ.get("SEGDISTILL_CAMVID_ROOT") or os.path.join(root, "camvid"))
