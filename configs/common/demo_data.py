# Data loaders and evaluator of the built-in demo dataset, as lazy config objects.
from omegaconf import OmegaConf

from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.data import transforms as T
from segdistill.data import RandomResizeRatio, SemSegDatasetMapper, build_sem_seg_train_loader
from segdistill.evaluation import SemSegEvaluator

NUM_CLASSES = 10
IGNORE = 255

dataloader = OmegaConf.create()
dataloader.train = L(build_sem_seg_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="segdistill_demo_train"),
    mapper=L(SemSegDatasetMapper)(
        is_train=True,
        augmentations=[
            L(RandomResizeRatio)(ratio_range=(0.75, 1.5)),
            L(T.FixedSizeCrop)(crop_size=(128, 128), pad=True, pad_value=128.0, seg_pad_value=IGNORE),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="RGB",
        num_classes=NUM_CLASSES,
        ignore_value=IGNORE,
    ),
    total_batch_size=8,
    num_workers=1,
    aspect_ratio_grouping=False,
    seed="${...train.seed}",  # resumable order and per-sample augmentation seeds (segdistill.data.build)
    on_unreadable="stop",  # or "skip": files that cannot be decoded (listed in skipped_files)
    skipped_files="${...train.output_dir}/skipped_files.txt",
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="segdistill_demo_val", filter_empty=False),
    mapper=L(SemSegDatasetMapper)(
        is_train=False, augmentations=[], image_format="RGB", num_classes=NUM_CLASSES, ignore_value=IGNORE
    ),
    num_workers=1,
)
dataloader.evaluator = L(SemSegEvaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${...train.output_dir}/inference",
)
