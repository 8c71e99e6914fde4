# Lazy-config twin of deeplabv3_r18.yaml: DeepLabV3 on a dilated ResNet-18, demo dataset, CPU.
from detectron2.config import LazyCall as L
from segdistill.modeling.meta_arch import SemanticSegmentorAnySize

from ..common.demo_data import dataloader
from ..common.demo_model import PIXEL_MEAN, PIXEL_STD, demo_backbone, demo_deeplabv3_head
from ..common.optim import SGD as optimizer
from ..common.schedule import poly_lr_multiplier as lr_multiplier
from ..common.train import train

model = L(SemanticSegmentorAnySize)(
    backbone=demo_backbone(),
    sem_seg_head=demo_deeplabv3_head(),
    pixel_mean=PIXEL_MEAN,
    pixel_std=PIXEL_STD,
)

optimizer.lr = 0.02
train.max_iter = 800
train.device = "cpu"
train.output_dir = "output/demo/deeplabv3_r18_lazy"
