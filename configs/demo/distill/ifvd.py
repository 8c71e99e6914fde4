# Lazy-config twin of ifvd.yaml (see lazy_base.py):
#   python train_net.py --config-file configs/demo/distill/ifvd.py
from .lazy_base import dataloader, lr_multiplier, model, optimizer, train

model.losses.names = ["pd", "ifvd"]
train.output_dir = "output/demo/distill/ifvd_lazy"
