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
    # Local ImageNet weights for the backbone body (timm, torchvision, OpenMMLab, HRNet or
    # CIRKD format: MODEL.TIMM.CHECKPOINT_FORMAT); nothing is downloaded. MODEL.WEIGHTS (a
    # checkpoint of the whole model, MODEL.WEIGHTS_FORMAT) loads after it.
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
    _add_foreign_layout_keys(cfg)
    _add_exit_keys(cfg)
    _add_anytime_keys(cfg)
    _add_hs3_analysis_keys(cfg)
    _add_distill_keys(cfg)
    _add_training_safety_keys(cfg)


def _add_model_zoo_keys(cfg: CN) -> None:
    """Keys of the model-zoo heads (PSPNet, OCR, HRNetV2) and the model-wide norm switch."""
    # One switch for every BatchNorm of the model (backbone, head, auxiliary heads, exits):
    # "BN" (CPU, one GPU), "SyncBN" (several GPUs), "FrozenBN" (fine-tuning a trained
    # model from MODEL.WEIGHTS), "auto" (SyncBN when training on several CUDA processes,
    # else BN). "" (default) keeps the per-part keys MODEL.TIMM.NORM and
    # MODEL.SEM_SEG_HEAD.NORM, e.g. a frozen backbone under a BN head. Read it through
    # segdistill.modeling.backbones.norm.resolve_norm(cfg, "backbone" | "head").
    cfg.MODEL.NORM = ""
    # PSPHead: pyramid pooling bins; channels of each pooling branch (0 = in_channels /
    # len(bins)); the bottleneck 3x3 conv's width is MODEL.SEM_SEG_HEAD.CONVS_DIM and its
    # dropout MODEL.SEM_SEG_HEAD.DROPOUT.
    cfg.MODEL.SEM_SEG_HEAD.PSP_BINS = [1, 2, 3, 6]
    cfg.MODEL.SEM_SEG_HEAD.PSP_POOL_CHANNELS = 0
    # HRNetV2Head: width of the 1x1 conv after the concatenated branches (0 = the
    # concatenated width, 270 for W18 and 720 for W48, as in HRNetV2).
    cfg.MODEL.SEM_SEG_HEAD.HRNETV2_CHANNELS = 0
    # OCRHead (object-contextual representations, on the concatenated IN_FEATURES):
    # 3x3 conv to MID channels, pixel-region attention with KEY channels, dropout after
    # the fusion conv, the soft-object-region head's width (0 = input width, as in
    # HRNet-OCR) and the weight of its loss ("loss_ocr_aux").
    cfg.MODEL.SEM_SEG_HEAD.OCR_MID_CHANNELS = 512
    cfg.MODEL.SEM_SEG_HEAD.OCR_KEY_CHANNELS = 256
    cfg.MODEL.SEM_SEG_HEAD.OCR_DROPOUT = 0.05
    cfg.MODEL.SEM_SEG_HEAD.OCR_REGION_CHANNELS = 0
    cfg.MODEL.SEM_SEG_HEAD.OCR_AUX_LOSS_WEIGHT = 0.4
    # SegDeepLabV3Head: 3x3 conv-norm-ReLU layers between the ASPP and the classifier
    # (CIRKD/HWD's DeepLabV3 has one; detectron2's and the default have none).
    cfg.MODEL.SEM_SEG_HEAD.ASPP_BOTTLENECK_CONVS = 0


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
    # release) or "bilinear" (mmsegmentation).
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
    # Dropout of the auxiliary FCN head before its classifier.
    cfg.MODEL.SEM_SEG_HEAD.AUX_DROPOUT = 0.1
    # ISAHead (ISANet): channels of the attention's queries and keys, and the local group
    # size (h, w); its width is MODEL.SEM_SEG_HEAD.CONVS_DIM and its dropout DROPOUT.
    cfg.MODEL.SEM_SEG_HEAD.ISA_CHANNELS = 256
    cfg.MODEL.SEM_SEG_HEAD.ISA_DOWN_FACTOR = [8, 8]


