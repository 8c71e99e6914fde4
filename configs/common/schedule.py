# "poly" learning-rate multiplier, (1 - iter / max_iter) ** 0.9, with a linear warm-up.
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler

poly_lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(PolynomialDecayParamScheduler)(base_value=1.0, power=0.9),
    warmup_length=0.05,  # fraction of train.max_iter
    warmup_factor=0.1,
    warmup_method="linear",
)
