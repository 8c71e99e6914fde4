# Lazy twin of deeplabv3plus_mv2_distill.yaml: FAKD ("Ours", CWD-aug) from DeepLabV3+-R101 to Deeplab-MV2.
from ...common.reproduce import distiller, fakd_setting, mmseg_deeplabv3plus, mv2

CHECKPOINT = "https://download.openmmlab.com/mmclassification/v0/mobilenet_v2/mobilenet_v2_batch256_imagenet_20200708-3b2dc3af.pth"
model = distiller(
    mmseg_deeplabv3plus(mv2(["res2", "res4", "res5"], checkpoint=CHECKPOINT), "mobilenetv2_100"),
    "configs/reproduce/fakd/deeplabv3plus_r101_teacher.yaml",
    "https://download.openmmlab.com/mmsegmentation/v0.5/deeplabv3plus/deeplabv3plus_r101-d8_512x1024_80k_cityscapes/deeplabv3plus_r101-d8_512x1024_80k_cityscapes_20200606_114143-068fcfe9.pth",
    loss="fakd_cwd",
)
dataloader, optimizer, lr_multiplier, train = fakd_setting("output/reproduce/fakd/deeplabv3plus_mv2_distill_lazy")
