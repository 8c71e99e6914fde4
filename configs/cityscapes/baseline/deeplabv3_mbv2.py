# Cityscapes: DeepLabV3 on a dilated MobileNetV2 (HWD's student; CIRKD layout, no aux head). Lazy twin of deeplabv3_mbv2.yaml (same model and schedule).
from ...common.zoo import deeplabv3
from ...common.cityscapes_data import NUM_CLASSES, dataloader
from ...common.optim import SGD as optimizer
from ...common.schedule import poly_lr_multiplier as lr_multiplier
from ...common.train import train

model = deeplabv3("mobilenetv2_100", NUM_CLASSES, aspp_channels=128)

dataloader.train.total_batch_size = 8
optimizer.lr = 0.02
optimizer.weight_decay = 0.0001
lr_multiplier.warmup_length = 0.0
train.max_iter = 40000
train.checkpointer.period = 4000
train.eval_period = 4000
train.output_dir = "output/cityscapes/baseline/deeplabv3_mbv2_lazy"
