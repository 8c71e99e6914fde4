"""Training and evaluation of lazy (``.py``) configs, as detectron2's lazy training loop does.

A lazy config provides ``model``, ``dataloader.{train,test,evaluator}``, ``optimizer``,
``lr_multiplier`` and ``train`` (``output_dir``, ``init_checkpoint``, ``max_iter``,
``device``, ``amp.enabled``, ``ddp``, ``checkpointer``, ``eval_period``, ``log_period``).
"""
from __future__ import annotations

import logging

from detectron2.config import instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, hooks
from detectron2.engine.defaults import default_writers
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from ..convert import SegDistillCheckpointer
from ..hs3 import maybe_register_hs3_split
from .checks import check_dataset_names, check_device
from .ddp import create_ddp_model
from .hooks import TrainingCurvesHook, TrainingProgressHook
from .trainer import check_weights_file

__all__ = ["lazy_test", "lazy_train", "check_lazy_config"]

logger = logging.getLogger(__name__)


def check_lazy_config(cfg) -> None:
    check_device("train.device", cfg.train.device)
    for part in ("train", "test"):
        dataset = cfg.dataloader[part].get("dataset", None)
        if dataset is not None and "names" in dataset:
            names = [dataset.names] if isinstance(dataset.names, str) else list(dataset.names)
            for name in names:  # HS3's derived <name>_hs3_{reduced,analysis} splits, as train_net's setup() does
                maybe_register_hs3_split(name)
            check_dataset_names(f"dataloader.{part}.dataset.names", names)


def lazy_test(cfg, model):
    """Evaluate ``model`` on ``dataloader.test`` with ``dataloader.evaluator``."""
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    return results


def build_lazy_model(cfg):
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    logger.info("Model:\n%s", model)
    return model


def lazy_train(cfg, resume: bool = False):
    model = build_lazy_model(cfg)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optimizer)
    checkpointer = SegDistillCheckpointer(model, cfg.train.output_dir, trainer=trainer)  # converts foreign files
    main = comm.is_main_process()
    trainer.register_hooks([
        hooks.IterationTimer(),
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
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
