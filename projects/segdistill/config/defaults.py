"""``add_segdistill_config``: every config key this project adds, with its default.

Call it on detectron2's ``get_cfg()`` before ``merge_from_file``. It also adds
detectron2's DeepLab keys (``add_deeplab_config``: poly LR, ASPP settings), which the
project's heads and schedules use.

Where a key's default lives: the keys of one registered component (a distillation loss's
``MODEL.DISTILL.<NAME>``, an exit mode's ``MODEL.EXITS.<MODE>``, a head's own
``MODEL.SEM_SEG_HEAD`` keys such as ``PSP_BINS``) are added by a config hook in that
component's own file (:mod:`.hooks`); keys several components read stay here.
"""
from detectron2.config import CfgNode as CN
from detectron2.projects.deeplab import add_deeplab_config

from .hooks import run_config_hooks
from .renamed_keys import register_renamed_keys

__all__ = ["add_segdistill_config"]


def add_segdistill_config(cfg: CN) -> None:
    """Add segdistill's keys to ``cfg`` in place: the shared keys, then every registered
    component's (its config hook, :mod:`.hooks`), then the renamed keys' errors (:mod:`.renamed_keys`).
    Idempotent: running it again adds only the keys of components registered since, and
    changes no value."""
    if "TIMM" not in cfg.MODEL:
        _add_shared_keys(cfg)
    run_config_hooks(cfg)
    register_renamed_keys(cfg)


def _add_shared_keys(cfg: CN) -> None:
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
    # ImageNet weights for the backbone body (timm, torchvision, OpenMMLab, HRNet or CIRKD
    # format: MODEL.TIMM.CHECKPOINT_FORMAT): a file, or a URL (https://, detectron2://)
    # downloaded once into $SEGDISTILL_CACHE (default: torch.hub's checkpoints folder).
    # MODEL.WEIGHTS (a checkpoint of the whole model, MODEL.WEIGHTS_FORMAT) loads after it.
    cfg.MODEL.TIMM.CHECKPOINT = ""
    # timm's own ImageNet weights for MODEL.TIMM.NAME, fetched by huggingface_hub into its
    # cache ($HF_HOME/hub): "" = none (off), "default" = timm's default tag of the model, or a
    # "model.tag" of MODEL.TIMM.NAME (e.g. "resnet18.tv_in1k"). Loaded through the same
    # checked conversion as MODEL.TIMM.CHECKPOINT (format "timm"); set one of the two.
    cfg.MODEL.TIMM.PRETRAINED = ""

    # ---- Heads (modeling/heads): the keys several heads read. A head's own keys (PSP_*,
    # OCR_*, ISA_*, HRNETV2_CHANNELS, NUM_CONVS, ASPP_POOLING, ...) are added by its file's
    # config hook.
    # Dropout before the classifier (FCNHead, PSPHead, ISAHead, the DeepLab heads).
    cfg.MODEL.SEM_SEG_HEAD.DROPOUT = 0.1
    # Auxiliary FCN head on an intermediate stage, training only ("" = none; e.g. "res4").
    cfg.MODEL.SEM_SEG_HEAD.AUX_IN_FEATURE = ""
    cfg.MODEL.SEM_SEG_HEAD.AUX_CHANNELS = 256
    cfg.MODEL.SEM_SEG_HEAD.AUX_LOSS_WEIGHT = 0.4
    # The project's heads use plain cross-entropy unless a config asks for DeepLab's
    # "hard_pixel_mining" (add_deeplab_config's default).
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE = "cross_entropy"
    # Class weights of the pixel cross-entropy of the head, its auxiliary head and the exits that
    # predict the dataset's classes (data/class_weights.py): one weight per class, or [] for none ...
    cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHTS = []
    # ... or computed from DATASETS.TRAIN's labels: "median_frequency" (median(f) / f_c) or "enet"
    # (1 / ln(1.02 + p_c)), cached in the dataset cache; "none": unweighted.
    cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING = "none"

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

    _add_norm_keys(cfg)
    _add_foreign_layout_keys(cfg)
    _add_exit_keys(cfg)
    _add_anytime_keys(cfg)
    _add_hs3_analysis_keys(cfg)
    _add_distill_keys(cfg)
    _add_training_safety_keys(cfg)


