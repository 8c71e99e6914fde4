"""Model zoo: every config builds, trains a step and infers; the heads' contract; the norm
switch; the papers' parameter counts (within 3%); the generated model table."""
import glob
import os

import pytest
import torch

from conftest import REPO, no_imagenet_start, random_batch, tiny_cfg, write_clusters
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from segdistill.modeling.heads import OCRHead, upsample_logits
from segdistill.utils import model_zoo as model_table

# Meta-architectures this file builds. A new one must be added here, with what its configs
# need to build on CPU from nothing (see _prepare_cfg).
HANDLED_META_ARCHS = {"SemanticSegmentorAnySize", "SemanticSegmentor", "MultiExitSegmentor", "Distiller"}
H, W = 64, 64  # every config is run on tiny images, on CPU, with random weights


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny inputs: one intra-op thread is 3-9x faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# configs/reproduce/ (the papers' recipes) are built, trained and checked against their
# sources in tests/test_reproduce.py.
_RECIPES = os.sep + "reproduce" + os.sep
YAML_CONFIGS = [p for p in model_table.yaml_configs() if _RECIPES not in p]
LAZY_CONFIGS = sorted(
    p for p in glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True)
    if os.sep + "common" + os.sep not in p and _RECIPES not in p
)


def _rel(path):
    return os.path.relpath(path, REPO)


def _check_meta_arch(name, where):
    assert name in HANDLED_META_ARCHS, (
        f"{where} uses meta-architecture {name!r}: add it to HANDLED_META_ARCHS (with its checks) "
        "in tests/test_model_zoo.py"
    )


def _expected_losses(head):
    keys = {"loss_sem_seg"}
    if getattr(head, "aux_head", None) is not None:
        keys.add("loss_aux")
    if isinstance(head, OCRHead):
        keys.add("loss_ocr_aux")
    return keys


def _prepare_cfg(cfg, tmp_dir):
    """What a config needs to build from nothing: HS3 a clusters file (every exit: classes
    k mod 2), a Distiller its teacher with random weights (no checkpoint exists here); no ImageNet start."""
    no_imagenet_start(cfg)
    if cfg.MODEL.META_ARCHITECTURE == "MultiExitSegmentor" or cfg.MODEL.DISTILL.STUDENT_META_ARCHITECTURE == "MultiExitSegmentor":
        if cfg.MODEL.EXITS.MODE == "hs3":
            from detectron2.data import MetadataCatalog

            k = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
            names = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("stuff_classes", None) if cfg.DATASETS.TRAIN else None
            cfg.MODEL.EXITS.HS3.CLUSTERS_FILE = write_clusters(
                os.path.join(str(tmp_dir), "clusters.json"), {e: [i % 2 for i in range(k)] for e in cfg.MODEL.EXITS.IN_FEATURES},
                class_names=names if names and len(names) == k else None)
    if cfg.MODEL.META_ARCHITECTURE == "Distiller":
        cfg.MODEL.DISTILL.TEACHER.WEIGHTS = ""
        cfg.MODEL.DISTILL.TEACHER.ALLOW_RANDOM = True
        # nor its backbone file (the CamVid table's teacher starts from output/pretrain/)
        cfg.MODEL.DISTILL.TEACHER.OPTS = list(cfg.MODEL.DISTILL.TEACHER.OPTS) + ["MODEL.TIMM.CHECKPOINT", ""]
        # MasKD's tokens are learnt on the trained teacher; a random teacher draws them instead
        cfg.MODEL.DISTILL.MASKD.TOKENS_FILE = ""
    return cfg


def _segmentor(model):
    return getattr(model, "student", model)  # a Distiller's deployed model is its student


def _train_and_infer(model, num_classes):
    """One training step (finite losses, gradients reach the backbone) and one inference step."""
    model.train()
    losses = model(random_batch(2, H, W, num_classes))
    seg = _segmentor(model)
    if type(model).__name__ in ("SemanticSegmentorAnySize", "SemanticSegmentor"):
        assert set(losses) == _expected_losses(model.sem_seg_head)
    else:  # the head's own terms plus the method's named terms
        assert _expected_losses(seg.sem_seg_head) <= set(losses), sorted(losses)
        assert all(k.startswith("loss_") and torch.isfinite(v) for k, v in losses.items()), losses
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in seg.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads[:1]) and grads[0].abs().sum() > 0
    model.eval()
    with torch.no_grad():  # output at the requested height/width, not the input's
        out = model([{**random_batch(1, H, W, num_classes, with_labels=False)[0], "height": 80, "width": 96}])
    assert out[0]["sem_seg"].shape == (num_classes, 80, 96)
    assert torch.isfinite(out[0]["sem_seg"]).all()


