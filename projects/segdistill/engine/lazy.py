"""Training and evaluation of lazy (``.py``) configs, as detectron2's lazy training loop does.

A lazy config provides ``model``, ``dataloader.{train,test,evaluator}``, ``optimizer``,
``lr_multiplier`` and ``train`` (:func:`segdistill.config.lazy_train_defaults`, the keys a
file may set: ``output_dir``, ``init_checkpoint``, ``max_iter``,
``device``, ``amp.enabled``, ``amp.dtype``, ``channels_last``, ``test_precision``, ``fold_bn``, ``ddp``, ``checkpointer``, ``eval_period``, ``log_period``,
``seed``, ``allow_random_weights``, ``min_matched_weights``).

As in the YAML :class:`segdistill.engine.Trainer`: nothing is written into
``train.output_dir`` before the model and the data are built (:class:`RunOutput`); a
``dataloader.train`` built by :func:`segdistill.data.build_sem_seg_train_loader` resumes
exactly (:class:`ExactResumeHook`; any other loader restarts its order on ``--resume``, with
a warning); every evaluation first copies rank 0's BatchNorm statistics to every process;
``--eval-only`` refuses random or mismatched weights (:func:`load_weights_for_evaluation`).

Class weights computed from the training labels (the YAML configs'
``MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING``): a head's ``class_weights`` may name a weighting,
``model.sem_seg_head.class_weights=median_frequency`` (or ``enet``, ``none``); before the model
is built, :func:`resolve_class_weighting` replaces the name by the weights of
``dataloader.train.dataset.names`` (:func:`segdistill.data.dataset_class_weights`: the same
formula and cache as the YAML path). ``--eval-only`` needs no weights (they only weigh the
training loss): the name becomes ``None`` there.
"""
from __future__ import annotations

import logging
from typing import List

from detectron2.config import instantiate
from detectron2.utils.registry import locate
from detectron2.engine import hooks
from detectron2.engine.defaults import default_writers
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..convert import DEFAULT_MIN_MATCHED, SegDistillCheckpointer, check_weights_file
from ..data import check_eval_datasets, dataset_class_weights
from ..data.class_weights import CLASS_WEIGHTINGS
from ..hs3 import maybe_register_hs3_split
from ..modeling.backbones import HRNetBackbone, TimmBackbone
from ..modeling.test_time import TestTimeSegmentor, WholeImageOnly
from ..config import ConfigError, amp_dtype, check_dataset_names, check_device
from .ddp import broadcast_batchnorm_buffers, create_ddp_model
from .mixed_precision import build_train_step, fold_for_inference, inference_precision, model_device, use_channels_last
from .hooks import TrainingCurvesHook, TrainingProgressHook, exact_resume_hook, unwrap_model
from .run import RunOutput
from .trainer import anytime_evaluators, load_evaluation_weights, warn_random_backbone

__all__ = ["lazy_test", "lazy_fold_bn", "lazy_test_time_model", "lazy_train", "lazy_evaluate", "check_lazy_config", "skip_backbone_init",
           "random_backbones", "resolve_class_weighting"]

logger = logging.getLogger(__name__)
_TIMM_BACKBONES = (TimmBackbone, HRNetBackbone)


def _dataset_names(cfg, part: str):
    dataset = cfg.dataloader[part].get("dataset", None)
    if dataset is None or "names" not in dataset:
        return []
    return [dataset.names] if isinstance(dataset.names, str) else list(dataset.names)


def check_lazy_config(cfg) -> None:
    check_device("train.device", cfg.train.device)
    _step_dtype(cfg)
    _test_precision(cfg, cfg.train.device)
    if "test_time" in cfg:  # before anything is built: a whole-image-only model refuses windows and views
        args = _test_time_arguments(cfg)
        target = cfg.model.get("_target_", None)
        target = locate(target) if isinstance(target, str) else target
        if isinstance(target, type) and issubclass(target, WholeImageOnly) and (
                args.get("mode", "whole") != "whole" or len(args.get("scales", (1.0,))) > 1 or args.get("flip")):
            raise ConfigError(f"{target.__name__} runs whole images only (it chooses its answer per image); this "
                              f"config's test_time asks for {args}. Remove test_time from the config.")
    for part in ("train", "test"):
        names = _dataset_names(cfg, part)
        for name in names:  # HS3's derived <name>_hs3_{reduced,analysis} splits, as train_net's setup() does
            maybe_register_hs3_split(name)
        if names:
            check_dataset_names(f"dataloader.{part}.dataset.names", names)