def _add_norm_keys(cfg: CN) -> None:
    """The model-wide norm switch."""
    # One switch for every BatchNorm of the model (backbone, head, auxiliary heads, exits):
    # "BN" (CPU, one GPU), "SyncBN" (several GPUs), "FrozenBN" (fine-tuning a trained
    # model from MODEL.WEIGHTS), "auto" (SyncBN when training on several CUDA processes,
    # else BN). "" (default) keeps the per-part keys MODEL.TIMM.NORM and
    # MODEL.SEM_SEG_HEAD.NORM, e.g. a frozen backbone under a BN head. Read it through
    # segdistill.modeling.backbones.norm.resolve_norm(cfg, "backbone" | "head").
    cfg.MODEL.NORM = ""


def _add_foreign_layout_keys(cfg: CN) -> None:
    """Other code bases' layouts and checkpoint formats (docs/reproduce.md, segdistill.convert)."""
    # ---- Backbone layouts (modeling/backbones/timm_backbone.py).
    # ResNet stem: "" (the model's own: timm/torchvision 7x7) or "deep" (three 3x3 convs of
    # STEM_WIDTH, STEM_WIDTH, 2 x STEM_WIDTH channels: 32 = mmsegmentation's ResNetV1c,
    # 64 = CIRKD's resnet*_v1s).
    cfg.MODEL.TIMM.STEM_TYPE = ""
    cfg.MODEL.TIMM.STEM_WIDTH = 64
    # Where dilated stages put their dilations: "timm" (= CIRKD's ResNetV1b) or "mmseg"
    # (mmsegmentation: contract_dilation, BasicBlock's second conv undilated, MobileNetV2
    # dilates only the first block of a stage).
    cfg.MODEL.TIMM.DILATION_RULE = "timm"
    # mmsegmentation's multi_grid (DILATION_RULE "mmseg"): the dilation of each block of the
    # last ResNet stage, e.g. [1, 2, 4] for its "-mg124" models; [] = off.
    cfg.MODEL.TIMM.MULTI_GRID = []
    # HRNet: how branches are upsampled when fused: "nearest" (timm, the HRNet classification
    # release) or "bilinear" (mmsegmentation; an mmsegmentation file under "nearest" is refused).
    cfg.MODEL.TIMM.HRNET_FUSE_UPSAMPLE = "nearest"
    # Format of MODEL.TIMM.CHECKPOINT: "auto" (from its keys), "timm", "torchvision",
    # "openmmlab" (open-mmlab://, mmcls, mmpretrain), "hrnet" (the official HRNet release),
    # "cirkd" (CIRKD's ImageNet ResNets).
    cfg.MODEL.TIMM.CHECKPOINT_FORMAT = "auto"
    # Format of MODEL.WEIGHTS (and of a teacher config's weights): "auto", "detectron2" (this
    # project's checkpoints), "mmseg" (mmsegmentation model zoo), "cirkd" (CIRKD / HWD).
    cfg.MODEL.WEIGHTS_FORMAT = "auto"
    # ---- Head layouts.
    # SegDeepLabV3Head / SegDeepLabV3PlusHead: "detectron2" (detectron2's ASPP and decoder),
    # "mmseg" (mmsegmentation's ASPPHead / DepthwiseSeparableASPPHead) or "cirkd" (CIRKD's
    # DeepLabV3). The other heads have one structure, mmsegmentation's (and CIRKD's PSPNet).
    cfg.MODEL.SEM_SEG_HEAD.LAYOUT = "detectron2"
    # align_corners of every bilinear resize in the heads and of the logits' upsampling
    # (mmsegmentation's 769x769 Cityscapes models and CIRKD use True).
    cfg.MODEL.SEM_SEG_HEAD.ALIGN_CORNERS = False
    # How inference brings the head's logits to the input: "stride" (upsample by the head's
    # stride, then crop the excess: detectron2's rule, the project's) or "input" (resize to
    # the input size: mmsegmentation's and CIRKD's rule, which their files need).
    cfg.MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE = "stride"
    # Dropout of the auxiliary FCN head before its classifier.
    cfg.MODEL.SEM_SEG_HEAD.AUX_DROPOUT = 0.1


