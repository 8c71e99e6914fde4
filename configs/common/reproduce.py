# Lazy building blocks of the papers' recipes (configs/reproduce/): mmsegmentation's models
# (FAKD Table 3) and CIRKD's (HWD Table III) as the project's backbones and heads in those
# layouts, the two training settings, and the Distiller of a recipe. Each function mirrors a
# YAML config of configs/reproduce/ (tests/test_reproduce.py checks that twins build the
# same model).
from detectron2.config import LazyCall as L
from segdistill.modeling.heads import HRNetV2Head, ISAHead, PSPHead, SegDeepLabV3Head, SegDeepLabV3PlusHead
from segdistill.modeling.distill import distill_losses_from_names
from segdistill.modeling.meta_arch.distill import Distiller, build_teacher

from .cityscapes_data import NUM_CLASSES, dataloader as _cityscapes_dataloader
from .defaults import default_cfg
from .optim import SGD
from .schedule import poly_lr_multiplier
from .train import train as _train
from .zoo import IGNORE, NORM, aux_head, backbone, segmentor, stage_shapes

_D = default_cfg()
_HEAD = _D.MODEL.SEM_SEG_HEAD
HR = ["res2", "res3", "res4", "res5"]


def _head_common(align_corners=False):
    # output_resize "input": the rule of the code bases the recipes reproduce (mmsegmentation,
    # CIRKD), which their files need (docs/reproduce.md, "Input sizes")
    return dict(num_classes=NUM_CLASSES, norm=NORM, ignore_value=IGNORE, loss_type="cross_entropy",
                loss_weight=_HEAD.LOSS_WEIGHT, align_corners=align_corners, output_resize="input")


# ---- backbones ---------------------------------------------------------------------------------
def v1c(depth, features, output_stride=8, checkpoint=""):
    """mmsegmentation's ResNetV1c: deep stem 32-32-64, its dilation convention."""
    return backbone(f"resnet{depth}", output_stride, features, stem_type="deep", stem_width=32,
                    dilation_rule="mmseg", checkpoint=checkpoint, checkpoint_format="openmmlab")


def cirkd_resnet(depth, features, checkpoint=""):
    """CIRKD's resnet*_v1s: deep stem 64-64-128, dilated at output stride 8."""
    return backbone(f"resnet{depth}", 8, features, stem_type="deep", stem_width=64, dilation_rule="timm",
                    checkpoint=checkpoint, checkpoint_format="cirkd")


# ---- mmsegmentation heads (FAKD) ---------------------------------------------------------------
def mmseg_pspnet(depth, channels, aux_channels, checkpoint=""):
    name = f"resnet{depth}"
    head = L(PSPHead)(
        input_shape=stage_shapes(name, 8, ["res5"]), in_feature="res5", bins=[1, 2, 3, 6], pool_channels=channels,
        channels=channels, dropout=0.1, aux_head=aux_head(name, 8, NUM_CLASSES, aux_channels), **_head_common(),
    )
    return segmentor(v1c(depth, ["res4", "res5"], checkpoint=checkpoint), head)


def mmseg_fcn_hrnet(name, checkpoint=""):
    head = L(HRNetV2Head)(input_shape=stage_shapes(name, 32, HR), in_features=HR, channels=0, aux_head=None,
                          **_head_common())
    body = backbone(name, 32, HR, fuse_upsample="bilinear", checkpoint=checkpoint, checkpoint_format="openmmlab")
    return segmentor(body, head)


def mv2(features, checkpoint=""):
    """mmsegmentation's MobileNetV2 at output stride 8 (its dilation convention)."""
    return backbone("mobilenetv2_100", 8, features, dilation_rule="mmseg", checkpoint=checkpoint,
                    checkpoint_format="openmmlab")


def mmseg_deeplabv3plus(body, name, output_stride=8):
    head = L(SegDeepLabV3PlusHead)(
        input_shape=stage_shapes(name, output_stride, ["res2", "res5"]), layout="mmseg", project_channels=[48],
        aspp_dilations=[12, 24, 36], aspp_dropout=0.0, decoder_channels=[512, 512], common_stride=4, train_size=None,
        use_depthwise_separable_conv=_HEAD.USE_DEPTHWISE_SEPARABLE_CONV, dropout=0.1,
        aux_head=aux_head(name, output_stride, NUM_CLASSES, 256), **_head_common(),
    )
    return segmentor(body, head)


