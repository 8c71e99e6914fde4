# Lazy-config twin of maskd.yaml (see lazy_base.py); make the tokens file first with the YAML twin:
#   python tools/maskd_tokens.py --config-file configs/demo/distill/maskd.yaml \
#       --output output/demo/distill/maskd_tokens.pth MODEL.DISTILL.MASKD.TOKENS.ITERATIONS 200
#   python train_net.py --config-file configs/demo/distill/maskd.py
from .lazy_base import dataloader, lr_multiplier, model, optimizer, train

model.losses.names = ["maskd"]
model.losses.opts = ["MODEL.NORM", "BN", "MODEL.DISTILL.MASKD.TOKENS_FILE", "output/demo/distill/maskd_tokens.pth"]
train.output_dir = "output/demo/distill/maskd_lazy"
