# Lazy twin of pspnet_r101_teacher.yaml: FAKD Table 3 teacher PSPNet-R101 (mmsegmentation's
# pspnet_r101-d8, its model-zoo file converted when it loads).
#   python train_net.py --config-file configs/reproduce/fakd/pspnet_r101_teacher.py --eval-only
from ...common.reproduce import fakd_setting, mmseg_pspnet

model = mmseg_pspnet(101, channels=512, aux_channels=256)
dataloader, optimizer, lr_multiplier, train = fakd_setting("output/reproduce/fakd/pspnet_r101_teacher_lazy")
train.init_checkpoint = "https://download.openmmlab.com/mmsegmentation/v0.5/pspnet/pspnet_r101-d8_512x1024_80k_cityscapes/pspnet_r101-d8_512x1024_80k_cityscapes_20200606_112211-e1e1100f.pth"
