# Cityscapes: DeepLabV3+ on a dilated ResNet-101 (output stride 16; detectron2's layout). Lazy twin of deeplabv3plus_r101.yaml (same model and schedule).
from ...common.zoo import deeplabv3plus
from ...common.cityscapes_data import NUM_CLASSES, dataloader
from ...common.baseline_schedule import lr_multiplier, optimizer, train, use_schedule  # noqa: F401

model = deeplabv3plus("resnet101", NUM_CLASSES)
model.backbone.pretrained = "resnet101.tv_in1k"  # ImageNet start (offline: model.backbone.pretrained="")

use_schedule(dataloader, "cityscapes_40k", "output/cityscapes/baseline/deeplabv3plus_r101_lazy")
