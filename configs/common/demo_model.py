# The demo's DeepLabV3 parts as lazy config objects, shared by the demo's lazy configs
# (baseline, exits, HS3, distillation student): a dilated timm backbone and the DeepLabV3
# head with small ASPP dilations for 128-160 px images.
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from segdistill.modeling import SegDeepLabV3Head, TimmBackbone

from .defaults import default_cfg
from .demo_data import IGNORE, NUM_CLASSES

_TIMM = default_cfg().MODEL.TIMM
_HEAD = default_cfg().MODEL.SEM_SEG_HEAD

PIXEL_MEAN = [123.675, 116.28, 103.53]
PIXEL_STD = [58.395, 57.12, 57.375]
# (channels, stride) of ResNet-18's stages at output stride 8.
RESNET18_OS8 = {"res2": (64, 4), "res3": (128, 8), "res4": (256, 8), "res5": (512, 8)}


def shapes(stages):
    """{name: ShapeSpec} of {name: (channels, stride)}."""
    return {k: L(ShapeSpec)(channels=c, stride=s) for k, (c, s) in stages.items()}


def demo_backbone(model_name="resnet18", out_features=("res5",)):
    return L(TimmBackbone)(
        model_name=model_name, output_stride=8, out_features=list(out_features), norm="BN", checkpoint="",
        checkpoint_format=_TIMM.CHECKPOINT_FORMAT, pretrained="", in_chans=3, stem_type=_TIMM.STEM_TYPE, stem_width=_TIMM.STEM_WIDTH,
        dilation_rule=_TIMM.DILATION_RULE, multi_grid=list(_TIMM.MULTI_GRID),
    )


def demo_deeplabv3_head(in_channels=512, aspp_channels=128, num_classes=NUM_CLASSES):
    """DeepLabV3 on the stride-8 res5 feature, ASPP dilations 3/6/9 (Base-Demo.yaml's head)."""
    return L(SegDeepLabV3Head)(
        input_shape={"res5": L(ShapeSpec)(channels=in_channels, stride=8)},
        in_feature="res5",
        num_classes=num_classes,
        aspp_channels=aspp_channels,
        aspp_dilations=[3, 6, 9],
        aspp_dropout=0.1,
        norm="BN",
        ignore_value=IGNORE,
        loss_type="cross_entropy",
        layout=_HEAD.LAYOUT,
        pool_kernel_size=None,
        use_depthwise_separable_conv=_HEAD.USE_DEPTHWISE_SEPARABLE_CONV,
        bottleneck_convs=_HEAD.ASPP_BOTTLENECK_CONVS,
        dropout=_HEAD.DROPOUT,
        loss_weight=_HEAD.LOSS_WEIGHT,
        align_corners=_HEAD.ALIGN_CORNERS,
        output_resize=_HEAD.OUTPUT_RESIZE,
        aux_head=None,
    )
