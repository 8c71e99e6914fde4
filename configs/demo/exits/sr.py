# Lazy-config twin of sr.yaml: Self-Regulation on the demo DeepLabV3-R18 with exits on res2..res4.
# ds.py and none.py derive from this file.
from detectron2.config import LazyCall as L
from segdistill.modeling.exits import MultiLabelClassifier, SelfRegulationObjective, build_exit_heads
from segdistill.modeling.meta_arch.multi_exit import MultiExitSegmentor

from ...common.demo_data import IGNORE, NUM_CLASSES, dataloader
from ...common.demo_model import PIXEL_MEAN, PIXEL_STD, RESNET18_OS8, demo_backbone, demo_deeplabv3_head, shapes
from ...common.optim import SGD as optimizer
from ...common.schedule import poly_lr_multiplier as lr_multiplier
from ...common.train import train

STAGES = RESNET18_OS8  # (channels, stride) of the stages the exits and the head read
EXIT_CHANNELS = 64  # the paper's 256 scaled like the backbone (ResNet-18 is 1/4 as wide as ResNet-101)
HEAD_CHANNELS = 128

model = L(MultiExitSegmentor)(
    backbone=demo_backbone(out_features=STAGES),
    sem_seg_head=demo_deeplabv3_head(aspp_channels=HEAD_CHANNELS),
    pixel_mean=PIXEL_MEAN,
    pixel_std=PIXEL_STD,
    exits=L(build_exit_heads)(
        input_shape=shapes(STAGES),
        in_features=["res2", "res3", "res4"],
        num_classes=NUM_CLASSES,
        channels=EXIT_CHANNELS,
        common_stride=8,
        norm="BN",
        with_classifier=True,
        max_downsample=2,
    ),
    final_classifier=L(MultiLabelClassifier)(in_channels=HEAD_CHANNELS, num_classes=NUM_CLASSES),
    objective=L(SelfRegulationObjective)(
        cls_weight=0.2, seg_weight=0.8, seg_weight_includes_final=False, f_weight=1.0, l_weight=1.0,
        variant="paper", detach_teacher=True,
        warmup_iters=0, temperature=1.0, anneal_factor=1.05, anneal_threshold=0.5, ignore_value=IGNORE,
    ),
    eval_exits=True,  # per-exit mIoU (sem_seg_res2, ...) next to the final one
    fusion=None,
)

optimizer.lr = 0.02
train.max_iter = 800
train.device = "cpu"
train.output_dir = "output/demo/exits/sr_lazy"