def _add_exit_keys(cfg: CN) -> None:
    """MODEL.EXITS: the multi-exit segmentor's keys every exit mode shares."""
    # Used by META_ARCHITECTURE "MultiExitSegmentor" (modeling/meta_arch/multi_exit.py).
    cfg.MODEL.EXITS = CN()
    # "none" (plain training, no exits built) or a registered exit mode: "ds" (deep supervision),
    # "sr" (Self-Regulation: MEA + SR-F + SR-L), "hs3" (modeling/exits/). Each mode's own keys,
    # MODEL.EXITS.<MODE>, are added by its file (ExitObjective.add_config).
    cfg.MODEL.EXITS.MODE = "none"
    # Where exits attach, shallowest first: backbone stages (res2..res5; HRNet layer1,
    # stage2_b*, stage3_b*, res2..res5) or "head_features" (the head's pre-classifier features).
    # Timm backbones return these stages automatically (MODEL.TIMM.OUT_FEATURES is extended).
    cfg.MODEL.EXITS.IN_FEATURES = ["res2", "res3", "res4"]
    # Classes predicted by each exit, one per IN_FEATURES entry; empty = MODEL.SEM_SEG_HEAD.NUM_CLASSES.
    cfg.MODEL.EXITS.NUM_CLASSES = []
    # The exit head: "sr" (Self-Regulation's: 3x3 conv, resize, 3x3 conv, segmenter; CHANNELS) or
    # "rh" (ADP-C's pooled 1x1 encoder-decoder; its keys MODEL.EXITS.RH.*, modeling/exits/rh.py).
    cfg.MODEL.EXITS.HEAD = "sr"
    # Channels of an "sr" exit's two 3x3 convs (256 in the paper). Their norm is the heads' norm
    # (MODEL.NORM, else MODEL.SEM_SEG_HEAD.NORM; modeling/backbones/norm.py).
    cfg.MODEL.EXITS.CHANNELS = 256
    # Every exit's feature map is resized to 1/COMMON_STRIDE of the input (1/8 in the paper).
    cfg.MODEL.EXITS.COMMON_STRIDE = 8
    # Largest bilinear down-sampling factor to the common stride (a larger factor skips pixels):
    # a stage finer than COMMON_STRIDE / MAX_DOWNSAMPLE is a config error.
    cfg.MODEL.EXITS.MAX_DOWNSAMPLE = 2
    # In eval(), also return each exit's prediction as "sem_seg_<exit>" (per-exit metrics).
    cfg.MODEL.EXITS.EVAL_EXITS = False


