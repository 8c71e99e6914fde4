"""Backbones registered in detectron2's BACKBONE_REGISTRY, and the stages their consumers ask for."""
from .norm import convert_norm
from .stages import backbone_stage_shapes, with_backbone_stages
from .timm_backbone import HRNetBackbone, TimmBackbone, build_timm_backbone, load_body_checkpoint

__all__ = ["TimmBackbone", "HRNetBackbone", "build_timm_backbone", "load_body_checkpoint", "convert_norm",
           "backbone_stage_shapes", "with_backbone_stages"]
