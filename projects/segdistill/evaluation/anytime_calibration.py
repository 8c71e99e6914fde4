"""Choosing an anytime model's exit thresholds on a held-out split, from its per-image records.

:func:`calibrate` chooses the thresholds of every exit: the lowest average MACs whose mIoU is
at most ``max_drop`` below the final output's, or the best mIoU within a MACs ``budget``; an
empirical choice on the calibration split (:mod:`.anytime_risk` is the risk-controlled variant:
one shared threshold with a guarantee on new images). Both return a :class:`Calibration`.
:func:`check_held_out` refuses a calibration split that is, or shares an image with, an
evaluation split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import numpy as np

from detectron2.data import DatasetCatalog

from ..modeling.meta_arch.anytime import NEVER
from .anytime import PolicyOutcome, ThresholdRecords, policy_outcome

__all__ = ["Calibration", "calibrate", "check_held_out"]

EPS = 1e-9


@dataclass
class Calibration:
    """The chosen thresholds and what they give on the calibration split."""

    thresholds: Dict[str, float]
    outcome: PolicyOutcome
    final: PolicyOutcome
    objective: str
    feasible: bool
    candidates: int
    details: dict = field(default_factory=dict)  # the risk-controlled variant's (anytime_risk.calibrate_risk)

    def summary(self) -> dict:
        return {
            **({"risk_control": self.details} if self.details else {}),
            "objective": self.objective, "feasible": self.feasible, "candidates_per_exit": self.candidates,
            "mIoU_policy": self.outcome.miou, "mIoU_final": self.final.miou,
            "GMACs_policy": self.outcome.avg_macs / 1e9, "GMACs_final": self.final.avg_macs / 1e9,
            "MACs_saved_pct": 100.0 * (1.0 - self.outcome.avg_macs / self.final.avg_macs),
            "answered": self.outcome.histogram(),
        }


def _best(miou, cost, t, final_miou, final_cost, max_drop, budget):
    """Index of the best row: among the feasible ones, the lowest cost (max_drop) or the best
    mIoU (budget); ties: higher mIoU / lower cost, then higher thresholds (fewer early answers).
    When none is feasible (a budget below the cheapest path), the closest: the lowest cost."""
    if max_drop is not None:
        feasible = miou >= final_miou - max_drop - EPS
        primary, secondary = cost, -miou
    else:
        feasible = cost <= budget * final_cost + EPS
        primary, secondary = -miou, cost
    if not feasible.any():
        primary, secondary = cost, -miou
    tsum = np.where(np.isfinite(t), t, 2.0).sum(1)
    order = np.lexsort((-tsum, secondary, primary, ~feasible))
    return int(order[0]), bool(feasible[order[0]])


def calibrate(records: ThresholdRecords, *, max_drop: Optional[float] = None, budget: Optional[float] = None,
              candidates: int = 16, max_combinations: int = 200_000) -> Calibration:
    """Thresholds on a held-out split.

    ``max_drop`` (mIoU points): the lowest average MACs whose mIoU is at least the final
    output's minus ``max_drop``. ``budget`` (a fraction of the final path's average MACs,
    e.g. 0.7): the best mIoU whose average MACs stay within it. At most one of them (neither:
    ``max_drop`` 1).
    The records say what is searched (:class:`~.anytime.ThresholdRecords`): for
    :class:`~.anytime.ExitRecords`, every combination of ``candidates`` values per exit (+
    never) when that makes at most ``max_combinations`` settings, else coordinate descent from
    "never" everywhere; for per-pixel records (:class:`~.anytime_pixel.PixelRecords`), every
    setting they recorded (``candidates`` does not apply: the grid was fixed when they were collected).
    When no setting is feasible (a budget below the cheapest path), the cheapest setting is
    returned with ``feasible`` False (with ``max_drop``: the final head everywhere is always
    feasible).
    """
    if max_drop is None and budget is None:
        max_drop = 1.0
    if max_drop is not None and budget is not None:
        raise ValueError("calibrate: give exactly one of max_drop (mIoU points) and budget (fraction of final MACs).")
    if max_drop is not None and max_drop < 0:
        raise ValueError(f"max_drop must be >= 0 mIoU points, got {max_drop}.")
    if budget is not None and budget <= 0:
        raise ValueError(f"budget must be a positive fraction of the final path's MACs, got {budget}.")
    names = list(records.exit_names)
    if not names:
        raise ValueError("calibrate: the model has no exits.")
    if records.labelled_images == 0:
        raise ValueError(f"calibrate: none of the {records.num_images} images of the records has a labelled pixel, "
                         "so no mIoU can be measured; label the split, or use risk control with the label-free "
                         "quality 'disagreement' (--risk-control ucb --epsilon E --risk-quality disagreement).")
    final = policy_outcome(records, {n: NEVER for n in names})
    cands = records.candidate_values(candidates)
    settings = records.candidate_settings(candidates, max_combinations)
    args = (final.miou, final.avg_macs, max_drop, budget)
    if settings is not None:
        t = settings
        miou, cost, _ = records.evaluate(t)
        best, feasible = _best(miou, cost, t, *args)
        chosen = t[best]
    else:
        chosen = np.full(len(names), np.inf)
        for _ in range(20):
            before = chosen.copy()
            for i in range(len(names)):
                t = np.repeat(chosen[None], len(cands[i]), axis=0)
                t[:, i] = cands[i]
                miou, cost, _ = records.evaluate(t)
                best, feasible = _best(miou, cost, t, *args)
                chosen = t[best]
            if np.array_equal(chosen, before):
                break
    thresholds = {n: (NEVER if not np.isfinite(v) else float(v)) for n, v in zip(names, chosen)}
    objective = f"max_drop={max_drop}" if max_drop is not None else f"budget={budget}"
    return Calibration(thresholds, policy_outcome(records, thresholds), final, objective, feasible,
                       max(len(c) - 1 for c in cands))


def check_held_out(calibration_dataset: str, evaluation_datasets: Sequence[str]) -> None:
    """Raise ValueError when the calibration split is an evaluation split or shares an image
    with one (thresholds chosen on the evaluated images would flatter the policy)."""
    if calibration_dataset in evaluation_datasets:
        raise ValueError(f"Refusing to calibrate on {calibration_dataset!r}: it is an evaluation split "
                         f"(DATASETS.TEST {list(evaluation_datasets)}). Use a held-out part of the training set, "
                         "e.g. <train>_hs3_analysis (HS3_ANALYSIS.FRACTION).")
    files = {d["file_name"] for d in DatasetCatalog.get(calibration_dataset)}
    for name in evaluation_datasets:
        shared = files & {d["file_name"] for d in DatasetCatalog.get(name)}
        if shared:
            raise ValueError(f"Refusing to calibrate on {calibration_dataset!r}: {len(shared)} of its images are in "
                             f"the evaluation split {name!r} (e.g. {sorted(shared)[0]!r}).")
