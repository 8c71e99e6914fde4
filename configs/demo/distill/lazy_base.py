# Lazy-config twin of Base-Distill.yaml: the demo student (DeepLabV3, dilated MobileNetV2,
# ASPP 64) taught by the demo teacher (teacher.yaml, trained first), demo dataset, CPU.
# Each <loss>.py sets `model.losses`; train with
#   python train_net.py --config-file configs/demo/distill/cwd.py
from detectron2.config import LazyCall as L
from detectron2.modeling import SemanticSegmentor
from segdistill.modeling.meta_arch.distill import Distiller, build_teacher

from ...common.demo_data import IGNORE, dataloader
from ...common.demo_model import PIXEL_MEAN, PIXEL_STD, demo_backbone, demo_deeplabv3_head
from ...common.optim import SGD as optimizer
from ...common.schedule import poly_lr_multiplier as lr_multiplier
from ...common.train import train

student = L(SemanticSegmentor)(
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