def lazy_test(cfg, model):
    """Evaluate ``model`` on ``dataloader.test`` with ``dataloader.evaluator`` (``train.fold_bn``: a
    copy of it with its convolutions' BatchNorms folded)."""
    if "evaluator" not in cfg.dataloader:
        return {}
    broadcast_batchnorm_buffers(model)
    if lazy_fold_bn(cfg):
        model = fold_for_inference(unwrap_model(model), True, copy_model=True)
    evaluator = instantiate(cfg.dataloader.evaluator)
    names = _dataset_names(cfg, "test")
    anytime = anytime_evaluators(model, names[:1], cfg.train.output_dir) if len(names) == 1 else None
    if anytime:  # an AnytimeSegmentor: its policy's mIoU, MACs, time and exits (as the YAML Trainer)
        logger.info("Evaluating the AnytimeSegmentor with AnytimeEvaluator instead of %s.", type(evaluator).__name__)
        evaluator = anytime[0]
    with _test_precision(cfg, model_device(model)):
        results = inference_on_dataset(lazy_test_time_model(cfg, model), instantiate(cfg.dataloader.test), evaluator)
    if comm.is_main_process():
        print_csv_format(results)
    return results


def _test_time_arguments(cfg) -> dict:
    node = OmegaConf.to_container(cfg.test_time, resolve=True)
    node.pop("_target_", None)
    return node


def lazy_test_time_model(cfg, model):
    """``model`` run as a lazy config's top-level ``test_time`` (a ``TestTimeSegmentor`` call
    without ``model``: slide windows, multi-scale + flip) asks; ``model`` itself without one."""
    if "test_time" not in cfg:
        return model
    return TestTimeSegmentor(model=model, **_test_time_arguments(cfg))


def lazy_fold_bn(cfg) -> bool:
    """A lazy config's ``train.fold_bn`` (``TEST.FOLD_BN``'s counterpart)."""
    return bool(cfg.train.get("fold_bn", False))


def _test_precision(cfg, device):
    return inference_precision(cfg.train.get("test_precision", "fp32"), device, key="train.test_precision")


def _step_dtype(cfg):
    """The training step's autocast dtype (None: float32) from ``train.amp`` (a ConfigError when unsupported)."""
    amp = cfg.train.amp
    return amp_dtype(amp.enabled, amp.get("dtype", "auto"), cfg.train.device, key="train.amp.dtype")


def build_lazy_model(cfg):
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    use_channels_last(model, bool(cfg.train.get("channels_last", False)))
    logger.info("Model:\n%s", model)
    return model


_TIMM_BACKBONE_TARGETS = _TIMM_BACKBONES + tuple(f"{c.__module__}.{c.__qualname__}" for c in _TIMM_BACKBONES)


def _timm_backbone_nodes(node):
    """The LazyCall nodes of timm backbones (``TimmBackbone``, ``HRNetBackbone``) in a lazy config
    tree (another config file, e.g. a Distiller's teacher, is not entered)."""
    if isinstance(node, DictConfig):
        if node.get("_target_", None) in _TIMM_BACKBONE_TARGETS:
            yield node
        children = [node[k] for k in node.keys() if k != "_target_"]
    elif isinstance(node, ListConfig):
        children = list(node)
    else:
        return
    for child in children:
        yield from _timm_backbone_nodes(child)


def skip_backbone_init(node) -> List[str]:
    """Set ``checkpoint=""`` and ``pretrained=""`` on every timm backbone of a lazy config tree, in
    place; returns the ImageNet files and timm tags skipped. The lazy counterpart of
    ``MODEL.TIMM.CHECKPOINT "" MODEL.TIMM.PRETRAINED ""``: a model whose whole weights load
    afterwards needs no backbone initialisation (and nothing is downloaded for it)."""
    skipped = []
    for backbone in _timm_backbone_nodes(node):
        for key in ("checkpoint", "pretrained"):
            if backbone.get(key, ""):
                skipped.append(backbone[key])
                backbone[key] = ""
    return skipped


def random_backbones(node) -> int:
    """How many timm backbones of a lazy config tree have neither ``checkpoint`` nor ``pretrained``."""
    return sum(not (b.get("checkpoint", "") or b.get("pretrained", "")) for b in _timm_backbone_nodes(node))


