# Lazy twin of deeplabv3plus_mv2_student.yaml: FAKD Table 3 student Deeplab-MV2 trained alone
# (mmsegmentation's deeplabv3plus_m-v2-d8), from mmcls's ImageNet MobileNetV2.
from ...common.reproduce import fakd_setting, mmseg_deeplabv3plus, mv2

CHECKPOINT = "https://download.openmmlab.com/mmclassification/v0/mobilenet_v2/mobilenet_v2_batch256_imagenet_20200708-3b2dc3af.pth"
model = mmseg_deeplabv3plus(mv2(["res2", "res4", "res5"], checkpoint=CHECKPOINT), "mobilenetv2_100")
dataloader, optimizer, lr_multiplier, train = fakd_setting("output/reproduce/fakd/deeplabv3plus_mv2_student_lazy")
