# Lazy-config twin of fakd_cwd.yaml (see lazy_base.py):
#   python train_net.py --config-file configs/demo/distill/fakd_cwd.py
from detectron2.config import LazyCall as L
from segdistill.modeling.losses.feature_aug import FeatureAugmentedCWD

from .lazy_base import dataloader, lr_multiplier, model, optimizer, train

model.losses = [L(FeatureAugmentedCWD)(tau=4.0, loss_weight=3.0)]
train.output_dir = "output/demo/distill/fakd_cwd_lazy"