def _named_weighting_nodes(node, path="model"):
    """(path, node) of the LazyCall nodes whose ``class_weights`` is a weighting's name."""
    if isinstance(node, DictConfig):
        if "_target_" in node and isinstance(node.get("class_weights", None), str):
            yield path, node
        for k in node.keys():
            if k != "_target_":
                yield from _named_weighting_nodes(node[k], f"{path}.{k}")
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node):
            yield from _named_weighting_nodes(child, f"{path}.{i}")


def resolve_class_weighting(cfg, *, training: bool = True) -> List[str]:
    """Replace every head's ``class_weights`` that names a weighting (``median_frequency``,
    ``enet``, ``none``) by the weights of ``dataloader.train``'s datasets, in place (``None`` for
    ``none``, and everywhere when not ``training``); returns the keys set."""
    names = _dataset_names(cfg, "train")
    done = []
    for path, node in _named_weighting_nodes(cfg.model):
        method, key = node.class_weights, f"{path}.class_weights"
        if method not in CLASS_WEIGHTINGS:
            raise ConfigError(f"{key}={method!r}: give one weight per class, or a weighting: {list(CLASS_WEIGHTINGS)}.")
        if method == "none" or not training:
            node.class_weights = None
            continue
        if not names:
            raise ConfigError(f"{key}={method!r} counts the labels of dataloader.train.dataset.names, which names no "
                              "dataset; give the weights (a list, one per class) or a training set.")
        for arg in ("num_classes", "ignore_value"):
            if arg not in node:
                raise ConfigError(f"{key}={method!r} needs {path}.{arg} set in the config (the label space it counts).")
        node.class_weights = dataset_class_weights(names, method, int(node.num_classes), int(node.ignore_value))
        done.append(key)
    return done


def lazy_evaluate(cfg, output: RunOutput = None):
    """``--eval-only``: the model with ``train.init_checkpoint`` (refused when empty or not
    fitting, unless ``train.allow_random_weights``), evaluated on ``dataloader.test``. With
    ``train.init_checkpoint`` set, the backbones' ImageNet initialisation (their ``checkpoint``)
    is skipped: the checkpoint gives the model's weights (detectron2's rule: the weights file wins)."""
    if cfg.train.init_checkpoint:
        skipped = skip_backbone_init(cfg.model)
        if skipped:
            logger.info("Evaluating %s: the backbone's ImageNet initialisation (%s) is skipped.",
                        cfg.train.init_checkpoint, ", ".join(skipped))
    resolve_class_weighting(cfg, training=False)
    model = build_lazy_model(cfg)
    load_evaluation_weights(
        model, cfg.train.init_checkpoint, key="train.init_checkpoint",
        allow_random=bool(cfg.train.get("allow_random_weights", False)), allow_key="train.allow_random_weights",
        min_matched=float(cfg.train.get("min_matched_weights", DEFAULT_MIN_MATCHED)),
    )
    check_eval_datasets(_dataset_names(cfg, "test"), "dataloader.test.dataset.names")
    (output if output is not None else RunOutput(cfg, mode="eval")).open()
    return lazy_test(cfg, model)


def lazy_train(cfg, resume: bool = False, output: RunOutput = None):
    output = output if output is not None else RunOutput(cfg, mode="resume" if resume else "train")
    output.check()
    step_dtype = _step_dtype(cfg)  # before anything is built or written
    resolve_class_weighting(cfg)
    model = build_lazy_model(cfg)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    check_eval_datasets(_dataset_names(cfg, "test"), "dataloader.test.dataset.names")
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = build_train_step(model, train_loader, optimizer, dtype=step_dtype)
    checkpointer = SegDistillCheckpointer(model, cfg.train.output_dir, trainer=trainer)  # converts foreign files
    output.open()  # the first write into train.output_dir: model and data are built
    main = comm.is_main_process()
    trainer.register_hooks([
        hooks.IterationTimer(),
        exact_resume_hook(train_loader, "dataloader.train"),
        TrainingProgressHook(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None,
        hooks.EvalHook(cfg.train.eval_period, lambda: lazy_test(cfg, model)),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
        if main else None,
        TrainingCurvesHook(cfg.train.output_dir),
    ])
    if not (resume and checkpointer.has_checkpoint()):
        check_weights_file(cfg.train.init_checkpoint, "train.init_checkpoint")
        if not cfg.train.init_checkpoint and random_backbones(cfg.model):
            warn_random_backbone(_dataset_names(cfg, "train"),
                                 "train.init_checkpoint and the backbone's checkpoint and pretrained are empty")
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
