"""Training-time losses, one file per family (Self-Regulation, pixel-wise, channel-wise, feature-augmented)."""
from .self_regulation import DeepSupervisionObjective, SelfRegulationObjective  # noqa: F401
from .hs3 import HS3Objective  # noqa: F401  (registers MODEL.EXITS.MODE "hs3")
from . import channel_wise, covariance, feature_aug, pixel_wise  # noqa: F401  (distillation: PD, CWD, HWD, FAKD)
