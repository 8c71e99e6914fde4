# Lazy-config twin of fitnet.yaml (see lazy_base.py):
#   python train_net.py --config-file configs/demo/distill/fitnet.py
from .lazy_base import dataloader, lr_multiplier, model, optimizer, train

model.losses.names = ["pd", "fitnet"]
train.output_dir = "output/demo/distill/fitnet_lazy"
