# COCO-Stuff-164k: PSPNet on a dilated ResNet-101 (CIRKD layout). Lazy twin of pspnet_r101.yaml (same model and schedule).
from ...common.zoo import pspnet
from ...common.coco_stuff_data import NUM_CLASSES, dataloader
from ...common.baseline_schedule import lr_multiplier, optimizer, train, use_schedule  # noqa: F401

model = pspnet("resnet101", NUM_CLASSES, pool_channels=512, channels=256, aux_channels=256)
model.backbone.pretrained = "resnet101.tv_in1k"  # ImageNet start (offline: model.backbone.pretrained="")

use_schedule(dataloader, "coco_stuff_80k_cirkd", "output/coco_stuff/baseline/pspnet_r101_lazy")
