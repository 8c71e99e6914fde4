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
* :class:`ThresholdRecords` is the written contract between a split's records and the threshold
  searches (:func:`~.anytime_calibration.calibrate`, :func:`~.anytime_risk.calibrate_risk`):
  :class:`ExitRecords` implements it, and so do the per-pixel policy's records
  (:class:`~.anytime_pixel.PixelRecords`), whose answers are not recorded outputs but one
  recorded run per candidate setting.

Choosing the thresholds on such records is :mod:`.anytime_calibration` (an mIoU margin or a
MACs budget) and :mod:`.anytime_risk` (risk control); the command-line driver that builds
the model and registers the split is :mod:`segdistill.engine.anytime`.
"""
from __future__ import annotations

import abc
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
    "WARMUP_IMAGES", "AnytimeEvaluator", "ThresholdRecords", "ExitRecords", "collect_records", "PolicyOutcome",
    "policy_outcome", "fixed_exit_outcome", "evaluate_thresholds", "miou_of_confusions", "QUALITIES", "quality_of",
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


#: Per-image qualities in [0, 1] that risk control bounds the gap of (:func:`quality_of`).
QUALITIES = ("miou", "pixel_accuracy", "disagreement")


def quality_of(confusions: np.ndarray, agreement: Optional[np.ndarray], quality: str) -> np.ndarray:
    """Per-image quality in [0, 1] of outputs, from their confusion matrices ``... x K x K`` and
    their agreement with the final output ``...`` (the share of the image's pixels where both
    predict the same class; ``None`` when not recorded).

    ``miou``: the image's mIoU over the classes of its ground truth; ``pixel_accuracy``; both 1
    for an image without labelled pixels (no gap). ``disagreement``: the agreement, so that the
    gap to the final output (agreement 1) is the share of pixels whose answer differs from the
    final output's; it reads no label."""
    if quality not in QUALITIES:
        raise ValueError(f"quality must be one of {QUALITIES}, got {quality!r}.")
    if quality == "disagreement":
        if agreement is None:
            raise ValueError("These records hold no agreement with the final output (written before it was "
                             "recorded): collect them again to use the quality 'disagreement'.")
        return np.asarray(agreement, dtype=np.float64)
    conf = np.asarray(confusions, dtype=np.float64)
    labelled = conf.sum((-2, -1))
    if quality == "miou":
        q = miou_of_confusions(conf) / 100.0
    else:
        q = np.trace(conf, axis1=-2, axis2=-1) / np.maximum(labelled, 1.0)
    return np.where(labelled > 0, q, 1.0)


