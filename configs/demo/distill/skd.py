# Lazy-config twin of skd.yaml (see lazy_base.py):
#   python train_net.py --config-file configs/demo/distill/skd.py
from .lazy_base import dataloader, lr_multiplier, model, optimizer, train

model.losses.names = ["pd", "skd"]
train.output_dir = "output/demo/distill/skd_lazy"