def _add_anytime_keys(cfg: CN) -> None:
    """MODEL.EXITS.ANYTIME: anytime inference from the trained exits (docs/anytime.md)."""
    # Read by META_ARCHITECTURE "AnytimeSegmentor" (modeling/meta_arch/anytime.py), the deployed
    # multi-exit model built from a ds / sr training config; the other MODEL.EXITS keys say
    # where its exits are.
    cfg.MODEL.EXITS.ANYTIME = CN()
    # "final" (the final head answers: the plain deployed model's output), "exit:<name>" (that
    # exit always answers, e.g. "exit:res3"), "confidence" (per image, the first exit whose
    # confidence reaches its threshold answers; the later stages are not run), "pixel" (per
    # pixel: a pixel whose top probability reaches its exit's PIXEL_THRESHOLDS value keeps that
    # exit's answer; the later stages run only on the other pixels).
    cfg.MODEL.EXITS.ANYTIME.POLICY = "final"
    # An exit's confidence: "mean_max_prob" (mean over pixels of the top softmax probability)
    # or "fraction_above" (share of pixels whose top probability is >= PIXEL_THRESHOLD).
    cfg.MODEL.EXITS.ANYTIME.CONFIDENCE = "mean_max_prob"
    cfg.MODEL.EXITS.ANYTIME.PIXEL_THRESHOLD = 0.9
    # Thresholds of "confidence": a file written by tools/calibrate_exits.py (a file written with
    # --policy pixel holds policy "pixel"'s thresholds instead, read in place of PIXEL_THRESHOLDS) ...
    cfg.MODEL.EXITS.ANYTIME.THRESHOLDS_FILE = ""
    # ... or one value per exit (IN_FEATURES order); above 1 = never answer there (not run).
    cfg.MODEL.EXITS.ANYTIME.THRESHOLDS = []
    # Policy "pixel": the top-probability threshold per exit (IN_FEATURES order), or one value
    # shared by every exit; above 1 = that exit freezes no pixel (not run).
    cfg.MODEL.EXITS.ANYTIME.PIXEL_THRESHOLDS = []
    # Policy "pixel": how the stages after an exit skip the frozen pixels (modeling/masked.py):
    # "emulate" (dense tensors times the mask) or "sparse" (gather / GEMM / scatter of the
    # active pixels; a stage with most pixels active runs as "emulate").
    cfg.MODEL.EXITS.ANYTIME.PIXEL_MODE = "emulate"
    # Also return the final head's output ("sem_seg_final") and its time, run after the answer,
    # so evaluators report policy and final output side by side (costs one plain forward).
    cfg.MODEL.EXITS.ANYTIME.EVAL_FINAL = False


def _add_hs3_analysis_keys(cfg: CN) -> None:
    """HS3_ANALYSIS: HS3's offline Phase 1 (segdistill.hs3, tools/hs3_pipeline.py; docs/hs3.md).

    Not part of any model: they say how DATASETS.TRAIN[0] is split and how the clusters file
    (MODEL.EXITS.HS3.CLUSTERS_FILE, Phase 2's input) is made from the confusion matrices."""
    cfg.HS3_ANALYSIS = CN()
    # Phase-1 split of DATASETS.TRAIN[0] into <name>_hs3_reduced / <name>_hs3_analysis:
    # share of the analysis set, seed, and optionally a text file listing the analysis images.
    cfg.HS3_ANALYSIS.FRACTION = 0.1
    cfg.HS3_ANALYSIS.SPLIT_SEED = 0
    cfg.HS3_ANALYSIS.FILES = ""
    # Clustering of the confusion matrices: "spectral", "kmeans" or "manual".
    cfg.HS3_ANALYSIS.METHOD = "spectral"
    # Trade-off angle in degrees, in [0, 90]; < 0 = the paper's line through the origin.
    cfg.HS3_ANALYSIS.THETA = -1.0
    # K values of the trade-off curves ("2-18", "2,4,8", "2-170:4"); "" = 2..N.
    cfg.HS3_ANALYSIS.K_GRID = ""
    # Seed of the clustering (the split has SPLIT_SEED).
    cfg.HS3_ANALYSIS.CLUSTER_SEED = 0
    # Affinity from the row-normalised ("row") or raw ("none") confusion matrix.
    cfg.HS3_ANALYSIS.NORMALIZE = "row"
    # "manual": classes of an exit / classes of the next deeper stage.
    cfg.HS3_ANALYSIS.MANUAL_RATIO = 0.5


