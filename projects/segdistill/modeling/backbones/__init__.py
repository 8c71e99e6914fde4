"""Backbones registered in detectron2's BACKBONE_REGISTRY."""
from .norm import convert_norm
from .timm_backbone import HRNetBackbone, TimmBackbone, build_timm_backbone, load_body_checkpoint

__all__ = ["TimmBackbone", "HRNetBackbone", "build_timm_backbone", "load_body_checkpoint", "convert_norm"]
