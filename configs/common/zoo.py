# Lazy building blocks of the model zoo: the papers' segmentors as LazyCall trees.
#
# Each function returns `L(SemanticSegmentorAnySize)(...)` with a timm backbone and one of the
# project's heads, with the same layout as the YAML configs of configs/<dataset>/baseline/.
# Every norm layer follows NORM: BN on CPU / one GPU, SyncBN when several CUDA processes
# train (`auto_norm`, resolved when the model is built); set e.g.
# `model.backbone.norm="FrozenBN"` on the command line to change one part.

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from segdistill.modeling.meta_arch import SemanticSegmentorAnySize
from segdistill.modeling.backbones import HRNetBackbone, TimmBackbone
from segdistill.modeling.backbones.norm import auto_norm
from segdistill.modeling.heads import (
    AuxFCNHead,
    HRNetV2Head,
    OCRHead,
    PSPHead,
    SegDeepLabV3Head,
    SegDeepLabV3PlusHead,
)

from .defaults import default_cfg

IGNORE = 255
PIXEL_MEAN = [123.675, 116.28, 103.53]  # RGB, ImageNet statistics (timm)
PIXEL_STD = [58.395, 57.12, 57.375]
NORM = L(auto_norm)(device="${train.device}")
_TIMM = default_cfg().MODEL.TIMM
_HEAD = default_cfg().MODEL.SEM_SEG_HEAD

# Channels of res2..res5 of the timm bodies the zoo uses.
CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
    "mobilenetv2_100": (24, 32, 96, 320),
    "hrnet_w18": (18, 36, 72, 144),
    "hrnet_w18_small_v2": (18, 36, 72, 144),
    "hrnet_w48": (48, 96, 192, 384),
}
STAGES = ("res2", "res3", "res4", "res5")


def stage_shapes(name, output_stride, features):
    """{stage: ShapeSpec} of `features` of backbone `name` at `output_stride` (dilated stages stop there)."""
    if name not in CHANNELS:
        raise ValueError(f"configs/common/zoo.py knows the stages of {sorted(CHANNELS)}, not {name!r}")
    shapes = {}
    for i, stage in enumerate(STAGES):
        if stage in features:
            shapes[stage] = L(ShapeSpec)(channels=CHANNELS[name][i], stride=min(4 * 2**i, output_stride))
    # A plain dict of ShapeSpecs once instantiated (a DictConfig would pass for a config in
    # @configurable); the target is a string because omegaconf cannot hold the type `dict`.
    return L("builtins.dict")(**shapes)


def backbone(name, output_stride, features, **layout):
    """The timm backbone `name`; `layout`: TimmBackbone's / HRNetBackbone's other arguments
    (stem_type, stem_width, dilation_rule, multi_grid / fuse_upsample, checkpoint, pretrained, ...)."""
    common = dict(model_name=name, out_features=list(features), norm=NORM, checkpoint=_TIMM.CHECKPOINT,
                  checkpoint_format=_TIMM.CHECKPOINT_FORMAT, pretrained=_TIMM.PRETRAINED, in_chans=3)
    if name.startswith("hrnet"):
        return L(HRNetBackbone)(**{**common, "fuse_upsample": _TIMM.HRNET_FUSE_UPSAMPLE, **layout})
    return L(TimmBackbone)(**{
        **common, "output_stride": output_stride, "stem_type": _TIMM.STEM_TYPE, "stem_width": _TIMM.STEM_WIDTH,
        "dilation_rule": _TIMM.DILATION_RULE, "multi_grid": list(_TIMM.MULTI_GRID), **layout,
    })


def aux_head(name, output_stride, num_classes, channels, feature="res4", weight=0.4):
    """The training-only FCN auxiliary head on `feature` (0.4 loss weight, as in the papers)."""
    shape = stage_shapes(name, output_stride, [feature])[feature]
    return L(AuxFCNHead)(
        in_channels=shape.channels, stride=shape.stride, in_feature=feature, channels=channels,
        num_classes=num_classes, norm=NORM, loss_weight=weight, dropout=_HEAD.AUX_DROPOUT,
    )


def segmentor(body, head):
    return L(SemanticSegmentorAnySize)(backbone=body, sem_seg_head=head, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)


