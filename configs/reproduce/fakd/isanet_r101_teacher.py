# Lazy twin of isanet_r101_teacher.yaml: FAKD Table 3 teacher ISANet-R101 (mmsegmentation's
# isanet_r101-d8 769x769, align_corners=True).
from detectron2.config import LazyCall as L
from segdistill.modeling.test_time import TestTimeSegmentor

from ...common.reproduce import fakd_setting, mmseg_isanet

model = mmseg_isanet(101, channels=512, isa_channels=256, aux_channels=256, align_corners=True)
dataloader, optimizer, lr_multiplier, train = fakd_setting("output/reproduce/fakd/isanet_r101_teacher_lazy")
train.init_checkpoint = "https://download.openmmlab.com/mmsegmentation/v0.5/isanet/isanet_r101-d8_769x769_80k_cityscapes/isanet_r101-d8_769x769_80k_cityscapes_20210903_111319-24f71dfa.pth"
# mmsegmentation's protocol for its 769x769 models: 769x769 windows every 513 pixels.
test_time = L(TestTimeSegmentor)(mode="slide", crop_size=(769, 769), stride=(513, 513), align_corners=True)
