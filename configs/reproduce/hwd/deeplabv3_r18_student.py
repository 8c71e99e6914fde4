# Lazy twin of deeplabv3_r18_student.yaml: HWD Table III student DeepLabV3-ResNet18 trained
# alone, from CIRKD's ImageNet ResNet-18.
from ...common.reproduce import cirkd_deeplabv3, hwd_setting

model = cirkd_deeplabv3(18, aspp_channels=128, aux_channels=64, checkpoint="https://github.com/winycg/CIRKD/releases/download/backbonev0.1/resnet18-imagenet.pth")
dataloader, optimizer, lr_multiplier, train = hwd_setting("output/reproduce/hwd/deeplabv3_r18_student_lazy")
