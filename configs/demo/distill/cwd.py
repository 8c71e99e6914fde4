# Lazy-config twin of cwd.yaml (see lazy_base.py):
#   python train_net.py --config-file configs/demo/distill/cwd.py
from detectron2.config import LazyCall as L
from segdistill.modeling.losses.channel_wise import ChannelWiseDistillation

from .lazy_base import dataloader, lr_multiplier, model, optimizer, train

model.losses = [L(ChannelWiseDistillation)(tau=4.0, loss_weight=3.0)]
train.output_dir = "output/demo/distill/cwd_lazy"