HEAD_SETTINGS = ("common_stride", "ignore_value", "loss_weight", "loss_type", "ocr_aux_loss_weight", "in_features")


def _signature(model):
    """What a lazy config and its YAML twin must share: modules, parameters, loss settings."""
    head = _segmentor(model).sem_seg_head
    settings = {k: getattr(head, k) for k in HEAD_SETTINGS if hasattr(head, k)}
    aux = getattr(head, "aux_head", None)
    if aux is not None:
        settings.update(aux=(aux.in_feature, aux.stride, aux.loss_weight))
    return {
        "modules": [type(m).__name__ for m in model.modules()],
        "params": {k: tuple(v.shape) for k, v in model.named_parameters()},
        "head": settings,
    }


_SIGNATURES = {}  # YAML path -> signature of the model built from it (each config is built once)


@pytest.mark.parametrize("path", YAML_CONFIGS, ids=_rel)
def test_yaml_config_builds_trains_and_infers(path, tmp_path):
    _check_meta_arch(model_table.meta_arch_of(path), _rel(path))
    torch.manual_seed(0)
    cfg = _prepare_cfg(model_table.load_cfg(path), tmp_path)
    model = build_model(cfg)
    _SIGNATURES[path] = _signature(model)
    _train_and_infer(model, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)


