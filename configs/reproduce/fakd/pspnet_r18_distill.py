# Lazy twin of pspnet_r18_distill.yaml: FAKD ("Ours", CWD-aug) from PSPNet-R101 to PSPnet-R18.
from ...common.reproduce import distiller, fakd_setting, mmseg_pspnet

model = distiller(
    mmseg_pspnet(18, channels=128, aux_channels=64, checkpoint="https://download.openmmlab.com/pretrain/third_party/resnet18_v1c-b5776b93.pth"),
    "configs/reproduce/fakd/pspnet_r101_teacher.yaml",
    "https://download.openmmlab.com/mmsegmentation/v0.5/pspnet/pspnet_r101-d8_512x1024_80k_cityscapes/pspnet_r101-d8_512x1024_80k_cityscapes_20200606_112211-e1e1100f.pth",
    loss="fakd_cwd",
)
dataloader, optimizer, lr_multiplier, train = fakd_setting("output/reproduce/fakd/pspnet_r18_distill_lazy")
