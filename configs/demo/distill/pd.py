# Lazy-config twin of pd.yaml (see lazy_base.py):
#   python train_net.py --config-file configs/demo/distill/pd.py
from detectron2.config import LazyCall as L
from segdistill.modeling.losses.pixel_wise import PixelWiseDistillation

from .lazy_base import dataloader, lr_multiplier, model, optimizer, train

model.losses = [L(PixelWiseDistillation)(temperature=1.0, loss_weight=1.0)]
train.output_dir = "output/demo/distill/pd_lazy"
