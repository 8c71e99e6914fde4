# Cityscapes: DeepLabV3 on a dilated MobileNetV2 (HWD's student; CIRKD layout, no aux head). Lazy twin of deeplabv3_mbv2.yaml (same model and schedule).
from ...common.zoo import deeplabv3
from ...common.cityscapes_data import NUM_CLASSES, dataloader
from ...common.baseline_schedule import lr_multiplier, optimizer, train, use_schedule  # noqa: F401

model = deeplabv3("mobilenetv2_100", NUM_CLASSES, aspp_channels=128)
model.backbone.pretrained = "mobilenetv2_100.ra_in1k"  # ImageNet start (offline: model.backbone.pretrained="")

use_schedule(dataloader, "cityscapes_40k_cirkd", "output/cityscapes/baseline/deeplabv3_mbv2_lazy")
