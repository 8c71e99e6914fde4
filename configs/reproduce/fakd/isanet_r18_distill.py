# Lazy twin of isanet_r18_distill.yaml: FAKD ("Ours", CWD-aug) from ISANet-R101 to ISANet-R18.
from ...common.reproduce import distiller, fakd_setting, mmseg_isanet

model = distiller(
    mmseg_isanet(18, channels=128, isa_channels=64, aux_channels=64, align_corners=False,
                 checkpoint="https://download.openmmlab.com/pretrain/third_party/resnet18_v1c-b5776b93.pth"),
    "configs/reproduce/fakd/isanet_r101_teacher.yaml",
    "https://download.openmmlab.com/mmsegmentation/v0.5/isanet/isanet_r101-d8_769x769_80k_cityscapes/isanet_r101-d8_769x769_80k_cityscapes_20210903_111319-24f71dfa.pth",
    loss="fakd_cwd",
)
dataloader, optimizer, lr_multiplier, train = fakd_setting("output/reproduce/fakd/isanet_r18_distill_lazy")