def _add_exit_keys(cfg: CN) -> None:
    """MODEL.EXITS: multi-exit segmentor (deep supervision, Self-Regulation, HS3)."""
    # Used by META_ARCHITECTURE "MultiExitSegmentor" (modeling/meta_arch/multi_exit.py).
    cfg.MODEL.EXITS = CN()
    # "none" (plain training, no exits built), "ds" (deep supervision), "sr" (Self-Regulation:
    # MEA + SR-F + SR-L); other modes (e.g. "hs3") register themselves.
    cfg.MODEL.EXITS.MODE = "none"
    # Where exits attach, shallowest first: backbone stages (res2..res5; HRNet layer1,
    # stage2_b*, stage3_b*, res2..res5) or "head_features" (the head's pre-classifier features).
    # Timm backbones return these stages automatically (MODEL.TIMM.OUT_FEATURES is extended).
    cfg.MODEL.EXITS.IN_FEATURES = ["res2", "res3", "res4"]
    # Classes predicted by each exit, one per IN_FEATURES entry; empty = MODEL.SEM_SEG_HEAD.NUM_CLASSES.
    cfg.MODEL.EXITS.NUM_CLASSES = []
    # Channels of an exit's two 3x3 convs (256 in the paper). Their norm is the heads' norm
    # (MODEL.NORM, else MODEL.SEM_SEG_HEAD.NORM; modeling/backbones/norm.py).
    cfg.MODEL.EXITS.CHANNELS = 256
    # Every exit's feature map is resized to 1/COMMON_STRIDE of the input (1/8 in the paper).
    cfg.MODEL.EXITS.COMMON_STRIDE = 8
    # Largest bilinear down-sampling factor to the common stride (a larger factor skips pixels):
    # a stage finer than COMMON_STRIDE / MAX_DOWNSAMPLE is a config error.
    cfg.MODEL.EXITS.MAX_DOWNSAMPLE = 2
    # In eval(), also return each exit's prediction as "sem_seg_<exit>" (per-exit metrics).
    cfg.MODEL.EXITS.EVAL_EXITS = False
    # Deep supervision: weight of every exit's full-class cross-entropy (loss_ds, summed over exits).
    cfg.MODEL.EXITS.DS = CN()
    cfg.MODEL.EXITS.DS.WEIGHT = 1.0
    # Self-Regulation (paper Eq. 5; defaults from its section 5).
    cfg.MODEL.EXITS.SR = CN()
    # lambda1: multi-label BCE of every classifier (exits + final head), loss_mea_cls.
    cfg.MODEL.EXITS.SR.CLS_WEIGHT = 0.2
    # lambda2: pixel cross-entropy of every exit's segmenter, loss_mea_seg.
    cfg.MODEL.EXITS.SR.SEG_WEIGHT = 0.8
    # False (default, the paper's Eq. 5 as read here): the final head's cross-entropy is its own
    # loss_sem_seg at weight 1 and SEG_WEIGHT weights the exits only. True (the authors' code,
    # dongzhang89/SR-SS trainval.py): the final output is inside SEG_WEIGHT too (loss_sem_seg x
    # SEG_WEIGHT). docs/multi_exit.md compares them.
    cfg.MODEL.EXITS.SR.SEG_WEIGHT_INCLUDES_FINAL = False
    # lambda3: SR-F, shallowest exit's features teach the deeper exits' (loss_sr_f); 0 = off.
    cfg.MODEL.EXITS.SR.F_WEIGHT = 1.0
    # SR-L, the final head's class logits teach the shallower exits' (loss_sr_l); 0 = off.
    cfg.MODEL.EXITS.SR.L_WEIGHT = 1.0
    # "paper" (Eq. 1-4, tempered soft cross-entropy) or "code" (the authors' released code:
    # SR-F = CE towards the shallowest exit's argmax, SR-L = BCE towards the final sigmoid).
    cfg.MODEL.EXITS.SR.VARIANT = "paper"
    # Stop gradients through the teachers of SR-F and SR-L.
    cfg.MODEL.EXITS.SR.DETACH_TEACHER = True
    # MEA only for the first WARMUP_ITERS iterations, then SR-F and SR-L on.
    cfg.MODEL.EXITS.SR.WARMUP_ITERS = 0
    # Adaptive temperature (section 5): starts at TEMPERATURE and is multiplied by ANNEAL_FACTOR
    # whenever the max-min spread of a teacher feature map (tempered softmax) in the minibatch
    # exceeds ANNEAL_THRESHOLD. ANNEAL_FACTOR 1.0 keeps it fixed. Saved in checkpoints.
    cfg.MODEL.EXITS.SR.TEMPERATURE = 1.0
    cfg.MODEL.EXITS.SR.ANNEAL_FACTOR = 1.05
    cfg.MODEL.EXITS.SR.ANNEAL_THRESHOLD = 0.5
    # HS3 (MODE "hs3"; docs/hs3.md): every exit predicts its own clustered class set.
    cfg.MODEL.EXITS.HS3 = CN()
    # The clusters file of Phase 1 (tools/hs3_analyze.py or tools/hs3_pipeline.py); required
    # with MODE "hs3". Each exit's class count and label table come from it.
    cfg.MODEL.EXITS.HS3.CLUSTERS_FILE = ""
    # gamma_i of Eq. 1 (weight of exit i's clustered cross-entropy), one per exit or one for all.
    cfg.MODEL.EXITS.HS3.GAMMAS = [1.0]
    # HS3-Fuse (paper 3.2): an OCR block on each exit's features (soft regions from the exit's
    # cluster logits), concatenated into the final head's finest input feature. Costs inference.
    cfg.MODEL.EXITS.HS3.FUSE = CN()
    cfg.MODEL.EXITS.HS3.FUSE.ENABLED = False
    # Mid / key channels of the deepest exit's OCR block; each shallower exit's block has half
    # of the next deeper one's.
    cfg.MODEL.EXITS.HS3.FUSE.OCR_MID_CHANNELS = 256
    cfg.MODEL.EXITS.HS3.FUSE.OCR_KEY_CHANNELS = 128
    # Multiplies every OCR block's channels (< 1: the paper's "lighter" HS3-Fuse).
    cfg.MODEL.EXITS.HS3.FUSE.CHANNEL_SCALE = 1.0


