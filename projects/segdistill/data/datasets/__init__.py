"""Dataset loaders and their registration in detectron2's catalogs."""
from .ade20k import ADE20K_SPLITS, load_ade20k_sem_seg, register_ade20k
from .builtin import register_all
from .camvid import CAMVID_CLASSES, CAMVID_COLORS, load_camvid, register_camvid
from .cityscapes import CITYSCAPES_CLASSES, CITYSCAPES_COLORS, load_cityscapes_sem_seg, register_cityscapes
from .coco_stuff import COCO_STUFF_COLORS, load_coco_stuff_sem_seg, register_coco_stuff
from .coco_stuff_meta import COCO_STUFF_CLASSES, COCO_STUFF_IDS
from .demo import DEMO_CLASSES, DEMO_COLORS, DEMO_SPECS, ensure_demo_dataset, generate_scene, register_demo
from .folder import DatasetContentError, DatasetLayoutError, load_sem_seg_folder, verify_sem_seg_dicts
from .pascal_context import PC59_CLASSES, load_pascal_context_59, register_pascal_context
from .pascal_voc import VOC_CLASSES, load_voc_sem_seg, register_pascal_voc
from .paths import datasets_root
from .registration import register_sem_seg
from .user_folders import register_config_datasets, register_folder_dataset

__all__ = [
    "ADE20K_SPLITS", "load_ade20k_sem_seg", "register_ade20k", "register_all",
    "CAMVID_CLASSES", "CAMVID_COLORS", "load_camvid", "register_camvid",
    "CITYSCAPES_CLASSES", "CITYSCAPES_COLORS", "load_cityscapes_sem_seg", "register_cityscapes",
    "COCO_STUFF_COLORS", "load_coco_stuff_sem_seg", "register_coco_stuff", "COCO_STUFF_CLASSES", "COCO_STUFF_IDS",
    "DEMO_CLASSES", "DEMO_COLORS", "DEMO_SPECS", "ensure_demo_dataset", "generate_scene", "register_demo",
    "DatasetContentError", "DatasetLayoutError", "load_sem_seg_folder", "verify_sem_seg_dicts",
    "PC59_CLASSES", "load_pascal_context_59", "register_pascal_context",
    "VOC_CLASSES", "load_voc_sem_seg", "register_pascal_voc", "datasets_root", "register_sem_seg",
    "register_config_datasets", "register_folder_dataset",
]

register_all()
