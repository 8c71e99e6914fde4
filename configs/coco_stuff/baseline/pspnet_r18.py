# COCO-Stuff-164k: PSPNet on a dilated ResNet-18 (HWD's student; CIRKD layout). Lazy twin of pspnet_r18.yaml (same model and schedule).
from ...common.zoo import pspnet
from ...common.coco_stuff_data import NUM_CLASSES, dataloader
from ...common.optim import SGD as optimizer
from ...common.schedule import poly_lr_multiplier as lr_multiplier
from ...common.train import train

model = pspnet("resnet18", NUM_CLASSES, pool_channels=128, channels=128, aux_channels=64)

dataloader.train.total_batch_size = 16
optimizer.lr = 0.02
optimizer.weight_decay = 0.0001
lr_multiplier.warmup_length = 0.0
train.max_iter = 80000
train.checkpointer.period = 8000
train.eval_period = 8000
train.output_dir = "output/coco_stuff/baseline/pspnet_r18_lazy"
