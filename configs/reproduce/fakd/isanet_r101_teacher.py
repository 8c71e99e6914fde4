# Lazy twin of isanet_r101_teacher.yaml: FAKD Table 3 teacher ISANet-R101 (mmsegmentation's
# isanet_r101-d8 769x769, align_corners=True).
from ...common.reproduce import fakd_setting, mmseg_isanet

model = mmseg_isanet(101, channels=512, isa_channels=256, aux_channels=256, align_corners=True)
dataloader, optimizer, lr_multiplier, train = fakd_setting("output/reproduce/fakd/isanet_r101_teacher_lazy")
train.init_checkpoint = "https://download.openmmlab.com/mmsegmentation/v0.5/isanet/isanet_r101-d8_769x769_80k_cityscapes/isanet_r101-d8_769x769_80k_cityscapes_20210903_111319-24f71dfa.pth"
