# Lazy twin of fcn_hr18s_distill.yaml: FAKD ("Ours", CWD-aug) from HRNetV2-W48 to HRNet18s.
from ...common.reproduce import distiller, fakd_setting, mmseg_fcn_hrnet

model = distiller(
    mmseg_fcn_hrnet("hrnet_w18_small_v2", checkpoint="https://download.openmmlab.com/pretrain/third_party/hrnetv2_w18_small-b5a04e21.pth"),
    "configs/reproduce/fakd/fcn_hr48_teacher.yaml",
    "https://download.openmmlab.com/mmsegmentation/v0.5/hrnet/fcn_hr48_512x1024_160k_cityscapes/fcn_hr48_512x1024_160k_cityscapes_20200602_190946-59b7973e.pth",
    loss="fakd_cwd",
)
dataloader, optimizer, lr_multiplier, train = fakd_setting("output/reproduce/fakd/fcn_hr18s_distill_lazy")
