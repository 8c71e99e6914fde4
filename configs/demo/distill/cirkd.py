# Lazy-config twin of cirkd.yaml (see lazy_base.py):
#   python train_net.py --config-file configs/demo/distill/cirkd.py
from .lazy_base import dataloader, lr_multiplier, model, optimizer, train

model.losses.names = ["pd", "cirkd"]
model.losses.opts += ["MODEL.DISTILL.CIRKD.PIXEL_MEMORY_SIZE", 2000, "MODEL.DISTILL.CIRKD.REGION_MEMORY_SIZE", 200]
train.output_dir = "output/demo/distill/cirkd_lazy"
