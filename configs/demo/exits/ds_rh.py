# Lazy-config twin of ds_rh.yaml: deep supervision with ADP-C's RH exits (levels 3 / 2 / 1 on
# res2 / res3 / res4 by ADP-C's rule; head_options={"levels": [...]} sets them).
from .ds import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

model.exits.head = "rh"
model.exits.head_options = {}
train.output_dir = "output/demo/exits/ds_rh_lazy"
