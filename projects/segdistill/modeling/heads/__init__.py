"""Segmentation heads registered in detectron2's SEM_SEG_HEADS_REGISTRY."""
from .base import AuxFCNHead, SegHeadMixin, build_aux_head, check_seg_head, safe_cross_entropy, upsample_logits
from .deeplab import SegDeepLabV3Head, SegDeepLabV3PlusHead
from .fcn import FCNHead
from .hrnetv2 import HRNetV2Head
from .isa import ISAHead
from .ocr import OCRHead
from .psp import PSPHead

__all__ = [
    "SegHeadMixin", "AuxFCNHead", "build_aux_head", "check_seg_head", "safe_cross_entropy", "upsample_logits",
    "SegDeepLabV3Head", "SegDeepLabV3PlusHead", "FCNHead",
    "PSPHead", "OCRHead", "HRNetV2Head", "ISAHead",
]
