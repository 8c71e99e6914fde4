"""HS3: choosing each exit's number of clusters K_i (paper 3.1.2) and the alternatives (3.1.3).

The trade-off rule. Plot every stage's curve in the unit square ``x = K / N`` (share of
the N classes), ``y = mIoU / 100``. The final output is the reference point
``R = (1, m)``, ``m`` its mIoU. The paper enforces the final output's trade-off (mIoU per
class) on every exit: the line through the origin and R. It measures the line's angle
``theta`` from the vertical through R; other angles give other lines through R:

* ``theta = None`` (default): the line through the origin, ``theta_ref = atan(1 / m)``
  (it only depends on the final mIoU in this square), i.e. the ratio rule
  ``mIoU_i(K) / K >= mIoU_final / N``;
* ``theta = 0``: the vertical ``x = 1``: every exit keeps the full class set (deep supervision);
* ``theta = 90``: the horizontal ``y = m``: every exit must reach the final output's mIoU
  (the most simplified tasks);
* larger theta favours accuracy (fewer clusters), smaller theta complexity.

"Meets the line": a point is on the accuracy side of the line when
``(x - 1) cos(theta) - (y - m) sin(theta) <= 0`` (on or above it for 0 < theta <= 90).
K_i is the *largest* K of the stage's curve whose point is on or above the line: the
most complex task the exit still solves at the demanded trade-off (for a curve that
falls with K, the last grid point before it crosses the line). If no point qualifies
(theta = 90 and an exit never reaches the final mIoU), the smallest K of the grid is
taken and a warning logged. Curves include K = N (no clustering), so theta = 0 gives N.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from .analysis import TradeoffCurve
from ..modeling.exits.hs3_clusters import ExitClusters, HS3Clusters, assignment_from_groups

__all__ = [
    "reference_theta", "line_side", "choose_k", "choose_ks", "theta_line", "constant_ratio_ks",
    "manual_assignment", "clusters_from_assignments",
]

logger = logging.getLogger(__name__)
_TOL = 1e-9


def reference_theta(final_miou: float, num_classes: int = 0) -> float:
    """The paper's angle (degrees from the vertical) of the line through the origin and the
    final output's point, in the unit square (x = K/N, y = mIoU/100)."""
    m = final_miou / 100.0
    return 90.0 if m <= 0 else math.degrees(math.atan2(1.0, m))


def line_side(k: float, miou: float, num_classes: int, final_miou: float, theta: Optional[float]) -> float:
    """<= 0 when the point (K, mIoU) is on the accuracy side of (on or above) the trade-off line."""
    x, y, m = k / num_classes, miou / 100.0, final_miou / 100.0
    if theta is None:  # exactly the ratio rule: y / x >= m
        return m * x - y
    t = math.radians(float(theta))
    return (x - 1.0) * math.cos(t) - (y - m) * math.sin(t)


def choose_k(curve: TradeoffCurve, num_classes: int, final_miou: float, theta: Optional[float] = None) -> int:
    """K_i for one exit: the largest K whose point is on or above the line (module doc)."""
    if theta is not None and not 0.0 <= float(theta) <= 90.0:
        raise ValueError(f"theta must be in [0, 90] degrees, got {theta}.")
    ok = [k for k, v in zip(curve.ks, curve.mious) if line_side(k, v, num_classes, final_miou, theta) <= _TOL]
    if ok:
        return max(ok)
    k = min(curve.ks)
    logger.warning("HS3: no K of %s's curve reaches the trade-off line (theta=%s, final mIoU %.2f); taking the smallest K=%d.",
                   curve.stage, theta, final_miou, k)
    return k


def choose_ks(curves: Mapping[str, TradeoffCurve], num_classes: int, final_miou: float,
              theta: Optional[float] = None) -> Dict[str, int]:
    """K_i for every exit's curve (the final output's curve, if present, is skipped)."""
    return {s: choose_k(c, num_classes, final_miou, theta) for s, c in curves.items() if s != "final"}


def theta_line(num_classes: int, final_miou: float, theta: Optional[float]):
    """Two points (K, mIoU) of the trade-off line, spanning x in [0, N] / y in [0, 100], for plots."""
    t = math.radians(reference_theta(final_miou) if theta is None else float(theta))
    m = final_miou / 100.0
    dx, dy = math.sin(t), math.cos(t)  # direction in the unit square, up and to the right
    ends = []
    for sign in (-1.0, 1.0):  # walk from R both ways until leaving the unit square
        steps = [((1.0 if sign * d > 0 else 0.0) - p) / (sign * d) for p, d in ((1.0, dx), (m, dy)) if abs(d) > 1e-12]
        s = max(0.0, min(steps)) if steps else 0.0
        ends.append(((1.0 + sign * s * dx) * num_classes, (m + sign * s * dy) * 100.0))
    return ends


def constant_ratio_ks(exit_names: Sequence[str], num_classes: int, ratio: float = 0.5) -> Dict[str, int]:
    """Single-phase HS3 (3.1.3): each exit gets ``ratio`` times the classes of the next
    deeper stage (the final output has N); ``exit_names`` from shallow to deep; at least 2."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}.")
    ks: Dict[str, int] = {}
    nxt = num_classes
    for name in reversed(list(exit_names)):
        nxt = min(num_classes, max(2, int(math.floor(nxt * ratio + 0.5))))
        ks[name] = nxt
    return {name: ks[name] for name in exit_names}


def manual_assignment(groups: Sequence[Sequence[str]], class_names: Sequence[str], where: str = "manual clusters") -> np.ndarray:
    """Assignment from a person's grouping (lists of class names, every class once)."""
    return assignment_from_groups(groups, class_names, where)


def clusters_from_assignments(
    class_names: Sequence[str],
    assignments: Mapping[str, Sequence[int]],
    *,
    method: str,
    theta: Optional[float] = None,
    seed: int = 0,
    sources: Optional[Mapping[str, str]] = None,
    info: Optional[dict] = None,
    extra: Optional[Mapping[str, dict]] = None,
) -> HS3Clusters:
    """Package per-exit assignments (in exit order) as an :class:`HS3Clusters`."""
    exits = {}
    for name, a in assignments.items():
        a = np.asarray(a, dtype=np.int64)
        exits[name] = ExitClusters(assignment=a, num_clusters=int(a.max()) + 1, extra=dict((extra or {}).get(name, {})))
    return HS3Clusters(class_names=list(class_names), exits=exits, method=method, theta=theta, seed=seed,
                       sources=dict(sources or {}), info=dict(info or {}))
