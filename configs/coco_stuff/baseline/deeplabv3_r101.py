# COCO-Stuff-164k: DeepLabV3 on a dilated ResNet-101 (HWD's teacher; CIRKD layout). Lazy twin of deeplabv3_r101.yaml (same model and schedule).
from ...common.zoo import deeplabv3
from ...common.coco_stuff_data import NUM_CLASSES, dataloader
from ...common.optim import SGD as optimizer
from ...common.schedule import poly_lr_multiplier as lr_multiplier
from ...common.train import train

model = deeplabv3("resnet101", NUM_CLASSES, aspp_channels=256, aux_channels=256)

dataloader.train.total_batch_size = 16
optimizer.lr = 0.02
optimizer.weight_decay = 0.0001
lr_multiplier.warmup_length = 0.0
train.max_iter = 80000
train.checkpointer.period = 8000
train.eval_period = 8000
train.output_dir = "output/coco_stuff/baseline/deeplabv3_r101_lazy"
