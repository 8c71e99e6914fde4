# Lazy-config twin of cwd.yaml (see lazy_base.py):
#   python train_net.py --config-file configs/demo/distill/cwd.py
from .lazy_base import dataloader, lr_multiplier, model, optimizer, train

model.losses.names = ["cwd"]
train.output_dir = "output/demo/distill/cwd_lazy"
