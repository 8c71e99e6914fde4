# Lazy twin of isanet_r18_student.yaml: FAKD Table 3 student ISANet-R18 trained alone, from
# OpenMMLab's ImageNet ResNetV1c-18.
from ...common.reproduce import fakd_setting, mmseg_isanet

model = mmseg_isanet(18, channels=128, isa_channels=64, aux_channels=64, align_corners=False,
                     checkpoint="https://download.openmmlab.com/pretrain/third_party/resnet18_v1c-b5776b93.pth")
dataloader, optimizer, lr_multiplier, train = fakd_setting("output/reproduce/fakd/isanet_r18_student_lazy")
