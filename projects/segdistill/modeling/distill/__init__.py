"""Distillation: the tap contract, the registry of distillation losses, one loss per file.

``import segdistill`` registers every loss here; ``MODEL.DISTILL.LOSSES`` names them
(docs/distillation.md). A new loss is one file with one ``@register_distill_loss`` class.
"""
from .base import (  # noqa: F401
    CONNECTORS, DISTILL_LOSSES, DistillBatch, DistillLoss, TapPair, build_connector, build_distill_losses,
    distill_losses_from_names, register_distill_loss,
)
from .taps import (  # noqa: F401
    HEAD_FEATURES, LOGITS, SegmentorTaps, SemanticSegmentorTaps, StudentTaps, register_tap_adapter, segmentor_taps,
)
from . import at, cirkd, cwd, dist, fakd, fitnet, hwd, ifvd, mgd, pd, skd  # noqa: F401,E402  (registration)
