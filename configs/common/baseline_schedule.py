# The training schedules of the Cityscapes and COCO-Stuff baselines, as their YAML twins'
# SOLVER sections give them: one call per lazy config (`use_schedule`) instead of the same
# eight assignments in every file. Import `optimizer`, `lr_multiplier` and `train` from here
# (lazy configs re-run each imported file, so these must be the objects `use_schedule` sets).
from .optim import SGD as optimizer
from .schedule import poly_lr_multiplier as lr_multiplier
from .train import train

# name -> (images per batch, iterations, SGD lr, weight decay); poly, no warm-up; a checkpoint
# and an evaluation every tenth of the schedule.
SCHEDULES = {
    # Base-Cityscapes.yaml: the papers' Cityscapes setting (CIRKD/HWD, mmsegmentation 40k)
    "cityscapes_40k": (8, 40000, 0.01, 0.0005),
    # CIRKD/HWD's ResNet and MobileNetV2 models (DeepLabV3, PSPNet) on it
    "cityscapes_40k_cirkd": (8, 40000, 0.02, 0.0001),
    # the HRNet / HRNet-OCR Cityscapes recipe HS3 builds on (484 epochs of 2975 images)
    "cityscapes_hrnet": (12, 120000, 0.01, 0.0005),
    # Base-COCO-Stuff.yaml with the 16-image batch of the 80k schedule
    "coco_stuff_80k": (16, 80000, 0.01, 0.0005),
    "coco_stuff_80k_cirkd": (16, 80000, 0.02, 0.0001),
}


def use_schedule(dataloader, name, output_dir):
    """Set the batch, optimizer, LR schedule and training length of ``SCHEDULES[name]``."""
    if name not in SCHEDULES:
        raise ValueError(f"Unknown baseline schedule {name!r}; choose from {sorted(SCHEDULES)}.")
    batch, max_iter, lr, weight_decay = SCHEDULES[name]
    dataloader.train.total_batch_size = batch
    optimizer.lr = lr
    optimizer.weight_decay = weight_decay
    lr_multiplier.warmup_length = 0.0
    train.max_iter = max_iter
    train.checkpointer.period = max_iter // 10
    train.eval_period = max_iter // 10
    train.output_dir = output_dir
