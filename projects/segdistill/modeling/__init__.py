"""Models: timm backbones, heads with exposed features, meta-architectures (registered on import)."""
from . import meta_arch  # noqa: F401  (META_ARCH_REGISTRY)
from .backbones import HRNetBackbone, TimmBackbone, build_timm_backbone
from .heads import FCNHead, SegDeepLabV3Head, SegDeepLabV3PlusHead, SegHeadMixin, check_seg_head
from . import masked_exits, masked_heads, masked_hrnet  # noqa: F401  (masked execution of the exits, heads and HRNet: register_masked)
from .test_time import TestTimeSegmentor, build_test_time_model  # TEST.MODE / TEST.SLIDE / TEST.AUG.SCALES keys
