# Lazy-config twin of sr.yaml: Self-Regulation on the demo DeepLabV3-R18 with exits on res2..res4.
# ds.py and none.py derive from this file.
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from segdistill.modeling import SegDeepLabV3Head, TimmBackbone
from segdistill.modeling.exits import MultiLabelClassifier, build_exit_heads
from segdistill.modeling.losses.self_regulation import SelfRegulationObjective
from segdistill.modeling.meta_arch.multi_exit import MultiExitSegmentor

from ...common.demo_data import IGNORE, NUM_CLASSES, dataloader
from ...common.optim import SGD as optimizer
from ...common.schedule import poly_lr_multiplier as lr_multiplier
from ...common.train import train

# resnet18 at output stride 8: (channels, stride) of the stages exits and head read.
STAGES = {"res2": (64, 4), "res3": (128, 8), "res4": (256, 8), "res5": (512, 8)}
EXIT_CHANNELS = 64  # the paper's 256 scaled like the backbone (ResNet-18 is 1/4 as wide as ResNet-101)
HEAD_CHANNELS = 128

model = L(MultiExitSegmentor)(
    backbone=L(TimmBackbone)(model_name="resnet18", output_stride=8, out_features=list(STAGES)),
    sem_seg_head=L(SegDeepLabV3Head)(
        input_shape={"res5": L(ShapeSpec)(channels=512, stride=8)},
        in_feature="res5",
        num_classes=NUM_CLASSES,
        aspp_channels=HEAD_CHANNELS,
        aspp_dilations=[3, 6, 9],
        aspp_dropout=0.1,
        norm="BN",
        ignore_value=IGNORE,
        loss_type="cross_entropy",
    ),
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    exits=L(build_exit_heads)(
        input_shape={k: L(ShapeSpec)(channels=c, stride=s) for k, (c, s) in STAGES.items()},
        in_features=["res2", "res3", "res4"],
        num_classes=NUM_CLASSES,
        channels=EXIT_CHANNELS,
        common_stride=8,
        norm="BN",
        with_classifier=True,
    ),
    final_classifier=L(MultiLabelClassifier)(in_channels=HEAD_CHANNELS, num_classes=NUM_CLASSES),
    objective=L(SelfRegulationObjective)(
        cls_weight=0.2, seg_weight=0.8, f_weight=1.0, l_weight=1.0, variant="paper", detach_teacher=True,
        warmup_iters=0, temperature=1.0, anneal_factor=1.05, anneal_threshold=0.5, ignore_value=IGNORE,
    ),
    eval_exits=True,  # per-exit mIoU (sem_seg_res2, ...) next to the final one
)

optimizer.lr = 0.02
train.max_iter = 800
train.device = "cpu"
train.output_dir = "output/demo/exits/sr_lazy"
