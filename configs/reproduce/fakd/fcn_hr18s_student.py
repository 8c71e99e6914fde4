# Lazy twin of fcn_hr18s_student.yaml: FAKD Table 3 student HRNet18s trained alone, from
# OpenMMLab's ImageNet HRNetV2-W18-Small.
from ...common.reproduce import fakd_setting, mmseg_fcn_hrnet

model = mmseg_fcn_hrnet("hrnet_w18_small_v2", checkpoint="https://download.openmmlab.com/pretrain/third_party/hrnetv2_w18_small-b5a04e21.pth")
dataloader, optimizer, lr_multiplier, train = fakd_setting("output/reproduce/fakd/fcn_hr18s_student_lazy")