def _add_anytime_keys(cfg: CN) -> None:
    """MODEL.EXITS.ANYTIME: anytime inference from the trained exits (docs/anytime.md)."""
    # Read by META_ARCHITECTURE "AnytimeSegmentor" (modeling/meta_arch/anytime.py), the deployed
    # multi-exit model built from a ds / sr training config; the other MODEL.EXITS keys say
    # where its exits are.
    cfg.MODEL.EXITS.ANYTIME = CN()
    # "final" (the final head answers: the plain deployed model's output), "exit:<name>" (that
    # exit always answers, e.g. "exit:res3"), "confidence" (per image, the first exit whose
    # confidence reaches its threshold answers; the later stages are not run).
    cfg.MODEL.EXITS.ANYTIME.POLICY = "final"
    # An exit's confidence: "mean_max_prob" (mean over pixels of the top softmax probability)
    # or "fraction_above" (share of pixels whose top probability is >= PIXEL_THRESHOLD).
    cfg.MODEL.EXITS.ANYTIME.CONFIDENCE = "mean_max_prob"
    cfg.MODEL.EXITS.ANYTIME.PIXEL_THRESHOLD = 0.9
    # Thresholds of "confidence": a file written by tools/calibrate_exits.py ...
    cfg.MODEL.EXITS.ANYTIME.THRESHOLDS_FILE = ""
    # ... or one value per exit (IN_FEATURES order); above 1 = never answer there (not run).
    cfg.MODEL.EXITS.ANYTIME.THRESHOLDS = []
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
    """MODEL.DISTILL: teacher-student distillation (docs/distillation.md, with the source of
    every default below)."""
    # Used by META_ARCHITECTURE "Distiller" (modeling/meta_arch/distill.py; losses in modeling/distill).
    cfg.MODEL.DISTILL = CN()
    # Meta-architecture of the student, built from this config's MODEL as usual: SemanticSegmentor,
    # MultiExitSegmentor, or any segmentor implementing the tap contract (modeling/distill/taps.py).
    cfg.MODEL.DISTILL.STUDENT_META_ARCHITECTURE = "SemanticSegmentor"
    cfg.MODEL.DISTILL.TEACHER = CN()
    # The teacher's own config (YAML or lazy .py; relative paths: working directory, then
    # the repository root) and its trained weights (a local detectron2 checkpoint).
    cfg.MODEL.DISTILL.TEACHER.CONFIG_FILE = ""
    cfg.MODEL.DISTILL.TEACHER.WEIGHTS = ""
    # Overrides of the teacher's config, as a KEY VALUE list (e.g. ["MODEL.TIMM.NORM", "BN"]).
    cfg.MODEL.DISTILL.TEACHER.OPTS = []
    # Tests and benchmarks only: accept an empty WEIGHTS and distil from a random teacher (warns).
    cfg.MODEL.DISTILL.TEACHER.ALLOW_RANDOM = False
    # In eval(), also return the teacher's prediction as "sem_seg_teacher", so the evaluator
    # reports teacher and student side by side (costs one teacher inference per test image).
    cfg.MODEL.DISTILL.EVAL_TEACHER = False
    # Distillation losses (registered names), each with its section below, logged as loss_<name>*:
    # "pd", "cwd", "hwd", "fakd_cwd", "fakd_pd", "skd", "ifvd", "cirkd", "mgd", "dist", "fitnet",
    # "at"; several combine (a paper's full objective is often e.g. ["pd", "skd"]).
    cfg.MODEL.DISTILL.LOSSES = ["cwd"]
    # Leave ignore pixels (labels resized to each loss's maps) out of the losses that average
    # over pixels (PD, CWD, HWD, FAKD, IFVD). Off: every pixel counts, as in the papers.
    cfg.MODEL.DISTILL.EXCLUDE_IGNORE = False

    # PD (FAKD Eq. 1): per-pixel KL of the class distributions at TEMPERATURE (x T^2), on the logits.
    cfg.MODEL.DISTILL.PD = CN()
    cfg.MODEL.DISTILL.PD.WEIGHT = 1.0
    cfg.MODEL.DISTILL.PD.TEMPERATURE = 1.0
    # CWD (FAKD Eq. 2, HWD Eq. 3): KL of each channel's spatial softmax at TEMPERATURE, on the logits.
    cfg.MODEL.DISTILL.CWD = CN()
    cfg.MODEL.DISTILL.CWD.WEIGHT = 3.0
    cfg.MODEL.DISTILL.CWD.TEMPERATURE = 4.0
    # HWD (HWD section III-C): CWD with per-image channel weights. Defaults: the authors' recommended
    # run; the paper's variant is MU 0.0 + PIXEL_CORRECTION True.
    cfg.MODEL.DISTILL.HWD = CN()
    cfg.MODEL.DISTILL.HWD.WEIGHT = 3.0  # alpha
    cfg.MODEL.DISTILL.HWD.TEMPERATURE = 4.0
    cfg.MODEL.DISTILL.HWD.BETA = 0.1  # smoothing, in (0, 1)
    cfg.MODEL.DISTILL.HWD.MU = 1.0  # mean of the normalised divergences
    cfg.MODEL.DISTILL.HWD.SIGMA = 1.0  # their standard deviation
    cfg.MODEL.DISTILL.HWD.EPS = 1e-8  # added to the std of the divergences / their mean (relative)
    # Divide each channel's divergence by (its class's pixel count in the image + 1).
    cfg.MODEL.DISTILL.HWD.PIXEL_CORRECTION = False
    # Divergence of the "activation" maps (spatial softmax; paper and recommended run) or
    # of the raw "logits" (the authors' code without --activation).
    cfg.MODEL.DISTILL.HWD.DIVERGENCE_INPUT = "activation"
    # FAKD (Eq. 7, 8): feature augmentation of the student by its class covariance.
    cfg.MODEL.DISTILL.FAKD = CN()
    # lambda0, the end value of lambda; "cosine" ramps lambda 0 -> LAMBDA0 over SOLVER.MAX_ITER,
    # "constant" keeps LAMBDA0.
    cfg.MODEL.DISTILL.FAKD.LAMBDA0 = 1.0
    cfg.MODEL.DISTILL.FAKD.LAMBDA_SCHEDULE = "cosine"
    # Class-conditional covariance of the student's pre-classifier features: "diagonal" or "full"
    # (C x A x A, heavier). Estimated online from the labels, saved in checkpoints.
    cfg.MODEL.DISTILL.FAKD.COVARIANCE = "diagonal"
    # Sum the covariance statistics over the training processes (same estimate everywhere).
    cfg.MODEL.DISTILL.FAKD.ALL_REDUCE = True
    # FAKD-CWD (CWD-aug, Eq. 7) and FAKD-PD (PD-aug, Eq. 8): weights and temperatures as CWD / PD.
    cfg.MODEL.DISTILL.FAKD_CWD = CN()
    cfg.MODEL.DISTILL.FAKD_CWD.WEIGHT = 3.0
    cfg.MODEL.DISTILL.FAKD_CWD.TEMPERATURE = 4.0
    cfg.MODEL.DISTILL.FAKD_PD = CN()
    cfg.MODEL.DISTILL.FAKD_PD.WEIGHT = 1.0
    cfg.MODEL.DISTILL.FAKD_PD.TEMPERATURE = 1.0

    # Taps (modeling/distill/taps.py): "logits", "head_features" (pre-classifier features) or a
    # backbone stage ("res2".."res5", HRNet's "stage2_b0", ...). Connectors (student -> teacher
    # channels): "none", "conv1x1", "conv1x1_bias", "conv_bn_relu" (norm: the heads' norm).

    # SKD (Liu et al., CVPR 2019): pair-wise similarity distillation on max-pooled features
    # (loss_skd_pairwise) and, with HOLISTIC_WEIGHT > 0, the holistic adversarial term
    # (loss_skd_holistic for the student, loss_skd_discriminator for the discriminator, see
    # MODEL.DISTILL.HOLISTIC). The paper's pixel-wise term is "pd". Defaults: the authors' code
    # (irfanICMLL/structure_knowledge_distillation run_train_val.sh, utils/train_options.py).
    cfg.MODEL.DISTILL.SKD = CN()
    cfg.MODEL.DISTILL.SKD.PAIRWISE_WEIGHT = 0.5
    cfg.MODEL.DISTILL.SKD.STUDENT_TAP = "head_features"
    cfg.MODEL.DISTILL.SKD.TEACHER_TAP = "head_features"
    # Nodes: max-pooling windows of POOL_SCALE x the map's size (0.5: 2x2 nodes, the authors' code)
    # or, when POOL_KERNEL > 0, of POOL_KERNEL x POOL_KERNEL pixels (CIRKD/HWD code: 2).
    cfg.MODEL.DISTILL.SKD.POOL_SCALE = 0.5
    cfg.MODEL.DISTILL.SKD.POOL_KERNEL = 0
    # Divide by the feature norms without gradient through them (the authors' code); off: the
    # paper's cosine similarity, differentiated in full.
    cfg.MODEL.DISTILL.SKD.DETACH_NORM = False
    # Weight of the holistic (adversarial) term for the student; 0 = no discriminator.
    cfg.MODEL.DISTILL.SKD.HOLISTIC_WEIGHT = 0.1
    # The holistic distillation's discriminator (SKD section 3.3), shared by SKD and IFVD: trained
    # in the same step as the student, in the same optimizer (its gradient scaled by LR_FACTOR),
    # from the student's detached logits (docs/distillation.md).
    cfg.MODEL.DISTILL.HOLISTIC = CN()
    # "wgan-gp" (paper and SKD/IFVD authors' code) or "hinge" (CIRKD/HWD code, no gradient penalty).
    cfg.MODEL.DISTILL.HOLISTIC.LOSS_TYPE = "wgan-gp"
    cfg.MODEL.DISTILL.HOLISTIC.GP_WEIGHT = 10.0  # lambda_gp
    cfg.MODEL.DISTILL.HOLISTIC.D_WEIGHT = 0.1  # lambda_d: weight of the discriminator's loss
    # Discriminator learning rate / SOLVER.BASE_LR (authors: 4e-4 for D, 1e-2 for the student).
    cfg.MODEL.DISTILL.HOLISTIC.LR_FACTOR = 0.04
    # Condition the discriminator on the image (paper); off: logits alone (the authors' code).
    cfg.MODEL.DISTILL.HOLISTIC.CONDITIONAL = True
    # Width of the first of the discriminator's four stride-2 convs (SAGAN-style, doubling).
    cfg.MODEL.DISTILL.HOLISTIC.CONV_DIM = 64

    # IFVD (Wang et al., ECCV 2020): intra-class feature variation maps (cosine of each pixel's
    # feature to its class prototype in the image) matched by MSE (loss_ifvd), plus SKD's holistic
    # term with HOLISTIC_WEIGHT > 0. Defaults: the authors' code (YukangWang/IFVD options.py).
    cfg.MODEL.DISTILL.IFVD = CN()
    cfg.MODEL.DISTILL.IFVD.WEIGHT = 200.0
    cfg.MODEL.DISTILL.IFVD.STUDENT_TAP = "head_features"
    cfg.MODEL.DISTILL.IFVD.TEACHER_TAP = "head_features"
    cfg.MODEL.DISTILL.IFVD.HOLISTIC_WEIGHT = 0.001

    # CIRKD (Yang et al., CVPR 2022): pixel-to-pixel distillation across the images of the batch
    # (loss_cirkd_batch), pixel-to-pixel and pixel-to-region distillation against class-wise
    # memories of teacher embeddings (loss_cirkd_pixel_memory, loss_cirkd_region_memory). The
    # student's embeddings go through a projection head (1x1 conv, norm, ReLU, 1x1 conv) to the
    # teacher's channels. Defaults: the authors' code (winycg/CIRKD train_cirkd.py).
    cfg.MODEL.DISTILL.CIRKD = CN()
    cfg.MODEL.DISTILL.CIRKD.STUDENT_TAP = "head_features"
    cfg.MODEL.DISTILL.CIRKD.TEACHER_TAP = "head_features"
    cfg.MODEL.DISTILL.CIRKD.BATCH_WEIGHT = 1.0
    cfg.MODEL.DISTILL.CIRKD.PIXEL_MEMORY_WEIGHT = 0.1
    cfg.MODEL.DISTILL.CIRKD.REGION_MEMORY_WEIGHT = 0.1
    # Temperature of the similarity distributions, and of their KL (x T^2).
    cfg.MODEL.DISTILL.CIRKD.TEMPERATURE = 0.1
    cfg.MODEL.DISTILL.CIRKD.KD_TEMPERATURE = 1.0
    # Memory per class (entries) and how many of them one step contrasts with (all classes
    # together: TOTAL // NUM_CLASSES + 1 per class); pixels a class adds per image and step.
    cfg.MODEL.DISTILL.CIRKD.PIXEL_MEMORY_SIZE = 20000
    cfg.MODEL.DISTILL.CIRKD.REGION_MEMORY_SIZE = 2000
    cfg.MODEL.DISTILL.CIRKD.PIXEL_CONTRAST_SIZE = 4096
    cfg.MODEL.DISTILL.CIRKD.REGION_CONTRAST_SIZE = 1024
    cfg.MODEL.DISTILL.CIRKD.PIXEL_UPDATE_FREQ = 16
    # The batch term over the global batch, gathered across processes (paper); off: each
    # process's own images (the authors' code). The memories always take the global batch.
    cfg.MODEL.DISTILL.CIRKD.GATHER = True
    # Pixels a class enqueues: drawn among that class's pixels ("class", the paper) or, as the
    # authors' code indexes them, among the first n pixels of the image in raster order, n = the
    # class's pixel count ("code").
    cfg.MODEL.DISTILL.CIRKD.ENQUEUE = "class"
    # Seed of the memories' random draws (identical on every process, so the memories stay equal).
    cfg.MODEL.DISTILL.CIRKD.SEED = 0

    # MGD (Yang et al., ECCV 2022): a random spatial mask (MASK_RATIO of the positions zeroed) on
    # the aligned student feature, a generator (3x3 conv, ReLU, 3x3 conv) reconstructs the
    # teacher's; summed squared error / N. Defaults: the authors' segmentation code (yzd-v/MGD
    # seg/configs/distillers/mgd), which adds CWD on the logits ("cwd").
    cfg.MODEL.DISTILL.MGD = CN()
    cfg.MODEL.DISTILL.MGD.WEIGHT = 2e-5
    cfg.MODEL.DISTILL.MGD.MASK_RATIO = 0.75
    cfg.MODEL.DISTILL.MGD.STUDENT_TAP = "res5"
    cfg.MODEL.DISTILL.MGD.TEACHER_TAP = "res5"
    cfg.MODEL.DISTILL.MGD.CONNECTOR = "conv1x1_bias"

    # DIST (Huang et al., NeurIPS 2022): inter-class and intra-class Pearson correlation of the
    # per-pixel class distributions. Defaults: the authors' segmentation code (hunto/DIST_KD
    # segmentation/losses/dist_kd.py, train_kd.py).
    cfg.MODEL.DISTILL.DIST = CN()
    cfg.MODEL.DISTILL.DIST.WEIGHT = 1.0
    cfg.MODEL.DISTILL.DIST.BETA = 1.0  # inter-class
    cfg.MODEL.DISTILL.DIST.GAMMA = 1.0  # intra-class
    cfg.MODEL.DISTILL.DIST.TEMPERATURE = 1.0
    # Relations of the "probabilities" (softmax at TEMPERATURE, paper and authors' code) or of
    # the raw "logits" (HWD's code).
    cfg.MODEL.DISTILL.DIST.INPUT = "probabilities"

    # FitNet (Romero et al., ICLR 2015): MSE between the connector's map of the student's hint
    # and the teacher's. Defaults: CIRKD's segmentation setting (scripts/train_kd/train_fitnet.sh).
    cfg.MODEL.DISTILL.FITNET = CN()
    cfg.MODEL.DISTILL.FITNET.WEIGHT = 10.0
    cfg.MODEL.DISTILL.FITNET.STUDENT_TAP = "head_features"
    cfg.MODEL.DISTILL.FITNET.TEACHER_TAP = "head_features"
    cfg.MODEL.DISTILL.FITNET.CONNECTOR = "conv1x1"

    # AT (Zagoruyko & Komodakis, ICLR 2017): L2-normalised spatial attention maps mean_c |f_c|^P.
    # Defaults: CIRKD's segmentation setting (scripts/train_kd/train_at.sh, losses/at.py).
    cfg.MODEL.DISTILL.AT = CN()
    cfg.MODEL.DISTILL.AT.WEIGHT = 10000.0
    # Taps compared (the same name in student and teacher), summed.
    cfg.MODEL.DISTILL.AT.TAPS = ["head_features"]
    cfg.MODEL.DISTILL.AT.P = 2.0
    # "code": mean squared difference of the normalised maps (the authors' and CIRKD's code);
    # "paper": half the L2 norm of their difference per image (AT Eq. 2), averaged over images.
    cfg.MODEL.DISTILL.AT.FORM = "code"

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
