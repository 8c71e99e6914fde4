# Lazy twin of deeplabv3plus_r101_teacher.yaml: FAKD Table 3 teacher DeepLabV3+-R101
# (mmsegmentation's deeplabv3plus_r101-d8).
from ...common.reproduce import fakd_setting, mmseg_deeplabv3plus, v1c

model = mmseg_deeplabv3plus(v1c(101, ["res2", "res4", "res5"]), "resnet101")
dataloader, optimizer, lr_multiplier, train = fakd_setting("output/reproduce/fakd/deeplabv3plus_r101_teacher_lazy")
train.init_checkpoint = "https://download.openmmlab.com/mmsegmentation/v0.5/deeplabv3plus/deeplabv3plus_r101-d8_512x1024_80k_cityscapes/deeplabv3plus_r101-d8_512x1024_80k_cityscapes_20200606_114143-068fcfe9.pth"
