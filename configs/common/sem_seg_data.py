# Lazy data loaders and evaluator of a semantic-segmentation dataset, shared by the
# Cityscapes and COCO-Stuff lazy configs (configs/common/{cityscapes,coco_stuff}_data.py):
# random rescale -> crop (padded with the ignore value) -> flip for training, the image as
# is (or its short side resized) for testing, segdistill's SemSegEvaluator.
from omegaconf import OmegaConf

from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.data import transforms as T
from segdistill.data import RandomResizeRatio, SemSegDatasetMapper, build_sem_seg_train_loader
from segdistill.evaluation import SemSegEvaluator


def sem_seg_dataloader(train, test, num_classes, crop, base_size, batch=8, test_short_side=0,
                       test_max_size=2048, ignore=255, workers=4):
    test_augs = [L(T.ResizeShortestEdge)(short_edge_length=test_short_side, max_size=test_max_size)] \
        if test_short_side else []
    dataloader = OmegaConf.create()
    dataloader.train = L(build_sem_seg_train_loader)(
        dataset=L(get_detection_dataset_dicts)(names=train),
        mapper=L(SemSegDatasetMapper)(
            is_train=True,
            augmentations=[
                L(RandomResizeRatio)(ratio_range=(0.5, 2.0), base_size=base_size),
                L(T.FixedSizeCrop)(crop_size=crop, pad=True, pad_value=128.0, seg_pad_value=ignore),
                L(T.RandomFlip)(horizontal=True),
            ],
            image_format="RGB",
            num_classes=num_classes,
            ignore_value=ignore,
        ),
        total_batch_size=batch,
        num_workers=workers,
        aspect_ratio_grouping=False,
        seed="${...train.seed}",  # resumable order and per-sample augmentation seeds (segdistill.data.build)
        on_unreadable="stop",  # or "skip": files that cannot be decoded (listed in skipped_files)
        skipped_files="${...train.output_dir}/skipped_files.txt",
    )
    dataloader.test = L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names=test, filter_empty=False),
        mapper=L(SemSegDatasetMapper)(
            is_train=False, augmentations=test_augs, image_format="RGB", num_classes=num_classes,
            ignore_value=ignore,
        ),
        num_workers=workers,
    )
    dataloader.evaluator = L(SemSegEvaluator)(
        dataset_name="${..test.dataset.names}",
        output_dir="${...train.output_dir}/inference",
    )
    return dataloader
