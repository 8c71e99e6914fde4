# Lazy-config twin of ds.yaml: deep supervision (every exit trained with the full-class CE).
from detectron2.config import LazyCall as L
from segdistill.modeling.exits import DeepSupervisionObjective

from .sr import IGNORE, dataloader, lr_multiplier, model, optimizer, train

model.exits.with_classifier = False
model.final_classifier = None
model.objective = L(DeepSupervisionObjective)(weight=1.0, ignore_value=IGNORE)
train.output_dir = "output/demo/exits/ds_lazy"
