# Lazy-config twin of at.yaml (see lazy_base.py):
#   python train_net.py --config-file configs/demo/distill/at.py
from .lazy_base import dataloader, lr_multiplier, model, optimizer, train

model.losses.names = ["pd", "at"]
train.output_dir = "output/demo/distill/at_lazy"
