# Lazy-config twin of fakd_cwd.yaml (see lazy_base.py):
#   python train_net.py --config-file configs/demo/distill/fakd_cwd.py
from .lazy_base import dataloader, lr_multiplier, model, optimizer, train

model.losses.names = ["fakd_cwd"]
train.output_dir = "output/demo/distill/fakd_cwd_lazy"
