"""Records of the per-pixel anytime policy, for threshold calibration and risk control.

Under policy ``pixel`` (:meth:`~segdistill.modeling.meta_arch.anytime.AnytimeSegmentor.run_pixel`)
the stages after an exit run on the pixels it left active, so the features the later exits and
the head see depend on the mask, and an answer is no longer one of the outputs a single pass
records: :class:`~.anytime.ExitRecords` cannot simulate it. :func:`collect_pixel_records` runs
the policy instead, once per candidate setting (a grid of at most :data:`MAX_CANDIDATES`
thresholds shared by every exit, or per-exit threshold rows; "never" everywhere, the final
output, is always added), on every image of a split, and keeps per candidate and image the
confusion matrix, the counted MACs (the output's ``anytime["macs"]``), the wall time, the
exit after which the image stopped, each output's and each stage's pixel shares and the
agreement with the final output (the label-free ``disagreement`` quality). The cost is G
passes of the split for G candidates.

:class:`PixelRecords` implements :class:`~.anytime.ThresholdRecords`, so
:func:`~.anytime_calibration.calibrate` (mIoU margin or MACs budget, over the recorded
settings) and :func:`~.anytime_risk.calibrate_risk` (crc / ucb over the recorded settings, the
most conservative first) run on them unchanged. Images without labels are kept (their
confusion matrices are zero): they count for the ``disagreement`` quality only.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..data.labels import check_label_values, read_dataset_label
from ..data.mapper import EVAL_LABEL
from ..modeling.meta_arch.anytime import FINAL, PIXEL
from .anytime import ThresholdRecords, miou_of_confusions, quality_of
from .sem_seg import device_confusion_matrix

__all__ = ["MAX_CANDIDATES", "DEFAULT_PIXEL_GRID", "PixelRecords", "pixel_candidates", "collect_pixel_records"]

logger = logging.getLogger(__name__)

#: Candidate settings a collection may run (besides "never"): each one is a pass over the split.
MAX_CANDIDATES = 16
#: Shared top-probability thresholds tried when none are given (ADP-C's fixed 0.998 among them).
DEFAULT_PIXEL_GRID = (0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998)
_KIND = "segdistill-pixel-records/1"


def pixel_candidates(candidates, exit_names: Sequence[str]) -> np.ndarray:
    """The settings a collection runs (M x E, ``inf`` = the exit freezes nothing and does not run):
    "never" everywhere first, then ``candidates`` in the given order, duplicates dropped.

    ``candidates``: shared thresholds (a sequence of numbers: one value for every exit) or
    per-exit rows (a sequence of E-value sequences, or a dict exit -> value each); a value above
    1 means never. At most :data:`MAX_CANDIDATES` besides "never"."""
    e = len(exit_names)
    rows = []
    for c in candidates:
        if isinstance(c, dict):
            missing = [n for n in exit_names if n not in c]
            if missing:
                raise ValueError(f"Candidate {c} has no threshold for exits {missing}.")
            c = [c[n] for n in exit_names]
        row = np.broadcast_to(np.asarray(c, dtype=np.float64), (e,)) if np.ndim(c) == 0 else np.asarray(c, float)
        if row.shape != (e,):
            raise ValueError(f"Candidate {list(np.atleast_1d(c))} has {row.size} values for the exits "
                             f"{list(exit_names)}: give one shared value or one per exit.")
        if np.isnan(row).any() or (row < 0).any():
            raise ValueError(f"Candidate thresholds must be top-probabilities in [0, 1] (above 1: never), got {c}.")
        rows.append(np.where(row > 1.0, np.inf, row))
    never = np.full(e, np.inf)
    out = [never]
    for r in rows:
        if not any(np.array_equal(r, o) for o in out):
            out.append(r)
    if len(out) - 1 > MAX_CANDIDATES:
        raise ValueError(f"{len(out) - 1} candidate settings: each is a pass over the calibration split, at most "
                         f"{MAX_CANDIDATES} are run.")
    if len(out) == 1:
        raise ValueError("No candidate setting besides 'never': give thresholds to try, e.g. "
                         f"{list(DEFAULT_PIXEL_GRID)}.")
    return np.stack(out)


@dataclass
class PixelRecords(ThresholdRecords):
    """Per image of a split and per candidate setting of policy ``pixel``: one real run.

    ``thresholds`` M x E (``inf`` = never; row 0 is "never" everywhere: the final output);
    per image and candidate (N x M): ``macs`` (counted), ``time_s``, ``answers`` (the exit after
    which the image stopped, E = the head ran) and ``agreement`` (share of the image's pixels
    whose class is the final output's); ``confusions`` N x M x K x K (zero for an unlabelled
    image); ``answered_pct`` N x M x (E + 1) (per exit and the head: % of the image's pixels it
    answered); ``active_pct`` N x M x S (per backbone stage in ``stage_names``: % of the
    image's pixels active when it ran, 0 when it did not); ``final_macs`` N (fvcore, the plain path).
    """

    exit_names: List[str]
    stage_names: List[str]
    thresholds: np.ndarray
    confusions: np.ndarray
    macs: np.ndarray
    time_s: np.ndarray
    answers: np.ndarray
    agreement: np.ndarray
    answered_pct: np.ndarray
    active_pct: np.ndarray
    final_macs: np.ndarray
    dataset: str = ""
    class_names: List[str] = field(default_factory=list)

    def __post_init__(self):
        self.thresholds = np.asarray(self.thresholds, dtype=np.float64)
        m, e = self.thresholds.shape
        if e != len(self.exit_names):
            raise ValueError(f"PixelRecords.thresholds must have one column per exit {self.exit_names}, got {e}.")
        if not np.isinf(self.thresholds[0]).all():
            raise ValueError("PixelRecords.thresholds[0] must be 'never' everywhere (the final output).")
        n = len(self.final_macs)
        for name, shape in (("macs", (n, m)), ("time_s", (n, m)), ("answers", (n, m)), ("agreement", (n, m)),
                            ("answered_pct", (n, m, e + 1)), ("active_pct", (n, m, len(self.stage_names)))):
            if np.shape(getattr(self, name)) != shape:
                raise ValueError(f"PixelRecords.{name} must be {' x '.join(map(str, shape))}, "
                                 f"got {np.shape(getattr(self, name))}.")
        if np.shape(self.confusions)[:2] != (n, m):
            raise ValueError(f"PixelRecords.confusions must be {n} x {m} x K x K, got {np.shape(self.confusions)}.")
        self._index = {tuple(r): i for i, r in enumerate(self.thresholds)}

    # ------------------------------------------------------------------ the records contract
    @property
    def num_images(self) -> int:
        return len(self.final_macs)

    @property
    def labelled_images(self) -> int:
        return int((np.asarray(self.confusions)[:, 0].sum((-2, -1)) > 0).sum())

    def candidate_values(self, limit: int) -> List[np.ndarray]:
        """Per exit, the values its recorded settings use, ascending, ``inf`` last (``limit``
        does not apply: the grid was fixed when the records were collected)."""
        return [np.unique(np.concatenate([self.thresholds[:, i], [np.inf]])) for i in range(len(self.exit_names))]

    def candidate_settings(self, limit: int, max_combinations: int) -> np.ndarray:
        """Every recorded setting (only those were run)."""
        return self.thresholds.copy()

    def risk_sequence(self, limit: int) -> np.ndarray:
        """The recorded settings, the most conservative first: by decreasing sum of thresholds
        (never counted as 2; for a shared grid: decreasing threshold), ties in recorded order;
        an order fixed by the grid, before any loss is seen, as fixed-sequence testing needs."""
        order = np.argsort(-np.where(np.isfinite(self.thresholds), self.thresholds, 2.0).sum(1), kind="stable")
        return self.thresholds[order]

    def candidate_index(self, t: np.ndarray) -> np.ndarray:
        """The recorded candidate of each setting of ``t`` (M x E; above 1 = never); a setting not
        recorded is an error naming the recorded ones."""
        t = np.atleast_2d(np.asarray(t, dtype=np.float64))
        t = np.where(t > 1.0, np.inf, t)
        out = []
        for row in t:
            i = self._index.get(tuple(row))
            if i is None:
                raise ValueError(f"Setting {row.tolist()} was not run when these per-pixel records were collected "
                                 f"(the policy cannot be simulated from other settings); recorded: "
                                 f"{self.thresholds.tolist()}.")
            out.append(i)
        return np.array(out, dtype=np.int64)

    def evaluate(self, t: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = self.candidate_index(t)
        conf = np.asarray(self.confusions, dtype=np.float64)[:, idx].sum(0)  # M x K x K
        return miou_of_confusions(conf), self.macs[:, idx].mean(0), self.answers[:, idx].T.astype(np.int64)

    @property
    def num_outputs(self) -> int:
        return len(self.thresholds)

    @property
    def final_output(self) -> int:
        return 0

    def output_qualities(self, quality: str) -> np.ndarray:
        return quality_of(self.confusions, self.agreement, quality)

    def outputs_of(self, t: np.ndarray) -> np.ndarray:
        return np.repeat(self.candidate_index(t)[:, None], self.num_images, axis=1)

    # ------------------------------------------------------------------ reports
    def candidate_summary(self, i: int) -> dict:
        """What candidate ``i`` gave on the split, in :class:`~.anytime.AnytimeEvaluator`'s names
        (mIoU, GMACs, median time, image-level ``answered_<exit>_pct``, mean ``pixels_<output>_pct``,
        ``active_<stage>_pct`` and ``frozen_<stage>_pct``)."""
        names = self.exit_names + [FINAL]
        n = self.num_images
        res = {"thresholds": {e: (None if not math.isfinite(v) else float(v))
                              for e, v in zip(self.exit_names, self.thresholds[i])},
               "mIoU": float(miou_of_confusions(np.asarray(self.confusions, dtype=np.float64)[:, i].sum(0))),
               "GMACs": float(self.macs[:, i].mean()) / 1e9, "GMACs_final": float(self.final_macs.mean()) / 1e9,
               "MACs_saved_pct": 100.0 * (1.0 - self.macs[:, i].mean() / self.final_macs.mean()),
               "time_ms": 1e3 * float(np.median(self.time_s[:, i])),
               "disagreement_pct": 100.0 * float(1.0 - self.agreement[:, i].mean())}
        for j, name in enumerate(names):
            res[f"answered_{name}_pct"] = 100.0 * float((self.answers[:, i] == j).sum()) / n
        for j, name in enumerate(names):
            res[f"pixels_{name}_pct"] = float(self.answered_pct[:, i, j].mean())
        for j, stage in enumerate(self.stage_names):
            res[f"active_{stage}_pct"] = float(self.active_pct[:, i, j].mean())
            res[f"frozen_{stage}_pct"] = 100.0 - res[f"active_{stage}_pct"]
        return res

    # ------------------------------------------------------------------ file
    def save(self, path: str) -> None:
        np.savez_compressed(path, kind=np.array(_KIND), exit_names=np.array(self.exit_names),
                            stage_names=np.array(self.stage_names), thresholds=self.thresholds,
                            confusions=self.confusions, macs=self.macs, time_s=self.time_s, answers=self.answers,
                            agreement=self.agreement, answered_pct=self.answered_pct, active_pct=self.active_pct,
                            final_macs=self.final_macs, dataset=np.array(self.dataset),
                            class_names=np.array(self.class_names))

    @classmethod
    def load(cls, path: str) -> "PixelRecords":
        z = np.load(path, allow_pickle=False)
        if "kind" not in z or str(z["kind"]) != _KIND:
            raise ValueError(f"{path!r} holds no per-pixel records (image-level exit records are read by "
                             "segdistill.evaluation.anytime.ExitRecords.load).")
        return cls([str(s) for s in z["exit_names"]], [str(s) for s in z["stage_names"]], z["thresholds"],
                   z["confusions"], z["macs"], z["time_s"], z["answers"], z["agreement"], z["answered_pct"],
                   z["active_pct"], z["final_macs"], str(z["dataset"]), [str(s) for s in z["class_names"]])


def _label(inp: dict, record: dict, num_classes: int, ignore: int) -> Optional[torch.Tensor]:
    """The image's ground truth, or None for an unlabelled image."""
    if EVAL_LABEL in inp:  # decoded by the test mapper in the loader's workers
        gt = inp[EVAL_LABEL]
    elif record.get("sem_seg_file_name"):
        gt = torch.from_numpy(np.ascontiguousarray(read_dataset_label(record)))
    else:
        return None
    check_label_values(gt.numpy(), num_classes, ignore, record.get("sem_seg_file_name", inp["file_name"]))
    return gt


@torch.no_grad()
def collect_pixel_records(model, data_loader, dataset_name: str, *,
                          candidates: Union[Sequence[float], Sequence[Sequence[float]], Sequence[Dict[str, float]]],
                          log_every: int = 50) -> PixelRecords:
    """Run policy ``pixel`` of ``model`` (an ``AnytimeSegmentor``) with every candidate setting
    (:func:`pixel_candidates`: "never" first, then ``candidates``) on every image of the loader.

    Each image runs once per setting, one image at a time (as the policy runs), the settings in
    turn while the image is at hand; the final output's prediction ("never") is kept only while
    its image is, to count each setting's agreement with it. The model's policy, pixel
    thresholds and ``eval_final`` are restored afterwards."""
    meta = MetadataCatalog.get(dataset_name)
    names, ignore = list(meta.stuff_classes), meta.get("ignore_label", 255)
    k = len(names)
    by_file = {d["file_name"]: d for d in DatasetCatalog.get(dataset_name)}
    exits = model.exit_names
    rows = pixel_candidates(candidates, exits)
    stages = list(model.backbone.stage_shapes())
    saved = (model.policy, model.pixel_thresholds, model.eval_final, model.training)
    model.eval()
    model.eval_final = False
    confs, macs, times, answers, agree, answered, active, final = ([] for _ in range(8))
    try:
        for b, batch in enumerate(data_loader):
            for inp in batch:
                record = by_file.get(inp["file_name"], inp)
                gt = _label(inp, record, k, ignore)
                rc, rm, rt, ra, rg, rp, rs = ([] for _ in range(7))
                reference = None
                for row in rows:
                    model.set_pixel_thresholds(dict(zip(exits, row.tolist())))
                    model.policy = PIXEL
                    out = model([inp])[0]
                    a = out["anytime"]
                    pred = out["sem_seg"].argmax(0)
                    if reference is None:  # row 0: "never", the final output
                        reference = pred
                        final.append(model.costs(a["input_hw"]).final)
                    if gt is None:
                        rc.append(np.zeros((k, k), dtype=np.int64))
                    else:
                        # counted on the model's device: K x K comes back, not the H x W prediction
                        rc.append(device_confusion_matrix(gt.to(pred.device, non_blocking=True), pred, k,
                                                          ignore).cpu().numpy())
                    rg.append(float((pred == reference).double().mean()))
                    rm.append(float(a["macs"]))
                    rt.append(float(a["time_s"]))
                    ra.append(len(exits) if out["sem_seg_exit"] == FINAL else exits.index(out["sem_seg_exit"]))
                    rp.append([float(a["answered_pct"].get(n, 0.0)) for n in exits + [FINAL]])
                    rs.append([float(a["active_pct"].get(s, 0.0)) for s in stages])
                for acc, r in zip((confs, macs, times, answers, agree, answered, active), (rc, rm, rt, ra, rg, rp, rs)):
                    acc.append(r)
            if log_every and (b + 1) % log_every == 0:
                logger.info("collect_pixel_records on %s: %d images x %d settings", dataset_name, len(final), len(rows))
    finally:
        policy, thresholds, eval_final, training = saved
        if thresholds is None:
            model.pixel_thresholds = None
        else:
            model.set_pixel_thresholds(thresholds, check=False)
        model.policy, model.eval_final = policy, eval_final
        model.train(training)
    n, m, e = len(final), len(rows), len(exits)
    return PixelRecords(
        exits, stages, rows, np.array(confs, dtype=np.int64).reshape(n, m, k, k),
        np.array(macs, dtype=np.float64).reshape(n, m), np.array(times, dtype=np.float64).reshape(n, m),
        np.array(answers, dtype=np.int64).reshape(n, m), np.array(agree, dtype=np.float64).reshape(n, m),
        np.array(answered, dtype=np.float64).reshape(n, m, e + 1),
        np.array(active, dtype=np.float64).reshape(n, m, len(stages)), np.array(final, dtype=np.float64),
        dataset_name, names)
