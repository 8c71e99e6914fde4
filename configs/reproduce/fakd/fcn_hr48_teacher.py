# Lazy twin of fcn_hr48_teacher.yaml: FAKD Table 3 teacher HRNetV2-W48 (mmsegmentation's fcn_hr48).
from ...common.reproduce import fakd_setting, mmseg_fcn_hrnet

model = mmseg_fcn_hrnet("hrnet_w48")
dataloader, optimizer, lr_multiplier, train = fakd_setting("output/reproduce/fakd/fcn_hr48_teacher_lazy")
train.init_checkpoint = "https://download.openmmlab.com/mmsegmentation/v0.5/hrnet/fcn_hr48_512x1024_160k_cityscapes/fcn_hr48_512x1024_160k_cityscapes_20200602_190946-59b7973e.pth"
