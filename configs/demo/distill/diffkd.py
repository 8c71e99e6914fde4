# Lazy-config twin of diffkd.yaml (see lazy_base.py):
#   python train_net.py --config-file configs/demo/distill/diffkd.py
from .lazy_base import dataloader, lr_multiplier, model, optimizer, train

model.losses.names = ["pd", "diffkd"]
train.output_dir = "output/demo/distill/diffkd_lazy"
