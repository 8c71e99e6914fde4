# Lazy-config twin of dist.yaml (see lazy_base.py):
#   python train_net.py --config-file configs/demo/distill/dist.py
from .lazy_base import dataloader, lr_multiplier, model, optimizer, train

model.losses.names = ["dist"]
train.output_dir = "output/demo/distill/dist_lazy"
