# COCO-Stuff-164k (171 classes) as lazy config objects; the lazy twin of
# configs/coco_stuff/Base-COCO-Stuff.yaml: short side 512 x (0.5-2.0), 512x512 crops,
# flip, batch 8; evaluation with the short side at 512.
from .sem_seg_data import sem_seg_dataloader

NUM_CLASSES = 171
dataloader = sem_seg_dataloader(
    "coco_2017_train_stuff_sem_seg", "coco_2017_val_stuff_sem_seg", NUM_CLASSES,
    crop=(512, 512), base_size=(512, 2048), batch=8, test_short_side=512,
)

# COCO-Stuff's evaluator: the 171-class metrics plus things/stuff, supercategories and the
# 2017 challenge protocol (docs/datasets.md).
from segdistill.evaluation import CocoStuffEvaluator  # noqa: E402

dataloader.evaluator._target_ = CocoStuffEvaluator
