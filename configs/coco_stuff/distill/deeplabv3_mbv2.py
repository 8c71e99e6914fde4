# Lazy twin of deeplabv3_mbv2.yaml: the baseline student ../baseline/deeplabv3_mbv2.py taught by
# ../baseline/deeplabv3_r101.yaml (trained first), HWD/FAKD's distillation setting. The method is
# model.losses.names (default CWD), e.g. 'model.losses.names=[pd,skd]' (docs/distillation.md).
from ..baseline.deeplabv3_mbv2 import dataloader, lr_multiplier, model, optimizer, train
from ...common.distill import paper_distillation_schedule, paper_distiller

model = paper_distiller(model, "coco_stuff")
paper_distillation_schedule(dataloader, optimizer, train, "output/coco_stuff/distill/deeplabv3_mbv2_lazy")
