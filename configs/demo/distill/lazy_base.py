# Lazy-config twin of Base-Distill.yaml: the demo student (DeepLabV3, dilated MobileNetV2,
# ASPP 64) taught by the demo teacher (teacher.yaml, trained first), demo dataset, CPU.
# Each <loss>.py sets `model.losses`; train with
#   python train_net.py --config-file configs/demo/distill/cwd.py
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling import SemanticSegmentor
from segdistill.modeling import SegDeepLabV3Head, TimmBackbone
from segdistill.modeling.meta_arch.distill import Distiller, build_teacher

from ...common.demo_data import IGNORE, NUM_CLASSES, dataloader
from ...common.optim import SGD as optimizer
from ...common.schedule import poly_lr_multiplier as lr_multiplier
from ...common.train import train

student = L(SemanticSegmentor)(
    backbone=L(TimmBackbone)(model_name="mobilenetv2_100", output_stride=8, out_features=["res5"]),
    sem_seg_head=L(SegDeepLabV3Head)(
        input_shape={"res5": L(ShapeSpec)(channels=320, stride=8)},
        in_feature="res5",
        num_classes=NUM_CLASSES,
        aspp_channels=64,
        aspp_dilations=[3, 6, 9],
        aspp_dropout=0.1,
        norm="BN",
        ignore_value=IGNORE,
        loss_type="cross_entropy",
    ),
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
)

model = L(Distiller)(
    student=student,
    # The teacher from its own (YAML) config and trained weights; frozen, eval mode, no grad.
    teacher=L(build_teacher)(
        config_file="configs/demo/distill/teacher.yaml",
        weights="output/demo/distill/teacher/model_final.pth",
        allow_random=False,  # True: tests/benchmarks only
    ),
    losses=[],  # set by each <loss>.py: a list of loss modules, each with its loss_weight
    ignore_value=IGNORE,
    eval_teacher=True,  # the evaluator scores sem_seg_teacher too
    input_format="RGB",
    covariance="diagonal",  # FAKD only
    lambda0=1.0,
    lambda_schedule="cosine",
)

optimizer.lr = 0.02
train.max_iter = 800
train.device = "cpu"
train.output_dir = "output/demo/distill/lazy"
