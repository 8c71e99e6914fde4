# Cityscapes fine (19 classes) as lazy config objects; the lazy twin of
# configs/cityscapes/Base-Cityscapes.yaml: rescale 0.5-2.0 of 1024x2048, 512x1024 crops,
# flip, batch 8; full-resolution evaluation.
from .sem_seg_data import sem_seg_dataloader

NUM_CLASSES = 19
dataloader = sem_seg_dataloader(
    "cityscapes_fine_sem_seg_train", "cityscapes_fine_sem_seg_val", NUM_CLASSES,
    crop=(512, 1024), base_size=(1024, 2048), batch=8,
)
