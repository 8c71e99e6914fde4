"""Models: timm backbones and heads with exposed features (registered on import)."""
from .backbones import HRNetBackbone, TimmBackbone, build_timm_backbone
from .heads import FCNHead, SegDeepLabV3Head, SegDeepLabV3PlusHead, SegHeadMixin, head_outputs
