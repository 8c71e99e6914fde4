# Lazy-config twin of deeplabv3_r18.yaml: DeepLabV3 on a dilated ResNet-18, demo dataset, CPU.
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling import SemanticSegmentor
from segdistill.modeling import SegDeepLabV3Head, TimmBackbone

from ..common.demo_data import IGNORE, NUM_CLASSES, dataloader
from ..common.optim import SGD as optimizer
from ..common.schedule import poly_lr_multiplier as lr_multiplier
from ..common.train import train

model = L(SemanticSegmentor)(
    backbone=L(TimmBackbone)(model_name="resnet18", output_stride=8, out_features=["res5"]),
    sem_seg_head=L(SegDeepLabV3Head)(
        input_shape={"res5": L(ShapeSpec)(channels=512, stride=8)},
        in_feature="res5",
        num_classes=NUM_CLASSES,
        aspp_channels=128,
        aspp_dilations=[3, 6, 9],
        aspp_dropout=0.1,
        norm="BN",
        ignore_value=IGNORE,
        loss_type="cross_entropy",
    ),
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
)

optimizer.lr = 0.02
train.max_iter = 800
train.device = "cpu"
train.output_dir = "output/demo/deeplabv3_r18_lazy"
