# Lazy-config twin of pd.yaml (see lazy_base.py):
#   python train_net.py --config-file configs/demo/distill/pd.py
from .lazy_base import dataloader, lr_multiplier, model, optimizer, train

model.losses.names = ["pd"]
train.output_dir = "output/demo/distill/pd_lazy"
