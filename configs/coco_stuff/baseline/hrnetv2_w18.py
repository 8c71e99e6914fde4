# COCO-Stuff-164k: HRNetV2-W18 (HS3's baseline). Lazy twin of hrnetv2_w18.yaml (same model and schedule).
from ...common.zoo import hrnetv2
from ...common.coco_stuff_data import NUM_CLASSES, dataloader
from ...common.baseline_schedule import lr_multiplier, optimizer, train, use_schedule  # noqa: F401

model = hrnetv2(18, NUM_CLASSES)
model.backbone.pretrained = "hrnet_w18.ms_aug_in1k"  # ImageNet start (offline: model.backbone.pretrained="")

use_schedule(dataloader, "coco_stuff_80k", "output/coco_stuff/baseline/hrnetv2_w18_lazy")
