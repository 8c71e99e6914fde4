# COCO-Stuff-164k: DeepLabV3 on a dilated ResNet-101 (HWD's teacher; CIRKD layout). Lazy twin of deeplabv3_r101.yaml (same model and schedule).
from ...common.zoo import deeplabv3
from ...common.coco_stuff_data import NUM_CLASSES, dataloader
from ...common.baseline_schedule import lr_multiplier, optimizer, train, use_schedule  # noqa: F401

model = deeplabv3("resnet101", NUM_CLASSES, aspp_channels=256, aux_channels=256)
model.backbone.pretrained = "resnet101.tv_in1k"  # ImageNet start (offline: model.backbone.pretrained="")

use_schedule(dataloader, "coco_stuff_80k_cirkd", "output/coco_stuff/baseline/deeplabv3_r101_lazy")
