"""Anytime inference: the evaluator of an exit policy and the per-image records of every exit.

* :class:`AnytimeEvaluator` scores an ``AnytimeSegmentor``'s outputs: mIoU, average MACs
  (per image: the output's own count ``anytime["macs"]`` when it has one, as policy
  ``pixel`` does; else fvcore's, from the path it took: exits run + answer), the median wall time per
  image after a warm-up (the first ``WARMUP_IMAGES`` images of each process are not timed:
  CUDA's start-up, cuDNN's algorithm search and the allocator's first blocks land on them)
  and the exit histogram of the policy, next to the final output's (mIoU of ``sem_seg_final``
  when the model returns it, MACs of the plain path, its measured time).
* :func:`collect_records` runs every exit and the final head on a split once and keeps, per
  image, each exit's confidence, each output's confusion matrix and the MACs of the parts of
  every path (:class:`ExitRecords`). Any threshold setting's mIoU, average MACs and exit
  histogram on that split then follow exactly without running the model again
  (:func:`policy_outcome`, :func:`evaluate_thresholds`): the confidence policy's answer for
  an image *is* one of those outputs.

Choosing the thresholds on such records is :mod:`.anytime_calibration` (an mIoU margin or a
MACs budget) and :mod:`.anytime_risk` (risk control); the command-line driver that builds
the model and registers the split is :mod:`segdistill.engine.anytime`.
"""
from __future__ import annotations

import itertools
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ..data.labels import check_label_values, read_dataset_label
from ..data.mapper import EVAL_LABEL
from ..modeling.meta_arch.anytime import FINAL, AnytimeCosts
from .sem_seg import SemSegEvaluator, device_confusion_matrix

__all__ = [
    "WARMUP_IMAGES", "AnytimeEvaluator", "ExitRecords", "collect_records", "PolicyOutcome", "policy_outcome", "fixed_exit_outcome",
    "evaluate_thresholds", "miou_of_confusions",
]

logger = logging.getLogger(__name__)

#: Images of each process left out of the timings (the first ones: start-up costs).
WARMUP_IMAGES = 5


