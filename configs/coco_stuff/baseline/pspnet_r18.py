# COCO-Stuff-164k: PSPNet on a dilated ResNet-18 (HWD's student; CIRKD layout). Lazy twin of pspnet_r18.yaml (same model and schedule).
from ...common.zoo import pspnet
from ...common.coco_stuff_data import NUM_CLASSES, dataloader
from ...common.baseline_schedule import lr_multiplier, optimizer, train, use_schedule  # noqa: F401

model = pspnet("resnet18", NUM_CLASSES, pool_channels=128, channels=128, aux_channels=64)
model.backbone.pretrained = "resnet18.tv_in1k"  # ImageNet start (offline: model.backbone.pretrained="")

use_schedule(dataloader, "coco_stuff_80k_cirkd", "output/coco_stuff/baseline/pspnet_r18_lazy")