def mmseg_isanet(depth, channels, isa_channels, aux_channels, align_corners, checkpoint=""):
    name = f"resnet{depth}"
    head = L(ISAHead)(
        input_shape=stage_shapes(name, 8, ["res5"]), in_feature="res5", channels=channels, isa_channels=isa_channels,
        down_factor=[8, 8], dropout=0.1, aux_head=aux_head(name, 8, NUM_CLASSES, aux_channels),
        **_head_common(align_corners),
    )
    return segmentor(v1c(depth, ["res4", "res5"], checkpoint=checkpoint), head)


# ---- CIRKD's DeepLabV3 (HWD) -----------------------------------------------------------------
def cirkd_deeplabv3(depth, aspp_channels, aux_channels, checkpoint=""):
    name = f"resnet{depth}"
    head = L(SegDeepLabV3Head)(
        input_shape=stage_shapes(name, 8, ["res5"]), in_feature="res5", layout="cirkd", aspp_channels=aspp_channels,
        aspp_dilations=[12, 24, 36], aspp_dropout=0.5, pool_kernel_size=None,
        use_depthwise_separable_conv=_HEAD.USE_DEPTHWISE_SEPARABLE_CONV, bottleneck_convs=1, dropout=0.1,
        aux_head=aux_head(name, 8, NUM_CLASSES, aux_channels), **_head_common(True),
    )
    return segmentor(cirkd_resnet(depth, ["res4", "res5"], checkpoint=checkpoint), head)


# ---- training settings -------------------------------------------------------------------------
def fakd_setting(output_dir):
    """FAKD's: 512x512 crops, batch 16, SGD lr 0.01, weight decay 5e-4 (mmseg's), poly, 40k iterations."""
    return _setting(output_dir, batch=16, lr=0.01, weight_decay=0.0005)


def hwd_setting(output_dir):
    """HWD's (CIRKD's code): 512x512 crops, batch 8, SGD lr 0.01, weight decay 1e-4, poly, 40k iterations."""
    return _setting(output_dir, batch=8, lr=0.01, weight_decay=0.0001)


def _setting(output_dir, *, batch, lr, weight_decay):
    import copy

    dataloader = copy.deepcopy(_cityscapes_dataloader)
    dataloader.train.mapper.augmentations[1].crop_size = (512, 512)
    dataloader.train.total_batch_size = batch
    optimizer = copy.deepcopy(SGD)
    optimizer.lr = lr
    optimizer.weight_decay = weight_decay
    lr_multiplier = copy.deepcopy(poly_lr_multiplier)
    lr_multiplier.warmup_length = 0.0
    train = copy.deepcopy(_train)
    train.update(max_iter=40000, eval_period=4000, output_dir=output_dir)
    train["checkpointer"]["period"] = 4000
    return dataloader, optimizer, lr_multiplier, train


# ---- distillation ------------------------------------------------------------------------------
def distiller(student, teacher_config, teacher_weights, loss, opts=()):
    """The student taught by the teacher of `teacher_config` (YAML) with `teacher_weights`
    (a foreign file is converted when it loads), with the registered distillation loss(es)
    `loss` (a name or a list, as MODEL.DISTILL.LOSSES; settings: each loss's defaults, then `opts`)."""
    return L(Distiller)(
        student=student,
        teacher=L(build_teacher)(config_file=teacher_config, weights=teacher_weights, allow_random=False),
        teacher_name=teacher_config,
        teacher_input_format="RGB",
        losses=L(distill_losses_from_names)(names=[loss] if isinstance(loss, str) else list(loss),
                                            opts=["MODEL.NORM", NORM, *opts]),
        ignore_value=IGNORE,
        exclude_ignore=False,
        eval_teacher=True,
        input_format="RGB",
    )
