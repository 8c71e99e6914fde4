"""(Re-)registering a semantic-segmentation dataset under a name another library may have taken."""
from __future__ import annotations

from typing import Callable, List

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["register_sem_seg"]


def register_sem_seg(name: str, loader: Callable[[], List[dict]], **metadata) -> None:
    """Register ``loader`` as ``name`` with ``metadata`` (``evaluator_type`` ``sem_seg`` and
    ignore 255 unless given), replacing an earlier registration of the name (detectron2's
    own ADE20K names, a test's fixture root)."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**{"ignore_label": 255, "evaluator_type": "sem_seg", **metadata})
