# Lazy-config twin of afdcd.yaml (see lazy_base.py):
#   python train_net.py --config-file configs/demo/distill/afdcd.py
from .lazy_base import dataloader, lr_multiplier, model, optimizer, train

model.losses.names = ["pd", "afdcd"]
train.output_dir = "output/demo/distill/afdcd_lazy"
