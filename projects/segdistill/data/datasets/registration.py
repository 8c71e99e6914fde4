"""The one way the project registers a semantic-segmentation dataset in detectron2's catalogs."""
from __future__ import annotations

from typing import Callable, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata

__all__ = ["register_sem_seg", "keep_registered"]


def keep_registered(metadata: Metadata) -> bool:
    """A ``keep`` for :func:`register_sem_seg`: an existing registration stays as it is."""
    return True


def register_sem_seg(name: str, loader: Callable[[], List[dict]], *,
                     keep: Optional[Callable[[Metadata], bool]] = None, **metadata) -> None:
    """Register ``loader`` as ``name`` with ``metadata`` (``evaluator_type`` ``sem_seg`` and
    ignore 255 unless given).

    A name registered already (detectron2's own ADE20K and Cityscapes names, another
    project's COCO-Stuff, an earlier root of a test) is replaced, unless ``keep(its
    metadata)`` is true: then the existing registration stays.
    """
    if name in DatasetCatalog.list():
        if keep is not None and keep(MetadataCatalog.get(name)):
            return
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**{"ignore_label": 255, "evaluator_type": "sem_seg", **metadata})
