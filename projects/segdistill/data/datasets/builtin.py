"""Register the project's datasets in detectron2's catalogs (on import of segdistill).

Registration happens on package import, never in ``setup()`` or ``__main__``, so that
worker processes started by ``launch()`` see the same catalog. Roots are read from the
environment at import: ``$DETECTRON2_DATASETS`` (default ``./datasets``) and
``$SEGDISTILL_CAMVID_ROOT``; each dataset module's ``register_*`` re-registers it elsewhere,
and every one registers through :func:`.registration.register_sem_seg`.
"""
from __future__ import annotations

from .ade20k import register_ade20k
from .camvid import camvid_root, register_camvid
from .cityscapes import register_cityscapes
from .coco_stuff import register_coco_stuff
from .demo import register_demo
from .pascal_context import register_pascal_context
from .pascal_voc import register_pascal_voc
from .paths import datasets_root

__all__ = ["register_all"]


def register_all() -> None:
    root = datasets_root()
    register_demo(root)
    register_camvid(camvid_root())
    register_coco_stuff(root)
    register_cityscapes(root)
    register_ade20k(root)
    register_pascal_voc(root)
    register_pascal_context(root)
