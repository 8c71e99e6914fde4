# COCO-Stuff-164k: HRNetV2-W48. Lazy twin of hrnetv2_w48.yaml (same model and schedule).
from ...common.zoo import hrnetv2
from ...common.coco_stuff_data import NUM_CLASSES, dataloader
from ...common.optim import SGD as optimizer
from ...common.schedule import poly_lr_multiplier as lr_multiplier
from ...common.train import train

model = hrnetv2(48, NUM_CLASSES)

dataloader.train.total_batch_size = 16
optimizer.lr = 0.01
optimizer.weight_decay = 0.0005
lr_multiplier.warmup_length = 0.0
train.max_iter = 80000
train.checkpointer.period = 8000
train.eval_period = 8000
train.output_dir = "output/coco_stuff/baseline/hrnetv2_w48_lazy"
