# Cityscapes: OCRNet on HRNetV2-W18 (HS3's baseline). Lazy twin of ocrnet_hrnetv2_w18.yaml (same model and schedule).
from ...common.zoo import ocrnet
from ...common.cityscapes_data import NUM_CLASSES, dataloader
from ...common.baseline_schedule import lr_multiplier, optimizer, train, use_schedule  # noqa: F401

model = ocrnet(18, NUM_CLASSES)
model.backbone.pretrained = "hrnet_w18.ms_aug_in1k"  # ImageNet start (offline: model.backbone.pretrained="")

use_schedule(dataloader, "cityscapes_hrnet", "output/cityscapes/baseline/ocrnet_hrnetv2_w18_lazy")
