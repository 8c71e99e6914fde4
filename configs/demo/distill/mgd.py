# Lazy-config twin of mgd.yaml (see lazy_base.py):
#   python train_net.py --config-file configs/demo/distill/mgd.py
from .lazy_base import dataloader, lr_multiplier, model, optimizer, train

model.losses.names = ["mgd", "cwd"]
train.output_dir = "output/demo/distill/mgd_lazy"
