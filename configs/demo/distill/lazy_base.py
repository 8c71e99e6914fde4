# Lazy-config twin of Base-Distill.yaml: the demo student (DeepLabV3, dilated MobileNetV2,
# ASPP 64) taught by the demo teacher (teacher.yaml, trained first), demo dataset, CPU.
# Each <loss>.py sets `model.losses.names` (the registered losses, with their defaults;
# `model.losses.opts` changes settings as KEY VALUE pairs); train with
#   python train_net.py --config-file configs/demo/distill/cwd.py
from detectron2.config import LazyCall as L
from segdistill.modeling.meta_arch import SemanticSegmentorAnySize
from segdistill.modeling.distill import distill_losses_from_names
from segdistill.modeling.meta_arch.distill import Distiller, build_teacher

from ...common.demo_data import IGNORE, dataloader
from ...common.demo_model import PIXEL_MEAN, PIXEL_STD, demo_backbone, demo_deeplabv3_head
from ...common.optim import SGD as optimizer
from ...common.schedule import poly_lr_multiplier as lr_multiplier
from ...common.train import train

student = L(SemanticSegmentorAnySize)(
    backbone=demo_backbone("mobilenetv2_100"),
    sem_seg_head=demo_deeplabv3_head(in_channels=320, aspp_channels=64),
    pixel_mean=PIXEL_MEAN,
    pixel_std=PIXEL_STD,
)

model = L(Distiller)(
    student=student,
    # The teacher from its own (YAML) config and trained weights; frozen, eval mode, no grad.
    teacher=L(build_teacher)(
        config_file="configs/demo/distill/teacher.yaml",
        weights="output/demo/distill/teacher/model_final.pth",
        allow_random=False,  # True: tests/benchmarks only
    ),
    teacher_name="configs/demo/distill/teacher.yaml",
    teacher_input_format="RGB",
    # set by each <loss>.py: the registered losses as MODEL.DISTILL.LOSSES names them
    losses=L(distill_losses_from_names)(names=[], opts=["MODEL.NORM", "BN"]),
    ignore_value=IGNORE,
    exclude_ignore=False,
    eval_teacher=True,  # the evaluator scores sem_seg_teacher too
    input_format="RGB",
)

optimizer.lr = 0.02
train.max_iter = 800
train.device = "cpu"
train.output_dir = "output/demo/distill/lazy"