def _add_distill_keys(cfg: CN) -> None:
    """MODEL.DISTILL: teacher-student distillation (docs/distillation.md), the keys the Distiller reads."""
    # Used by META_ARCHITECTURE "Distiller" (modeling/meta_arch/distill.py; losses in modeling/distill).
    cfg.MODEL.DISTILL = CN()
    # Meta-architecture of the student, built from this config's MODEL as usual:
    # SemanticSegmentorAnySize (the plain model, outputs at any input size), MultiExitSegmentor,
    # or any segmentor implementing the tap contract (modeling/distill/taps.py).
    cfg.MODEL.DISTILL.STUDENT_META_ARCHITECTURE = "SemanticSegmentorAnySize"
    cfg.MODEL.DISTILL.TEACHER = CN()
    # The teacher's own config (YAML or lazy .py; relative paths: working directory, then
    # the repository root) and its trained weights (a local detectron2 checkpoint).
    cfg.MODEL.DISTILL.TEACHER.CONFIG_FILE = ""
    cfg.MODEL.DISTILL.TEACHER.WEIGHTS = ""
    # Overrides of the teacher's config, as a KEY VALUE list (e.g. ["MODEL.TIMM.NORM", "BN"]).
    cfg.MODEL.DISTILL.TEACHER.OPTS = []
    # Tests and benchmarks only: accept an empty WEIGHTS and distil from a random teacher (warns).
    cfg.MODEL.DISTILL.TEACHER.ALLOW_RANDOM = False
    # The frozen teacher's forward precision, on its own: "step" (the training step's: float32, or
    # SOLVER.AMP.DTYPE under SOLVER.AMP.ENABLED), "fp32", "bf16" or "fp16" (CUDA only). A bf16
    # teacher with a float32 student is valid: the losses are computed in float32 either way.
    cfg.MODEL.DISTILL.TEACHER.PRECISION = "step"
    # In eval(), also return the teacher's prediction as "sem_seg_teacher", so the evaluator
    # reports teacher and student side by side (costs one teacher inference per test image).
    cfg.MODEL.DISTILL.EVAL_TEACHER = False
    # Distillation losses (registered names), logged as loss_<name>*: "pd", "cwd", "hwd", "fakd_cwd",
    # "fakd_pd", "skd", "ifvd", "cirkd", "mgd", "dist", "fitnet", "at" (modeling/distill/); several
    # combine (a paper's full objective is often e.g. ["pd", "skd"]). Each loss's own keys,
    # MODEL.DISTILL.<NAME>, are added by its file (DistillLoss.add_config), with their sources.
    cfg.MODEL.DISTILL.LOSSES = ["cwd"]
    # Leave ignore pixels (labels resized to each loss's maps) out of the losses that average
    # over pixels (PD, CWD, HWD, FAKD, IFVD). Off: every pixel counts, as in the papers.
    cfg.MODEL.DISTILL.EXCLUDE_IGNORE = False


def _add_training_safety_keys(cfg: CN) -> None:
    """Keys of the checks that keep failures from being silent (train_net.py, engine/, data/build.py)."""
    # A training image or label that cannot be decoded (truncated, corrupt; found by the dataset's
    # load-time check or when read): "stop" (an error naming the file and its dataset) or "skip"
    # (train without it; skipped files are logged and listed in OUTPUT_DIR/skipped_files.txt).
    # Evaluation never skips. Lazy configs: dataloader.train.on_unreadable.
    cfg.DATALOADER.ON_UNREADABLE = "stop"
    # --eval-only with an empty MODEL.WEIGHTS is an error (a random model would be evaluated);
    # True allows it, for tests. Lazy configs: train.allow_random_weights.
    cfg.TEST.ALLOW_RANDOM_WEIGHTS = False
    # --eval-only refuses a checkpoint that covers less than this share of the model's parameters
    # and buffers (by elements), or any tensor of another shape; training from such a MODEL.WEIGHTS
    # only warns. Lazy configs: train.min_matched_weights.
    cfg.TEST.MIN_MATCHED_WEIGHTS = 0.9
