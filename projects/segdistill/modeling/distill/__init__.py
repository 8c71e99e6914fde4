"""Distillation: the tap contract, the registry of distillation losses, one loss per file.

Importing the package imports every module in it, so each ``@register_distill_loss`` class
registers itself (and its config keys, through its ``add_config``) with no list to keep:
a new loss is one new file here (docs/distillation.md shows one). ``MODEL.DISTILL.LOSSES``
names the losses.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from .base import (  # noqa: F401
    CONNECTORS, DISTILL_LOSSES, DistillBatch, DistillLoss, TapPair, TemperedLogitsLoss, build_connector,
    build_distill_losses, distill_losses_from_names, register_distill_loss, unregister_distill_loss,
)
from .taps import (  # noqa: F401
    HEAD_FEATURES, LOGITS, SegmentorTaps, SemanticSegmentorTaps, StudentTaps, register_tap_adapter, segmentor_taps,
)

for _module in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_module.name}")
