# Lazy twin of deeplabv3_r18_distill.yaml: HWD (the authors' recommended run) from
# DeepLabV3-ResNet101 to DeepLabV3-ResNet18.
from ...common.reproduce import cirkd_deeplabv3, distiller, hwd_setting

model = distiller(
    cirkd_deeplabv3(18, aspp_channels=128, aux_channels=64, checkpoint="https://github.com/winycg/CIRKD/releases/download/backbonev0.1/resnet18-imagenet.pth"),
    "configs/reproduce/hwd/deeplabv3_r101_teacher.yaml",
    "checkpoints/cirkd/deeplabv3_resnet101_citys_best_model.pth",
    loss="hwd",
)
dataloader, optimizer, lr_multiplier, train = hwd_setting("output/reproduce/hwd/deeplabv3_r18_distill_lazy")
