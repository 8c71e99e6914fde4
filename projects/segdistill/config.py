"""``add_segdistill_config``: every config key this project adds, with its default.

Call it on detectron2's ``get_cfg()`` before ``merge_from_file``. It also adds
detectron2's DeepLab keys (``add_deeplab_config``: poly LR, ASPP settings), which the
project's heads and schedules use.
"""
from detectron2.config import CfgNode as CN
from detectron2.projects.deeplab import add_deeplab_config

__all__ = ["add_segdistill_config"]


def add_segdistill_config(cfg: CN) -> None:
    """Add segdistill's keys to ``cfg`` in place (idempotent)."""
    if "TIMM" in cfg.MODEL:
        return
    add_deeplab_config(cfg)

    # ---- Backbones: timm models as detectron2 backbones (MODEL.BACKBONE.NAME "build_timm_backbone").
    cfg.MODEL.TIMM = CN()
    # Any timm model with features_only: resnet18/50/101 (and their -d variants),
    # mobilenetv2_100, hrnet_w18_small, hrnet_w18_small_v2, hrnet_w18, hrnet_w48, ...
    cfg.MODEL.TIMM.NAME = "resnet18"
    # 8 or 16 dilate the last stages (ResNet, MobileNetV2); 32 is the plain network.
    # HRNet has no dilated variant and needs 32.
    cfg.MODEL.TIMM.OUTPUT_STRIDE = 8
    # Which stages the backbone returns: res2..res5 (see modeling/backbones/timm_backbone.py;
    # HRNet also has layer1, stage2_b0..1, stage3_b0..2). Empty = the last stage.
    cfg.MODEL.TIMM.OUT_FEATURES = ["res5"]
    # BN (CPU / one process), SyncBN (several GPUs), FrozenBN (fine-tuning).
    cfg.MODEL.TIMM.NORM = "BN"
    # Local ImageNet weights (timm or torchvision state dict) for the backbone body; nothing
    # is downloaded. MODEL.WEIGHTS (a detectron2 checkpoint of the whole model) loads after it.
    cfg.MODEL.TIMM.CHECKPOINT = ""

    # ---- Heads (SegDeepLabV3Head, SegDeepLabV3PlusHead, FCNHead; see modeling/heads).
    # ASPP image pooling: "global" (any input size) or "crop" (detectron2's window of the crop).
    cfg.MODEL.SEM_SEG_HEAD.ASPP_POOLING = "global"
    # FCNHead: number of 3x3 convs, concatenation of the input before the classifier, dropout.
    cfg.MODEL.SEM_SEG_HEAD.NUM_CONVS = 2
    cfg.MODEL.SEM_SEG_HEAD.CONCAT_INPUT = True
    cfg.MODEL.SEM_SEG_HEAD.DROPOUT = 0.1
    # Auxiliary FCN head on an intermediate stage, training only ("" = none; e.g. "res4").
    cfg.MODEL.SEM_SEG_HEAD.AUX_IN_FEATURE = ""
    cfg.MODEL.SEM_SEG_HEAD.AUX_CHANNELS = 256
    cfg.MODEL.SEM_SEG_HEAD.AUX_LOSS_WEIGHT = 0.4
    # The project's heads use plain cross-entropy unless a config asks for DeepLab's
    # "hard_pixel_mining" (add_deeplab_config's default).
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE = "cross_entropy"

    # ---- Distributed training. detectron2's DefaultTrainer hard-codes this off; multi-exit
    # models whose exits are not all in the loss need it on.
    cfg.MODEL.FIND_UNUSED_PARAMETERS = False

    # ---- Training augmentation (segdistill.data.SemSegDatasetMapper):
    # random resize by a ratio drawn from this range, of the image's own size, or of
    # INPUT.RESIZE_BASE_SIZE (h, w) when set (mmsegmentation's img_scale) ...
    cfg.INPUT.RESIZE_RATIO_RANGE = (0.5, 2.0)
    cfg.INPUT.RESIZE_BASE_SIZE = (0, 0)
    # ... then INPUT.CROP.SIZE (absolute; padded with the ignore value when the image is
    # smaller), then INPUT.RANDOM_FLIP, then brightness/contrast jitter of this strength.
    cfg.INPUT.COLOR_JITTER = 0.0
    # At test time the image is used as is unless INPUT.MIN_SIZE_TEST > 0.

    # ---- Outputs for people: a picture (image | ground truth | prediction) per image of
    # the first test set, written by tools/visualize_predictions.py and by the demo.
    cfg.SEGDISTILL = CN()
    cfg.SEGDISTILL.VIS_MAX_IMAGES = 50

    _add_model_zoo_keys(cfg)
    _add_exit_keys(cfg)
    _add_distill_keys(cfg)
    _add_dataset_keys(cfg)


def _add_model_zoo_keys(cfg: CN) -> None:
    """Keys of the model-zoo heads (PSPNet, OCR, HRNetV2) and the model-wide norm switch."""


def _add_exit_keys(cfg: CN) -> None:
    """MODEL.EXITS: multi-exit segmentor (deep supervision, Self-Regulation, HS3)."""


def _add_distill_keys(cfg: CN) -> None:
    """MODEL.DISTILL: teacher-student distillation (PD, CWD, HWD, FAKD)."""


def _add_dataset_keys(cfg: CN) -> None:
    """Keys of the real datasets' loaders and evaluators (COCO-Stuff, Cityscapes, CamVid)."""
