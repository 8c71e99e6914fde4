# Lazy-config twin of hwd.yaml (see lazy_base.py):
#   python train_net.py --config-file configs/demo/distill/hwd.py
from .lazy_base import dataloader, lr_multiplier, model, optimizer, train

model.losses.names = ["hwd"]
train.output_dir = "output/demo/distill/hwd_lazy"
