"""Distillation losses, one file per family (pixel-wise, channel-wise, feature-augmented).
The exit objectives (deep supervision, Self-Regulation, HS3) live in ``modeling/exits``."""
from . import channel_wise, covariance, feature_aug, pixel_wise  # noqa: F401  (distillation: PD, CWD, HWD, FAKD)
