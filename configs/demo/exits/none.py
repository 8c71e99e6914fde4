# Lazy-config twin of none.yaml: the same model without exits (plain training).
from .sr import dataloader, lr_multiplier, model, optimizer, train

model.exits = None
model.final_classifier = None
model.objective = None
model.eval_exits = False
train.output_dir = "output/demo/exits/none_lazy"