def miou_of_confusions(conf: np.ndarray) -> np.ndarray:
    """mIoU (%) of a stack of confusion matrices ``... x K x K`` (rows = ground truth), over the
    classes present in the ground truth, as :func:`~.metrics.metrics_from_confusion`."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    gt = conf.sum(-1)
    union = gt + conf.sum(-2) - tp
    present = gt > 0
    iou = np.where(present, tp / np.where(union > 0, union, 1.0), 0.0)
    return 100.0 * iou.sum(-1) / np.maximum(present.sum(-1), 1)


# ----------------------------------------------------------------------------- evaluator
class AnytimeEvaluator(DatasetEvaluator):
    """mIoU, average MACs, average time per image and exit histogram of an anytime policy,
    next to the final output's.

    Args:
        dataset_name: the evaluated split.
        costs: ``input_hw -> AnytimeCosts`` (``AnytimeSegmentor.costs``).
        exit_names: the model's exits (histogram rows, zeros included).
        policy: the policy's name, for the log.
    The results hold ``sem_seg`` (the policy's answers), ``sem_seg_final`` (when the model
    returns it) and ``anytime``: ``mIoU``, ``mIoU_final``, ``GMACs``, ``GMACs_final``,
    ``MACs_saved_pct``, ``time_ms``, ``time_ms_final`` (medians over the images after the first
    ``warmup_images`` of each process; over all of them when no process has more),
    ``timed_images``, ``images`` and ``answered_<exit>_pct``; for a per-pixel policy (outputs
    with ``anytime["answered_pct"]`` / ``["active_pct"]``) also the means over images of the
    share of pixels each output answered, ``pixels_<exit or final>_pct``, and of the share
    active at each stage, ``active_<stage>_pct``.
    """

    def __init__(self, dataset_name: str, *, costs: Callable[[Tuple[int, int]], AnytimeCosts],
                 exit_names: Sequence[str] = (), policy: str = "", distributed: bool = True,
                 output_dir: Optional[str] = None, warmup_images: int = WARMUP_IMAGES):
        self._scorer = SemSegEvaluator(dataset_name, distributed=distributed, output_dir=output_dir)
        self._warmup = int(warmup_images)
        self._costs = costs
        self._exit_names = list(exit_names)
        self._policy = policy
        self._distributed = distributed
        self.reset()

    @classmethod
    def for_model(cls, model, dataset_name: str, *, distributed: bool = True,
                  output_dir: Optional[str] = None) -> "AnytimeEvaluator":
        """The evaluator of ``model`` (an ``AnytimeSegmentor``): its costs, exits and policy."""
        return cls(dataset_name, costs=model.costs, exit_names=model.exit_names, policy=model.policy,
                   distributed=distributed, output_dir=output_dir)

    def reset(self):
        self._scorer.reset()
        self._rows: List[tuple] = []

    def process(self, inputs, outputs):
        self._scorer.process(inputs, outputs)
        for out in outputs:
            a = out["anytime"]
            c = self._costs(tuple(a["input_hw"]))
            # a per-pixel policy counts its own MACs (masked stages); an image-level path's follow from the parts
            macs = float(a["macs"]) if "macs" in a else c.macs(out["sem_seg_exit"], a["evaluated"])
            self._rows.append((out["sem_seg_exit"], macs, c.macs(FINAL, ()),
                               a["time_s"], a.get("final_time_s", math.nan), len(self._rows) >= self._warmup,
                               dict(a.get("answered_pct", {})), dict(a.get("active_pct", {}))))

    def evaluate(self):
        results = self._scorer.evaluate()
        rows = self._rows
        if self._distributed:
            rows = list(itertools.chain(*comm.all_gather(rows)))
            if not comm.is_main_process():
                return None
        if not rows:
            logger.warning("AnytimeEvaluator received no prediction.")
            return results
        answers = [r[0] for r in rows]
        macs, final_macs, t, tf = (np.array([r[i] for r in rows], dtype=np.float64) for i in range(1, 5))
        timed = np.array([r[5] for r in rows], dtype=bool)
        if not timed.any():
            logger.warning("AnytimeEvaluator: %d images, all within the %d warm-up images of their process: the "
                           "timings include the start-up.", len(rows), self._warmup)
            timed[:] = True
        t, tf = t[timed], tf[timed]
        res = OrderedDict()
        res["mIoU"] = results["sem_seg"]["mIoU"]
        res["mIoU_final"] = results["sem_seg_final"]["mIoU"] if "sem_seg_final" in results else math.nan
        res["GMACs"] = macs.mean() / 1e9
        res["GMACs_final"] = final_macs.mean() / 1e9
        res["MACs_saved_pct"] = 100.0 * (1.0 - macs.mean() / final_macs.mean())
        res["time_ms"] = 1e3 * float(np.median(t))
        res["time_ms_final"] = 1e3 * float(np.median(tf)) if np.isfinite(tf).all() else math.nan
        res["timed_images"] = float(timed.sum())
        res["images"] = float(len(rows))
        for name in self._exit_names + [n for n in dict.fromkeys(answers) if n not in self._exit_names + [FINAL]] + [FINAL]:
            res[f"answered_{name}_pct"] = 100.0 * answers.count(name) / len(rows)
        for col, prefix in ((6, "pixels"), (7, "active")):  # per-pixel policies: mean shares over images
            keys = list(dict.fromkeys(k for r in rows for k in r[col]))
            for k in keys:
                res[f"{prefix}_{k}_pct"] = float(np.mean([r[col].get(k, 0.0) for r in rows]))
        results["anytime"] = res
        logger.info("Anytime policy %r: mIoU %.2f (final %.2f), %.3f GMACs (final %.3f, %.1f%% saved), "
                    "median %.1f ms/image (final %.1f; %d images after the warm-up); answered: %s", self._policy,
                    res["mIoU"], res["mIoU_final"], res["GMACs"], res["GMACs_final"], res["MACs_saved_pct"],
                    res["time_ms"], res["time_ms_final"], int(res["timed_images"]),
                    {k[9:-4]: round(v, 1) for k, v in res.items() if k.startswith("answered_")})
        return results


# ----------------------------------------------------------------------------- records
@dataclass
class ExitRecords:
    """Per image of a split: every exit's confidence, every output's confusion matrix, path costs.

    ``confidences`` N x E; ``confusions`` N x (E + 1) x K x K (outputs: the exits shallowest
    first, then the final head; rows = ground truth); MACs per image: ``prefix``, ``exit_macs``,
    ``answer`` N x E and ``final`` N (:class:`AnytimeCosts`' parts).
    """

    exit_names: List[str]
    confidences: np.ndarray
    confusions: np.ndarray
    prefix: np.ndarray
    exit_macs: np.ndarray
    answer: np.ndarray
    final: np.ndarray
    dataset: str = ""
    class_names: List[str] = field(default_factory=list)

    def __post_init__(self):
        n, e = len(self.final), len(self.exit_names)
        for name in ("confidences", "prefix", "exit_macs", "answer"):
            if np.shape(getattr(self, name)) != (n, e):
                raise ValueError(f"ExitRecords.{name} must be {n} x {e}, got {np.shape(getattr(self, name))}.")
        if np.shape(self.confusions)[:2] != (n, e + 1):
            raise ValueError(f"ExitRecords.confusions must be {n} x {e + 1} x K x K, got {np.shape(self.confusions)}.")

    @property
    def num_images(self) -> int:
        return len(self.final)

    def save(self, path: str) -> None:
        np.savez_compressed(path, exit_names=np.array(self.exit_names), confidences=self.confidences,
                            confusions=self.confusions, prefix=self.prefix, exit_macs=self.exit_macs,
                            answer=self.answer, final=self.final, dataset=np.array(self.dataset),
                            class_names=np.array(self.class_names))

    @classmethod
    def load(cls, path: str) -> "ExitRecords":
        z = np.load(path, allow_pickle=False)
        return cls([str(s) for s in z["exit_names"]], z["confidences"], z["confusions"], z["prefix"], z["exit_macs"],
                   z["answer"], z["final"], str(z["dataset"]), [str(s) for s in z["class_names"]])


@torch.no_grad()
def collect_records(model, data_loader, dataset_name: str, log_every: int = 50) -> ExitRecords:
    """Run ``model.forward_all_exits`` (an ``AnytimeSegmentor``) on every image of the loader."""
    meta = MetadataCatalog.get(dataset_name)
    names, ignore = list(meta.stuff_classes), meta.get("ignore_label", 255)
    by_file = {d["file_name"]: d for d in DatasetCatalog.get(dataset_name)}
    exits = model.exit_names
    conf, confs, prefix, ex, ans, fin = [], [], [], [], [], []
    was_training = model.training
    model.eval()
    for i, batch in enumerate(data_loader):
        for inp, out in zip(batch, model.forward_all_exits(batch)):
            record = by_file.get(inp["file_name"], inp)
            if EVAL_LABEL in inp:  # decoded by the test mapper in the loader's workers
                gt = inp[EVAL_LABEL]
            else:
                gt = torch.from_numpy(np.ascontiguousarray(read_dataset_label(record)))
            check_label_values(gt.numpy(), len(names), ignore, record["sem_seg_file_name"])
            preds = [out["exits"][n] for n in exits] + [out["final"]]
            gt = gt.to(preds[0].device, non_blocking=True)
            # counted on the model's device: K x K per output comes back, not H x W predictions
            confs.append(torch.stack([device_confusion_matrix(gt, p.argmax(0), len(names), ignore)
                                      for p in preds]).cpu().numpy())
            conf.append([out["confidence"][n] for n in exits])
            c = model.costs(out["input_hw"])
            prefix.append([c.prefix[n] for n in exits])
            ex.append([c.exits[n] for n in exits])
            ans.append([c.answer[n] for n in exits])
            fin.append(c.final)
        if log_every and (i + 1) % log_every == 0:
            logger.info("collect_records on %s: %d images", dataset_name, len(fin))
    model.train(was_training)
    e = len(exits)
    shape = (len(fin), e)
    return ExitRecords(exits, np.array(conf, dtype=np.float64).reshape(shape), np.array(confs),
                       np.array(prefix, dtype=np.float64).reshape(shape), np.array(ex, dtype=np.float64).reshape(shape),
                       np.array(ans, dtype=np.float64).reshape(shape), np.array(fin, dtype=np.float64),
                       dataset_name, names)


# ----------------------------------------------------------------------------- policies on records
@dataclass
class PolicyOutcome:
    """A policy on a split: mIoU (%), average MACs, and which output answered each image
    (index into the exits; E = the final head)."""

    miou: float
    avg_macs: float
    answers: np.ndarray
    exit_names: List[str]

    def histogram(self) -> Dict[str, int]:
        names = self.exit_names + [FINAL]
        return {n: int((self.answers == i).sum()) for i, n in enumerate(names)}


def _thresholds_array(records: ExitRecords, thresholds) -> np.ndarray:
    if isinstance(thresholds, dict):
        missing = [n for n in records.exit_names if n not in thresholds]
        if missing:
            raise ValueError(f"No threshold for exits {missing}.")
        thresholds = [thresholds[n] for n in records.exit_names]
    t = np.asarray(thresholds, dtype=np.float64)
    return np.where(t > 1.0, np.inf, t)


def evaluate_thresholds(records: ExitRecords, t: np.ndarray, chunk: Optional[int] = None):
    """mIoU and average MACs of threshold rows ``t`` (M x E, ``inf`` = never), and the answer of
    every image under each row (M x N: index of the exit, E = the final head)."""
    n, e = records.confidences.shape
    k2 = records.confusions.shape[-1] ** 2
    flat = records.confusions.reshape(n, e + 1, k2).astype(np.float64)
    chunk = chunk or max(1, int(5e6 // max(1, n * max(k2, e + 1))))
    mious, costs, answers = [], [], []
    for s in range(0, len(t), chunk):
        tt = t[s:s + chunk]
        active = np.isfinite(tt)  # M x E: exits that run
        hit = records.confidences[None] >= tt[:, None, :]  # M x N x E
        ans = np.where(hit.any(-1), hit.argmax(-1), e)  # M x N
        spent = np.cumsum(records.exit_macs[None] * active[:, None, :], axis=-1)  # M x N x E: exits run up to j
        stop_cost = records.prefix[None] + records.answer[None] + spent  # answered at j
        final_cost = records.final[None] + spent[..., -1] if e else np.broadcast_to(records.final, (len(tt), n))
        idx = np.minimum(ans, max(e - 1, 0))[..., None]
        cost = np.where(ans < e, np.take_along_axis(stop_cost, idx, -1)[..., 0] if e else 0.0, final_cost)
        conf = np.take_along_axis(flat[None], ans[..., None, None], axis=2)[:, :, 0].sum(1)  # M x K^2
        k = int(round(math.sqrt(k2)))
        mious.append(miou_of_confusions(conf.reshape(-1, k, k)))
        costs.append(cost.mean(1))
        answers.append(ans)
    return np.concatenate(mious), np.concatenate(costs), np.concatenate(answers)


def policy_outcome(records: ExitRecords, thresholds) -> PolicyOutcome:
    """The confidence policy with ``thresholds`` (exit -> value, or one per exit; above 1 =
    never) on the recorded split."""
    t = _thresholds_array(records, thresholds)[None]
    miou, cost, ans = evaluate_thresholds(records, t)
    return PolicyOutcome(float(miou[0]), float(cost[0]), ans[0], list(records.exit_names))


def fixed_exit_outcome(records: ExitRecords, answer: str) -> PolicyOutcome:
    """Policy ``exit:<answer>`` (or ``final``): that output answers every image."""
    names = list(records.exit_names)
    i = len(names) if answer == FINAL else names.index(answer)
    conf = records.confusions[:, i].sum(0)
    if answer == FINAL:
        cost = records.final
    else:
        cost = records.prefix[:, i] + records.exit_macs[:, i] + records.answer[:, i]
    return PolicyOutcome(float(miou_of_confusions(conf)), float(cost.mean()), np.full(records.num_images, i), names)
