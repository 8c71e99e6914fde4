# Lazy-config twin of hwd.yaml (see lazy_base.py):
#   python train_net.py --config-file configs/demo/distill/hwd.py
from detectron2.config import LazyCall as L
from segdistill.modeling.losses.channel_wise import HolisticWeightedDistillation

from .lazy_base import dataloader, lr_multiplier, model, optimizer, train

model.losses = [L(HolisticWeightedDistillation)(tau=4.0, loss_weight=3.0, beta=0.1, mu=1.0, sigma=1.0)]
train.output_dir = "output/demo/distill/hwd_lazy"
