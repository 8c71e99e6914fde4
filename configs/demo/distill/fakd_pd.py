# Lazy-config twin of fakd_pd.yaml (see lazy_base.py):
#   python train_net.py --config-file configs/demo/distill/fakd_pd.py
from detectron2.config import LazyCall as L
from segdistill.modeling.losses.feature_aug import FeatureAugmentedPD

from .lazy_base import dataloader, lr_multiplier, model, optimizer, train

model.losses = [L(FeatureAugmentedPD)(temperature=1.0, loss_weight=1.0)]
train.output_dir = "output/demo/distill/fakd_pd_lazy"
