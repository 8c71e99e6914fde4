# Lazy twin of pspnet_r18_student.yaml: FAKD Table 3 student PSPnet-R18 trained alone, from
# OpenMMLab's ImageNet ResNetV1c-18.
from ...common.reproduce import fakd_setting, mmseg_pspnet

model = mmseg_pspnet(18, channels=128, aux_channels=64, checkpoint="https://download.openmmlab.com/pretrain/third_party/resnet18_v1c-b5776b93.pth")
dataloader, optimizer, lr_multiplier, train = fakd_setting("output/reproduce/fakd/pspnet_r18_student_lazy")
