# Lazy twin of deeplabv3_r101_teacher.yaml: HWD Table III teacher, CIRKD's DeepLabV3-ResNet101.
from ...common.reproduce import cirkd_deeplabv3, hwd_setting

model = cirkd_deeplabv3(101, aspp_channels=256, aux_channels=256)
dataloader, optimizer, lr_multiplier, train = hwd_setting("output/reproduce/hwd/deeplabv3_r101_teacher_lazy")
train.init_checkpoint = "checkpoints/cirkd/deeplabv3_resnet101_citys_best_model.pth"