# ----------------------------------------------------------------------------- the records contract
class ThresholdRecords(abc.ABC):
    """What the threshold searches read of a split's records (the written contract).

    The records of a split hold, per image, a set of *outputs* (:attr:`num_outputs` of them:
    for :class:`ExitRecords` each exit and the final head; for per-pixel records one run per
    candidate setting) with their confusion matrices, and let a *threshold setting* (a row of one
    value per exit, ``inf`` = the exit never answers) be evaluated. Implementations provide:

    * ``exit_names`` (attribute): the exits, shallowest first; a row has one value per exit;
    * :attr:`num_images`, :attr:`labelled_images` (images with at least one labelled pixel);
    * :meth:`candidate_values` / :meth:`candidate_settings`: what :func:`~.anytime_calibration.calibrate`
      searches (every setting, or coordinate descent over the values when there are too many);
    * :meth:`risk_sequence`: the settings :func:`~.anytime_risk.calibrate_risk` tests, most
      conservative ("never exit") first, in an order fixed before any loss is seen;
    * :meth:`evaluate`: mIoU, average MACs and the answering exit of every image, per setting;
    * :meth:`output_qualities`, :meth:`outputs_of`, :attr:`final_output`: each output's
      per-image quality (:func:`quality_of`), the output each image gets under a setting, and
      the final output's index (the reference of the risk's gap).

    The setting "never everywhere" (the final head answers every image) must be evaluable.
    """

    exit_names: List[str]

    @property
    @abc.abstractmethod
    def num_images(self) -> int:
        """Images of the split."""

    @property
    @abc.abstractmethod
    def labelled_images(self) -> int:
        """Images with at least one labelled pixel (0: only label-free qualities can be used)."""

    @abc.abstractmethod
    def candidate_values(self, limit: int) -> List[np.ndarray]:
        """Per exit, the threshold values worth trying (at most ``limit`` + never), ascending, ``inf`` last."""

    @abc.abstractmethod
    def candidate_settings(self, limit: int, max_combinations: int) -> Optional[np.ndarray]:
        """Every setting to search (M x E), or None when there are more than ``max_combinations``
        (the search then descends coordinate by coordinate over :meth:`candidate_values`)."""

    @abc.abstractmethod
    def risk_sequence(self, limit: int) -> np.ndarray:
        """The settings risk control tests (M x E), "never" everywhere first, the most conservative first."""

    @abc.abstractmethod
    def evaluate(self, t: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """mIoU (M), average MACs (M) and each image's answering exit (M x N: index into the
        exits, E = the final head) of the settings ``t`` (M x E, ``inf`` = never)."""

    @property
    @abc.abstractmethod
    def num_outputs(self) -> int:
        """Outputs recorded per image."""

    @property
    @abc.abstractmethod
    def final_output(self) -> int:
        """Index of the final output (the final head on every pixel) among the outputs."""

    @abc.abstractmethod
    def output_qualities(self, quality: str) -> np.ndarray:
        """N x :attr:`num_outputs`: each output's quality on each image (:func:`quality_of`)."""

    @abc.abstractmethod
    def outputs_of(self, t: np.ndarray) -> np.ndarray:
        """M x N: the output each image gets under each setting of ``t``."""


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
    share of pixels each output answered, ``pixels_<exit or final>_pct``, of the share
    active at each stage, ``active_<stage>_pct``, and of the share frozen before it,
    ``frozen_<stage>_pct`` (100 minus the active share: a stage an image stopped before has
    every pixel frozen).
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
                if prefix == "active":
                    res[f"frozen_{k}_pct"] = 100.0 - res[f"active_{k}_pct"]
        results["anytime"] = res
        logger.info("Anytime policy %r: mIoU %.2f (final %.2f), %.3f GMACs (final %.3f, %.1f%% saved), "
                    "median %.1f ms/image (final %.1f; %d images after the warm-up); answered: %s", self._policy,
                    res["mIoU"], res["mIoU_final"], res["GMACs"], res["GMACs_final"], res["MACs_saved_pct"],
                    res["time_ms"], res["time_ms_final"], int(res["timed_images"]),
                    {k[9:-4]: round(v, 1) for k, v in res.items() if k.startswith("answered_")})
        return results


# ----------------------------------------------------------------------------- records
@dataclass
class ExitRecords(ThresholdRecords):
    """Per image of a split: every exit's confidence, every output's confusion matrix, path costs.

    ``confidences`` N x E; ``confusions`` N x (E + 1) x K x K (outputs: the exits shallowest
    first, then the final head; rows = ground truth); MACs per image: ``prefix``, ``exit_macs``,
    ``answer`` N x E and ``final`` N (:class:`AnytimeCosts`' parts); ``agreement`` N x (E + 1):
    the share of each image's pixels where the output predicts the final head's class (None in
    records written before it was kept). The confidence policy's answer is one of the outputs,
    so every threshold setting can be evaluated (:class:`ThresholdRecords`).
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
    agreement: Optional[np.ndarray] = None

    def __post_init__(self):
        n, e = len(self.final), len(self.exit_names)
        if self.agreement is not None and np.shape(self.agreement) != (n, e + 1):
            raise ValueError(f"ExitRecords.agreement must be {n} x {e + 1}, got {np.shape(self.agreement)}.")
        for name in ("confidences", "prefix", "exit_macs", "answer"):
            if np.shape(getattr(self, name)) != (n, e):
                raise ValueError(f"ExitRecords.{name} must be {n} x {e}, got {np.shape(getattr(self, name))}.")
        if np.shape(self.confusions)[:2] != (n, e + 1):
            raise ValueError(f"ExitRecords.confusions must be {n} x {e + 1} x K x K, got {np.shape(self.confusions)}.")

    @property
    def num_images(self) -> int:
        return len(self.final)

    @property
    def labelled_images(self) -> int:
        return int((np.asarray(self.confusions)[:, -1].sum((-2, -1)) > 0).sum())

    def candidate_values(self, limit: int) -> List[np.ndarray]:
        """Per exit: its recorded confidences (at most ``limit``, spread by quantile), each one
        a value some image reaches, plus ``inf`` (never)."""
        return [_quantile_values(self.confidences[:, i], limit) for i in range(len(self.exit_names))]

    def candidate_settings(self, limit: int, max_combinations: int) -> Optional[np.ndarray]:
        cands = self.candidate_values(limit)
        if int(np.prod([len(c) for c in cands], dtype=np.float64)) > max_combinations:
            return None
        return np.array(list(itertools.product(*cands)), dtype=np.float64).reshape(-1, len(cands))

    def risk_sequence(self, limit: int) -> np.ndarray:
        """One threshold shared by every exit: ``inf`` (never), then the recorded confidences
        in decreasing order (at most ``limit``, spread by quantile)."""
        u = np.unique(self.confidences)
        if len(u) > limit:
            u = np.unique(np.quantile(u, np.linspace(0.0, 1.0, limit), method="nearest"))
        lambdas = np.concatenate([[np.inf], u[::-1]])
        return np.repeat(lambdas[:, None], len(self.exit_names), axis=1)

    def evaluate(self, t: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        return evaluate_thresholds(self, np.asarray(t, dtype=np.float64))

    @property
    def num_outputs(self) -> int:
        return len(self.exit_names) + 1

    @property
    def final_output(self) -> int:
        return len(self.exit_names)

    def output_qualities(self, quality: str) -> np.ndarray:
        return quality_of(self.confusions, self.agreement, quality)

    def outputs_of(self, t: np.ndarray) -> np.ndarray:
        return self.evaluate(t)[2]  # the answering output is the answering exit (E: the final head)

    def save(self, path: str) -> None:
        extra = {} if self.agreement is None else {"agreement": self.agreement}
        np.savez_compressed(path, exit_names=np.array(self.exit_names), confidences=self.confidences,
                            confusions=self.confusions, prefix=self.prefix, exit_macs=self.exit_macs,
                            answer=self.answer, final=self.final, dataset=np.array(self.dataset),
                            class_names=np.array(self.class_names), **extra)

    @classmethod
    def load(cls, path: str) -> "ExitRecords":
        z = np.load(path, allow_pickle=False)
        if "confidences" not in z:
            raise ValueError(f"{path!r} holds no image-level exit records (per-pixel records are read by "
                             "segdistill.evaluation.anytime_pixel.PixelRecords.load).")
        return cls([str(s) for s in z["exit_names"]], z["confidences"], z["confusions"], z["prefix"], z["exit_macs"],
                   z["answer"], z["final"], str(z["dataset"]), [str(s) for s in z["class_names"]],
                   z["agreement"] if "agreement" in z else None)


def _quantile_values(values: np.ndarray, limit: int) -> np.ndarray:
    """The distinct ``values`` (at most ``limit``, spread by quantile) plus ``inf``."""
    u = np.unique(values)
    if len(u) > limit:
        u = np.unique(np.quantile(u, np.linspace(0.0, 1.0, limit), method="nearest"))
    return np.concatenate([u, [np.inf]])


@torch.no_grad()
def collect_records(model, data_loader, dataset_name: str, log_every: int = 50) -> ExitRecords:
    """Run ``model.forward_all_exits`` (an ``AnytimeSegmentor``) on every image of the loader."""
    meta = MetadataCatalog.get(dataset_name)
    names, ignore = list(meta.stuff_classes), meta.get("ignore_label", 255)
    by_file = {d["file_name"]: d for d in DatasetCatalog.get(dataset_name)}
    exits = model.exit_names
    conf, confs, prefix, ex, ans, fin, agree = [], [], [], [], [], [], []
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
            labels = [p.argmax(0) for p in preds]
            confs.append(torch.stack([device_confusion_matrix(gt, p, len(names), ignore) for p in labels]).cpu().numpy())
            agree.append(torch.stack([(p == labels[-1]).double().mean() for p in labels]).cpu().numpy())
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
                       dataset_name, names, np.array(agree, dtype=np.float64).reshape(len(fin), e + 1))


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


def _thresholds_array(records: ThresholdRecords, thresholds) -> np.ndarray:
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


def policy_outcome(records: ThresholdRecords, thresholds) -> PolicyOutcome:
    """The policy the records are of (confidence for :class:`ExitRecords`, pixel for per-pixel
    records) with ``thresholds`` (exit -> value, or one per exit; above 1 = never) on the
    recorded split."""
    t = _thresholds_array(records, thresholds)[None]
    miou, cost, ans = records.evaluate(t)
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
