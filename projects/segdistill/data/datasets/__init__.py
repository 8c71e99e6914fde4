"""Dataset loaders and their registration in detectron2's catalogs."""
from .builtin import register_all
from .camvid import CAMVID_CLASSES, CAMVID_COLORS
from .demo import DEMO_CLASSES, DEMO_COLORS, DEMO_SPECS, ensure_demo_dataset, generate_scene
from .folder import DatasetLayoutError, load_sem_seg_folder
from .paths import datasets_root

register_all()