def deeplabv3(name, num_classes, aspp_channels, aux_channels=0, bottleneck_convs=1, output_stride=8):
    """CIRKD/HWD's DeepLabV3: ASPP (rates 12/24/36) + `bottleneck_convs` 3x3 convs + classifier."""
    features = ["res4", "res5"] if aux_channels else ["res5"]
    head = L(SegDeepLabV3Head)(
        input_shape=stage_shapes(name, output_stride, ["res5"]), in_feature="res5", num_classes=num_classes,
        aspp_channels=aspp_channels, aspp_dilations=[12, 24, 36], aspp_dropout=0.1, norm=NORM,
        ignore_value=IGNORE, loss_type="cross_entropy",
        aux_head=aux_head(name, output_stride, num_classes, aux_channels) if aux_channels else None,
        bottleneck_convs=bottleneck_convs, layout=_HEAD.LAYOUT, pool_kernel_size=None,
        use_depthwise_separable_conv=_HEAD.USE_DEPTHWISE_SEPARABLE_CONV, dropout=_HEAD.DROPOUT,
        loss_weight=_HEAD.LOSS_WEIGHT, align_corners=_HEAD.ALIGN_CORNERS, output_resize=_HEAD.OUTPUT_RESIZE,
    )
    return segmentor(backbone(name, output_stride, features), head)


def pspnet(name, num_classes, pool_channels, channels, aux_channels, output_stride=8):
    """PSPNet: pyramid pooling (1, 2, 3, 6) + 3x3 bottleneck + classifier, FCN aux head on res4."""
    head = L(PSPHead)(
        input_shape=stage_shapes(name, output_stride, ["res5"]), in_feature="res5", num_classes=num_classes,
        bins=[1, 2, 3, 6], pool_channels=pool_channels, channels=channels, dropout=0.1, norm=NORM,
        ignore_value=IGNORE, loss_type="cross_entropy",
        aux_head=aux_head(name, output_stride, num_classes, aux_channels),
        loss_weight=_HEAD.LOSS_WEIGHT, align_corners=_HEAD.ALIGN_CORNERS, output_resize=_HEAD.OUTPUT_RESIZE,
    )
    return segmentor(backbone(name, output_stride, ["res4", "res5"]), head)


def deeplabv3plus(name, num_classes, aux_channels=256, output_stride=16):
    """detectron2's DeepLabV3+: ASPP (rates 6/12/18) on res5, res2 projected to 48 channels."""
    head = L(SegDeepLabV3PlusHead)(
        input_shape=stage_shapes(name, output_stride, ["res2", "res5"]), project_channels=[48],
        aspp_dilations=[6, 12, 18], aspp_dropout=0.1, decoder_channels=[256, 256], common_stride=4,
        norm=NORM, train_size=None, loss_type="cross_entropy", ignore_value=IGNORE, num_classes=num_classes,
        aux_head=aux_head(name, output_stride, num_classes, aux_channels),
        layout=_HEAD.LAYOUT, loss_weight=_HEAD.LOSS_WEIGHT, use_depthwise_separable_conv=_HEAD.USE_DEPTHWISE_SEPARABLE_CONV,
        dropout=_HEAD.DROPOUT, align_corners=_HEAD.ALIGN_CORNERS, output_resize=_HEAD.OUTPUT_RESIZE,
    )
    return segmentor(backbone(name, output_stride, ["res2", "res4", "res5"]), head)


def hrnetv2(width, num_classes):
    """HRNetV2-W`width`: the four final branches concatenated, 1x1 conv, classifier."""
    name = f"hrnet_w{width}"
    head = L(HRNetV2Head)(
        input_shape=stage_shapes(name, 32, STAGES), in_features=list(STAGES), num_classes=num_classes,
        channels=0, norm=NORM, ignore_value=IGNORE, loss_type="cross_entropy",
        loss_weight=_HEAD.LOSS_WEIGHT, align_corners=_HEAD.ALIGN_CORNERS, aux_head=None,
        output_resize=_HEAD.OUTPUT_RESIZE,
    )
    return segmentor(backbone(name, 32, STAGES), head)


def ocrnet(width, num_classes, mid_channels=512, key_channels=256):
    """OCRNet on HRNetV2-W`width`: soft object regions (loss_ocr_aux, 0.4) + object context."""
    name = f"hrnet_w{width}"
    head = L(OCRHead)(
        input_shape=stage_shapes(name, 32, STAGES), in_features=list(STAGES), num_classes=num_classes,
        mid_channels=mid_channels, key_channels=key_channels, dropout=0.05, ocr_aux_loss_weight=0.4,
        norm=NORM, ignore_value=IGNORE, loss_type="cross_entropy", region_channels=_HEAD.OCR_REGION_CHANNELS,
        loss_weight=_HEAD.LOSS_WEIGHT, align_corners=_HEAD.ALIGN_CORNERS, aux_head=None,
        output_resize=_HEAD.OUTPUT_RESIZE,
    )
    return segmentor(backbone(name, 32, STAGES), head)
