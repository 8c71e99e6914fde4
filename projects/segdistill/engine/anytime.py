"""The anytime calibration driver: what ``tools/calibrate_exits.py`` and ``benchmarks/anytime_curve.py`` run.

A multi-exit training config becomes its anytime model's (:func:`anytime_cfg`), the model is
built with its trained weights (:func:`build_anytime_model`), the calibration split is
registered (:func:`register_split`; by default the held-out ``<train>_hs3_analysis`` split of
HS3's Phase 1, :func:`default_calibration_split`), the per-image records are collected with
the trainer's test loader and the thresholds chosen and written
(:func:`calibrate_from_config`); :func:`evaluate_policy` scores a policy on a split. The
evaluator, the records and the threshold search it drives are :mod:`segdistill.evaluation`'s
(``anytime``, ``anytime_pixel``, ``anytime_calibration``, ``anytime_risk``).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Optional, Sequence

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model

from ..config import add_segdistill_config
from ..convert import check_weights_file
from ..data import register_config_datasets
from ..evaluation.anytime import AnytimeEvaluator, ExitRecords, collect_records
from ..evaluation.anytime_calibration import calibrate, check_held_out
from ..evaluation.anytime_pixel import DEFAULT_PIXEL_GRID, PixelRecords, collect_pixel_records, pixel_candidates
from ..evaluation.anytime_risk import calibrate_risk, check_risk_args
from ..hs3 import (
    ANALYSIS_SUFFIX, REDUCED_SUFFIX, maybe_register_hs3_split, read_analysis_files, register_config_splits,
)
from ..modeling.meta_arch.anytime import PIXEL, load_anytime_weights, save_thresholds
from .trainer import Trainer
from .mixed_precision import fold_for_inference, inference_precision, use_channels_last

__all__ = ["anytime_cfg", "build_anytime_model", "register_split", "default_calibration_split",
           "calibrate_from_config", "evaluate_policy"]

logger = logging.getLogger(__name__)


def anytime_cfg(config_file: str, opts: Sequence[str] = ()):
    """A multi-exit training config (YAML) as its deployed anytime model's: the file, ``opts``,
    then ``MODEL.META_ARCHITECTURE "AnytimeSegmentor"``; HS3-style derived splits registered."""
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.META_ARCHITECTURE = "AnytimeSegmentor"
    register_config_datasets(cfg)
    register_config_splits(cfg)
    return cfg


def build_anytime_model(cfg):
    """The AnytimeSegmentor of ``cfg`` with ``MODEL.WEIGHTS`` loaded (training or anytime checkpoint), in eval()
    (``TEST.FOLD_BN``: its convolutions' BatchNorms folded)."""
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("Set MODEL.WEIGHTS to the trained multi-exit checkpoint (or its anytime deployment).")
    model = build_model(cfg)
    load_anytime_weights(model, cfg.MODEL.WEIGHTS, weights_format=cfg.MODEL.WEIGHTS_FORMAT)
    return fold_for_inference(use_channels_last(model, cfg.MODEL.CHANNELS_LAST).eval(), cfg.TEST.FOLD_BN)


def register_split(cfg, name: str) -> str:
    """Make ``name`` usable: registered already, or a derived ``<X>_hs3_analysis`` /
    ``<X>_hs3_reduced`` split of ``HS3_ANALYSIS`` (FRACTION, SPLIT_SEED, FILES)."""
    h = cfg.HS3_ANALYSIS
    if not maybe_register_hs3_split(name, h.FRACTION, h.SPLIT_SEED, read_analysis_files(h.FILES)):
        raise KeyError(f"Dataset {name!r} is not registered (nor a <registered>_hs3_analysis / _hs3_reduced split); "
                       f"registered: {sorted(DatasetCatalog.list())[:20]} ...")
    return name


def default_calibration_split(cfg) -> str:
    """``<train>_hs3_analysis``: the held-out part of ``DATASETS.TRAIN[0]`` (``HS3_ANALYSIS``'s
    split), registered on the way; warns when the model was trained on all of the training set."""
    if not cfg.DATASETS.TRAIN:
        raise ValueError("DATASETS.TRAIN is empty: name the calibration split with --dataset.")
    train = cfg.DATASETS.TRAIN[0]
    base = train[: -len(REDUCED_SUFFIX)] if train.endswith(REDUCED_SUFFIX) else train
    name = register_split(cfg, base + ANALYSIS_SUFFIX)
    if train == base:
        logger.warning("The model was trained on all of %s, calibration split %s included: its exits are more "
                       "confident there than on new images. Train on %s%s to hold the split out.",
                       train, name, base, REDUCED_SUFFIX)
    return name


def calibrate_from_config(cfg, output: str, *, dataset: str = "", max_drop: Optional[float] = None,
                          budget: Optional[float] = None, candidates: int = 16, records_path: str = "",
                          risk_control: str = "", epsilon: Optional[float] = None, delta: float = 0.1,
                          quality: str = "miou", policy: str = "confidence",
                          pixel_grid: Optional[Sequence] = None) -> dict:
    """What ``tools/calibrate_exits.py`` does: choose the thresholds of ``cfg``'s anytime model
    (:func:`anytime_cfg`, ``MODEL.WEIGHTS`` set) on a held-out split and write the thresholds
    file ``output``. Returns the file's summary (thresholds, ``None`` = never, and what they give
    on the split).

    ``dataset``: the calibration split (default ``<DATASETS.TRAIN[0]>_hs3_analysis``); an
    evaluation split, or one sharing an image with one, is refused before anything runs.
    ``records_path``: save the split's records there, or reuse them when the file holds
    records of this split. ``max_drop`` / ``budget``: :func:`~segdistill.evaluation.anytime_calibration.calibrate`'s objectives;
    ``risk_control`` (``crc`` / ``ucb``) with ``epsilon``, ``delta``, ``quality`` instead:
    :func:`~segdistill.evaluation.anytime_risk.calibrate_risk` (one shared threshold with a guarantee).

    ``policy``: ``confidence`` (image-level: every exit and the head run once per image,
    :func:`~segdistill.evaluation.anytime.collect_records`) or ``pixel`` (the per-pixel policy
    runs once per setting of ``pixel_grid``, shared thresholds or per-exit rows, default
    :data:`~segdistill.evaluation.anytime_pixel.DEFAULT_PIXEL_GRID`:
    :func:`~segdistill.evaluation.anytime_pixel.collect_pixel_records`); the file written is
    read as that policy's thresholds (``THRESHOLDS_FILE``)."""
    if policy not in ("confidence", PIXEL):
        raise ValueError(f"policy must be 'confidence' or 'pixel', got {policy!r}.")
    if pixel_grid is not None and policy != PIXEL:
        raise ValueError("pixel_grid is the candidate settings of policy 'pixel'; set policy 'pixel'.")
    if risk_control:  # checked before the model runs
        if max_drop is not None or budget is not None:
            raise ValueError("Give either risk_control (with epsilon) or max_drop / budget, not both.")
        check_risk_args(risk_control, epsilon, delta, quality)
    name = register_split(cfg, dataset) if dataset else default_calibration_split(cfg)
    check_held_out(name, list(cfg.DATASETS.TEST))
    if policy == PIXEL:
        grid = list(DEFAULT_PIXEL_GRID if pixel_grid is None else pixel_grid)
        exits = list(cfg.MODEL.EXITS.IN_FEATURES)
        pixel_candidates(grid, exits)  # checked before the model runs
        if records_path and os.path.isfile(records_path):
            records = PixelRecords.load(records_path)
            if records.dataset != name:
                raise ValueError(f"{records_path!r} holds records of {records.dataset!r}, not of the calibration "
                                 f"split {name!r}: remove the file or name another one.")
            logger.info("Reusing the per-pixel records in %s (%d images, %d settings).", records_path,
                        records.num_images, len(records.thresholds))
        else:
            check_weights_file(cfg.MODEL.WEIGHTS)
            model = build_anytime_model(cfg)
            with inference_precision(cfg.TEST.PRECISION, cfg.MODEL.DEVICE):
                records = collect_pixel_records(model, Trainer.build_test_loader(cfg, name), name, candidates=grid)
            if records_path:
                records.save(records_path)
    elif records_path and os.path.isfile(records_path):
        records = ExitRecords.load(records_path)
        if records.dataset != name:
            raise ValueError(f"{records_path!r} holds records of {records.dataset!r}, not of the calibration "
                             f"split {name!r}: remove the file or name another one.")
        logger.info("Reusing the records in %s (%d images).", records_path, records.num_images)
    else:
        check_weights_file(cfg.MODEL.WEIGHTS)
        model = build_anytime_model(cfg)
        with inference_precision(cfg.TEST.PRECISION, cfg.MODEL.DEVICE):
            records = collect_records(model, Trainer.build_test_loader(cfg, name), name)
        if records_path:
            records.save(records_path)
    if risk_control:
        result = calibrate_risk(records, epsilon=epsilon, method=risk_control, delta=delta, quality=quality)
    else:
        result = calibrate(records, max_drop=max_drop, budget=budget, candidates=candidates)
    a = cfg.MODEL.EXITS.ANYTIME
    summary = {**result.summary(), "policy": policy, "dataset": name, "images": records.num_images,
               "weights": cfg.MODEL.WEIGHTS}
    if policy == PIXEL:  # what every setting gave: G passes of the split were paid for them
        summary["pixel_mode"] = a.PIXEL_MODE
        summary["settings"] = [records.candidate_summary(i) for i in range(len(records.thresholds))]
    save_thresholds(output, result.thresholds, confidence=a.CONFIDENCE, pixel_threshold=a.PIXEL_THRESHOLD,
                    calibration=summary, policy=policy, pixel_cell=cfg.MODEL.EXITS.PIXEL.CELL)
    if not result.feasible:
        why = result.details.get("reason", "wrote the closest one")
        logger.warning("No threshold setting meets %s on %s: %s.", result.objective, name, why)
    return {"thresholds": {k: (None if not math.isfinite(v) else v) for k, v in result.thresholds.items()},
            **summary, "output": output}


def evaluate_policy(cfg, model, dataset_name: str, output_dir: Optional[str] = None) -> dict:
    """Run ``model`` (its current policy) on ``dataset_name`` with :class:`~segdistill.evaluation.anytime.AnytimeEvaluator`."""
    loader = Trainer.build_test_loader(cfg, dataset_name)
    evaluator = AnytimeEvaluator.for_model(model, dataset_name, distributed=False, output_dir=output_dir)
    with inference_precision(cfg.TEST.PRECISION, cfg.MODEL.DEVICE):
        return inference_on_dataset(model, loader, evaluator)