def _point_lazy_clusters_files(node, tmp_dir):
    """HS3 lazy configs read their clusters file through calls taking (path, exit_names,
    class_names): write a file (classes k mod 2) for each and point the calls at it."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, DictConfig):
        if {"path", "exit_names", "class_names"} <= set(node.keys()) and isinstance(node.class_names, int):
            node.path = write_clusters(os.path.join(str(tmp_dir), "lazy_clusters.json"),
                                       {e: [i % 2 for i in range(node.class_names)] for e in node.exit_names})
        for key in node.keys():
            _point_lazy_clusters_files(node[key], tmp_dir)
    elif isinstance(node, ListConfig):
        for item in node:
            _point_lazy_clusters_files(item, tmp_dir)


def _lazy_model_cfg(path, tmp_dir):
    cfg = LazyConfig.load(path)
    if "model" not in cfg:
        pytest.skip(f"{_rel(path)} defines no model")
    cfg.train.device = "cpu"
    cfg.train.init_checkpoint = ""
    no_imagenet_start(cfg)
    if "teacher" in cfg.model and "allow_random" in cfg.model.teacher:  # Distiller: no trained teacher here
        cfg.model.teacher.weights = ""
        cfg.model.teacher.allow_random = True
        opts = list(cfg.model.losses.get("opts", []))
        if "MODEL.DISTILL.MASKD.TOKENS_FILE" in opts:  # MasKD: a random teacher draws its tokens (the
            # losses read whether the teacher is random from their own keys)
            opts[opts.index("MODEL.DISTILL.MASKD.TOKENS_FILE") + 1] = ""
            cfg.model.losses.opts = opts + ["MODEL.DISTILL.TEACHER.ALLOW_RANDOM", "True"]
    _point_lazy_clusters_files(cfg.model, tmp_dir)
    return cfg


def _num_classes(model):
    return _segmentor(model).sem_seg_head.predictor.out_channels


@pytest.mark.parametrize("path", LAZY_CONFIGS, ids=_rel)
def test_lazy_config_builds_trains_and_infers(path, tmp_path):
    """Also: a lazy config with a YAML twin builds the same model (modules, parameter names
    and shapes, loss settings)."""
    cfg = _lazy_model_cfg(path, tmp_path)
    target = cfg.model._target_
    _check_meta_arch(getattr(target, "__name__", str(target).rsplit(".", 1)[-1]), _rel(path))
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    twin = path[:-3] + ".yaml"
    if os.path.exists(twin):
        if twin not in _SIGNATURES:  # the YAML test did not run in this session
            _SIGNATURES[twin] = _signature(build_model(_prepare_cfg(model_table.load_cfg(twin), tmp_path)))
        assert _signature(model) == _SIGNATURES[twin], f"{_rel(path)} and {_rel(twin)} build different models"
    _train_and_infer(model, _num_classes(model))


def test_every_zoo_pair_has_yaml_and_lazy_configs():
    models = ["deeplabv3_r101", "deeplabv3_r18", "deeplabv3_mbv2", "pspnet_r101", "pspnet_r18",
              "deeplabv3plus_r101", "hrnetv2_w18", "hrnetv2_w48", "ocrnet_hrnetv2_w18", "ocrnet_hrnetv2_w48"]
    for dataset, classes in (("cityscapes", 19), ("coco_stuff", 171)):
        for m in models:
            for ext in ("yaml", "py"):
                assert os.path.isfile(os.path.join(REPO, "configs", dataset, "baseline", f"{m}.{ext}")), (dataset, m, ext)
            assert model_table.load_cfg(f"configs/{dataset}/baseline/{m}.yaml").MODEL.SEM_SEG_HEAD.NUM_CLASSES == classes


# ---- the heads' contract -------------------------------------------------------------

HRNET_FEATURES = ["res2", "res3", "res4", "res5"]


def _head_cfg(head, **overrides):
    if head not in HRNET_HEADS:
        return tiny_cfg("resnet18", head, **overrides)
    cfg = tiny_cfg("hrnet_w18_small", head, **overrides)
    cfg.MODEL.TIMM.OUT_FEATURES = HRNET_FEATURES
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = HRNET_FEATURES
    cfg.MODEL.SEM_SEG_HEAD.OCR_MID_CHANNELS = 32
    cfg.MODEL.SEM_SEG_HEAD.OCR_KEY_CHANNELS = 16
    cfg.MODEL.SEM_SEG_HEAD.OCR_REGION_CHANNELS = 16
    return cfg


HRNET_HEADS = ["HRNetV2Head", "OCRHead"]
NEW_HEADS = ["PSPHead"] + HRNET_HEADS
ALL_HEADS = ["SegDeepLabV3Head", "SegDeepLabV3PlusHead", "FCNHead"] + NEW_HEADS


@pytest.mark.parametrize("head", ALL_HEADS)
def test_exposed_features_and_classifier_reproduce_logits(head):
    torch.manual_seed(0)
    model = build_model(_head_cfg(head)).eval()
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        feats = model.backbone(x)
        logits, _ = model.sem_seg_head(feats)
        out = model.sem_seg_head.forward_outputs(feats)
        manual = model.sem_seg_head.predictor(out["features"])
    assert isinstance(model.sem_seg_head.predictor, torch.nn.Conv2d)
    assert model.sem_seg_head.predictor.kernel_size == (1, 1)
    assert torch.equal(out["logits"], manual)
    assert torch.equal(upsample_logits(manual, model.sem_seg_head.common_stride), logits)
    assert logits.shape == (2, 5, H, W)
    assert not any("aux" in k for k in out)  # nothing auxiliary at inference
    # the exposed features are the head's, not the backbone's: changing them changes the logits
    assert not torch.equal(model.sem_seg_head.predictor(out["features"] + 1), manual)


def test_head_strides_and_widths():
    psp = build_model(_head_cfg("PSPHead")).sem_seg_head
    assert psp.common_stride == 8 and [s.kernel_size for s in psp.ppm.stages] == [(1, 1)] * 4
    assert psp.ppm.bins == [1, 2, 3, 6] and psp.ppm.out_channels == 512 + 4 * 128  # in/4 per bin
    hr = build_model(_head_cfg("HRNetV2Head")).sem_seg_head
    assert hr.common_stride == 4 and hr.in_features == HRNET_FEATURES
    assert hr.predictor.in_channels == 16 + 32 + 64 + 128  # hrnet_w18_small: concatenated width
    ocr = build_model(_head_cfg("OCRHead")).sem_seg_head
    assert ocr.predictor.in_channels == 32 and ocr.context.key_channels == 16


def test_ocr_soft_regions_and_their_loss():
    torch.manual_seed(0)
    model = build_model(_head_cfg("OCRHead")).train()
    head = model.sem_seg_head
    feats = model.backbone(torch.randn(2, 3, H, W))
    out = head.forward_outputs(feats)
    assert out["ocr_aux_logits"].shape == out["logits"].shape == (2, 5, H // 4, W // 4)
    target = torch.randint(0, 5, (2, H, W))
    l4 = head.losses(out, target)["loss_ocr_aux"]
    head.ocr_aux_loss_weight = 0.8
    assert torch.allclose(head.losses(out, target)["loss_ocr_aux"], 2 * l4)
    # the regions steer the context: other regions, other features
    model.eval()
    with torch.no_grad():
        f, regions = head.forward_features_and_regions(feats)
        x = torch.cat([feats[k] if i == 0 else torch.nn.functional.interpolate(
            feats[k], size=feats["res2"].shape[-2:], mode="bilinear", align_corners=False)
            for i, k in enumerate(HRNET_FEATURES)], dim=1)
        other = head.context(head.pixel_conv(x), regions.flip(1))
    assert torch.equal(head.context(head.pixel_conv(x), regions), f)
    assert not torch.allclose(other, f)


def test_aux_head_on_new_heads():
    cfg = _head_cfg("PSPHead")
    cfg.MODEL.TIMM.OUT_FEATURES = ["res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.AUX_IN_FEATURE = "res4"
    losses = build_model(cfg).train()(random_batch(2, H, W, 5))
    assert set(losses) == {"loss_sem_seg", "loss_aux"}
    cfg = _head_cfg("HRNetV2Head")
    cfg.MODEL.TIMM.OUT_FEATURES = HRNET_FEATURES + ["stage3_b2"]
    cfg.MODEL.SEM_SEG_HEAD.AUX_IN_FEATURE = "stage3_b2"
    losses = build_model(cfg).train()(random_batch(2, H, W, 5))
    assert set(losses) == {"loss_sem_seg", "loss_aux"}


def test_bad_head_configs_are_clear_errors():
    cfg = _head_cfg("OCRHead")
    cfg.MODEL.TIMM.NAME = "resnet18"
    cfg.MODEL.TIMM.OUTPUT_STRIDE = 8
    cfg.MODEL.TIMM.OUT_FEATURES = ["res5"]  # OCR asked for res2..res5, the backbone gives res5
    with pytest.raises(ValueError, match=r"OCRHead .*\['res2', 'res3', 'res4'\] missing.*backbone gives \['res5'\]"):
        build_model(cfg)
    cfg = _head_cfg("HRNetV2Head")
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = []
    with pytest.raises(ValueError, match=r"On HRNet use \['res2', 'res3', 'res4', 'res5'\]"):
        build_model(cfg)
    cfg = _head_cfg("PSPHead")
    cfg.MODEL.SEM_SEG_HEAD.PSP_BINS = [1, 0]
    with pytest.raises(ValueError, match="PSP_BINS"):
        build_model(cfg)
    cfg = _head_cfg("PSPHead")
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res4", "res5"]
    with pytest.raises(ValueError, match="exactly one backbone feature"):
        build_model(cfg)


# ---- one norm switch ------------------------------------------------------------------

def _norm_kinds(module):
    return {type(m).__name__ for m in module.modules() if "Norm" in type(m).__name__}


@pytest.mark.parametrize("head", NEW_HEADS)
def test_model_norm_sets_backbone_and_head(head):
    from detectron2.layers import FrozenBatchNorm2d

    cfg = _head_cfg(head)
    cfg.MODEL.NORM = "FrozenBN"
    model = build_model(cfg)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.sem_seg_head.modules())
    assert "BatchNorm2d" not in _norm_kinds(model.backbone) and _norm_kinds(model.backbone)
    cfg.MODEL.NORM = "SyncBN"
    model = build_model(cfg)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.sem_seg_head.modules())
    assert any("SyncBatchNorm" in k for k in _norm_kinds(model.backbone))
    losses = model.train()(random_batch(2, H, W, 5))  # one process: SyncBN falls back to BN
    assert torch.isfinite(sum(losses.values()))
    for norm in ("BN", "auto"):  # auto: one process -> BN
        cfg.MODEL.NORM = norm
        model = build_model(cfg)
        assert not any(isinstance(m, (torch.nn.SyncBatchNorm, FrozenBatchNorm2d)) for m in model.modules())


@pytest.mark.parametrize("head", ["SegDeepLabV3Head", "SegDeepLabV3PlusHead", "FCNHead"])
def test_model_norm_reaches_the_other_heads_and_the_aux_head(head):
    from detectron2.layers import FrozenBatchNorm2d

    cfg = tiny_cfg("resnet18", head)
    cfg.MODEL.TIMM.OUT_FEATURES = list(cfg.MODEL.TIMM.OUT_FEATURES) + ["res4"]
    cfg.MODEL.SEM_SEG_HEAD.AUX_IN_FEATURE = "res4"
    cfg.MODEL.NORM = "FrozenBN"
    model = build_model(cfg)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.sem_seg_head.aux_head.modules())


def test_model_norm_default_keeps_per_part_keys_and_rejects_unknown():
    from segdistill.modeling.backbones.norm import resolve_norm

    cfg = _head_cfg("PSPHead")
    cfg.MODEL.TIMM.NORM = "FrozenBN"
    assert cfg.MODEL.NORM == "" and resolve_norm(cfg, "backbone") == "FrozenBN" and resolve_norm(cfg, "head") == "BN"
    model = build_model(cfg)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.sem_seg_head.modules())
    cfg.MODEL.NORM = "GroupNorm"
    with pytest.raises(ValueError, match=r"MODEL.NORM 'GroupNorm'.*'auto', 'BN', 'SyncBN', 'FrozenBN'"):
        build_model(cfg)


def test_yaml_and_lazy_norm_auto_is_bn_on_one_process():
    from segdistill.modeling.backbones.norm import auto_norm

    assert auto_norm("cuda") == "BN" and auto_norm("cpu") == "BN"
    for dataset in ("cityscapes", "coco_stuff"):
        assert model_table.load_cfg(f"configs/{dataset}/baseline/pspnet_r18.yaml").MODEL.NORM == "auto"


# ---- the papers' parameter counts and the model table -----------------------------------

PARAM_REFS = [r for r in model_table.PAPER_REFS if r.params_m]


@pytest.mark.parametrize("ref", PARAM_REFS, ids=[r.name for r in PARAM_REFS])
def test_parameter_counts_match_the_papers(ref):
    cfg = model_table.load_cfg(ref.config, num_classes=ref.num_classes)
    model = build_model(cfg)
    params = model_table.count_params(model)["train"]  # the papers count the aux head (CIRKD's code)
    assert abs(params / 1e6 - ref.params_m) / ref.params_m < 0.03, (ref.name, params, ref.params_m)


def test_flop_count_is_macs_of_the_inference_path():
    model = build_model(_head_cfg("HRNetV2Head")).eval()
    f = model_table.count_flops(model, (H, W))
    assert 0 < f["macs"] <= f["total"]
    # doubling the pixels doubles the convolutions' multiply-adds (no global pooling in HRNetV2)
    f2 = model_table.count_flops(model, (H, 2 * W))
    assert abs(f2["macs"] / f["macs"] - 2) < 0.02


def test_model_table_lists_every_baseline_and_the_papers():
    path = os.path.join(REPO, "docs", "model_zoo.md")
    assert os.path.isfile(path), "run python tools/model_table.py"
    text = open(path).read()
    for cfg in glob.glob(os.path.join(REPO, "configs", "*", "baseline", "*.yaml")):
        assert f"`{_rel(cfg)}`" in text, f"{_rel(cfg)} missing from docs/model_zoo.md: run python tools/model_table.py"
    for ref in model_table.PAPER_REFS:
        assert f"| {ref.name} | {ref.source} |" in text


def test_readme_has_the_model_table():
    text = open(os.path.join(REPO, "README.md")).read()
    assert "## Model zoo" in text and model_table.PAPER_HEAD.splitlines()[0] in text
    for ref in model_table.PAPER_REFS:
        assert f"| {ref.name} |" in text
