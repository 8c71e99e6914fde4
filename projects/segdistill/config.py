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
    _add_anytime_keys(cfg)
    _add_hs3_analysis_keys(cfg)
    _add_distill_keys(cfg)


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
    """MODEL.DISTILL: teacher-student distillation (PD, CWD, HWD, FAKD)."""
    # Used by META_ARCHITECTURE "Distiller" (modeling/meta_arch/distill.py; docs/distillation.md).
    cfg.MODEL.DISTILL = CN()
    # Meta-architecture of the student, built from this config's MODEL as usual
    # (SemanticSegmentor, or any segmentor with distill_forward, e.g. MultiExitSegmentor).
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
    # Distillation terms, each logged as loss_<name> with the WEIGHT of its section below:
    # "pd", "cwd", "hwd", "fakd_cwd", "fakd_pd"; several combine (e.g. ["hwd", "fakd_pd"]).
    cfg.MODEL.DISTILL.LOSSES = ["cwd"]
    # Leave ignore pixels (labels resized to the logits) out of every distillation loss.
    # Off: every pixel counts, as in the papers (the teacher needs no label).
    cfg.MODEL.DISTILL.EXCLUDE_IGNORE = False
    # PD (FAKD Eq. 1): per-pixel KL of the class distributions at temperature T (x T^2).
    cfg.MODEL.DISTILL.PD = CN()
    cfg.MODEL.DISTILL.PD.WEIGHT = 1.0
    cfg.MODEL.DISTILL.PD.TEMPERATURE = 1.0
    # CWD (FAKD Eq. 2, HWD Eq. 3): KL of each channel's spatial softmax at temperature TAU.
    cfg.MODEL.DISTILL.CWD = CN()
    cfg.MODEL.DISTILL.CWD.WEIGHT = 3.0
    cfg.MODEL.DISTILL.CWD.TAU = 4.0
    # HWD (HWD section III-C): CWD with per-image channel weights. Defaults: the authors'
    # recommended run; the paper's variant is MU 0.0 + PIXEL_CORRECTION True.
    cfg.MODEL.DISTILL.HWD = CN()
    cfg.MODEL.DISTILL.HWD.WEIGHT = 3.0  # alpha
    cfg.MODEL.DISTILL.HWD.TAU = 4.0
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
    cfg.MODEL.DISTILL.FAKD_CWD.TAU = 4.0
    cfg.MODEL.DISTILL.FAKD_PD = CN()
    cfg.MODEL.DISTILL.FAKD_PD.WEIGHT = 1.0
    cfg.MODEL.DISTILL.FAKD_PD.TEMPERATURE = 1.0

