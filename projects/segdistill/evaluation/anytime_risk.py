"""Risk-controlled exit thresholds for anytime inference (*Fast yet Safe*, Jazbec et al.,
NeurIPS 2024, arXiv 2405.20915).

:func:`~.anytime_calibration.calibrate` picks the thresholds whose mIoU on the calibration split is
within a margin of the final output's: an empirical choice, which a new sample of images may
not honour. Risk control picks one threshold ``lam`` shared by every exit (an image answers at
the first exit whose confidence reaches ``lam``; ``lam`` above 1 = the final head everywhere),
so that the *per-image performance gap* to the final output

    loss_i(lam) = max(0, q(final output of image i) - q(answer of image i under lam))  in [0, 1]

(``q``: the image's mIoU over the classes in its ground truth / 100, its pixel accuracy, or,
label-free, its agreement with the final output, which makes the loss the share of pixels whose
answer differs from the final output's: ``disagreement``) is controlled on new images drawn
like the calibration images:

* ``method="crc"`` (conformal risk control, Angelopoulos et al. 2024): the expected loss on a
  new image is at most ``epsilon``, over calibration and test draws together. ``lam`` is the
  smallest candidate with ``(n R_n(lam) + 1) / (n + 1) <= epsilon``, where ``R_n`` is the
  mean over the ``n`` calibration images of the loss made monotone in ``lam`` (each image's
  worst loss over the thresholds at or above ``lam``; it bounds the real loss, so its
  guarantee carries over; CRC needs the monotone loss).
* ``method="ucb"`` (an upper confidence bound, Learn-then-Test style): with probability at
  least ``1 - delta`` over the calibration draw, the expected loss at the chosen ``lam`` is at
  most ``epsilon``. The candidates are tested from the most conservative one (never exit) down
  (fixed-sequence testing, valid without monotonicity), with the Hoeffding-Bentkus p-value of
  "risk > epsilon"; ``lam`` is the last one before the first that is not rejected at ``delta``.

The records may be of either policy (:class:`~.anytime.ThresholdRecords`): image-level
(:class:`~.anytime.ExitRecords`, one shared threshold, the candidates are the recorded
confidences) or per-pixel (:class:`~.anytime_pixel.PixelRecords`, the recorded candidate
settings, the most conservative first).

Both guarantees assume the calibration and the new images are exchangeable (drawn alike):
calibrating on images the model was trained on breaks that (the exits are more confident
there). Both bound a per-image mean gap, not the gap of the dataset-level mIoU.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..modeling.meta_arch.anytime import NEVER
from .anytime import QUALITIES, ThresholdRecords, policy_outcome
from .anytime_calibration import Calibration

__all__ = ["QUALITIES", "RISK_METHODS", "check_risk_args", "per_image_quality", "gap_losses", "shared_candidates",
           "hoeffding_bentkus_pvalue", "calibrate_risk"]

RISK_METHODS = ("crc", "ucb")


def per_image_quality(records: ThresholdRecords, quality: str = "miou") -> np.ndarray:
    """N x outputs in [0, 1]: each recorded output's quality on each image (for
    :class:`~.anytime.ExitRecords` the exits, then the final head; for per-pixel records one
    column per candidate setting). ``miou``: the image's mIoU over the classes of its ground
    truth; ``pixel_accuracy``; both 1 for an image without labelled pixels (no gap).
    ``disagreement``: the share of the image's pixels where the output agrees with the final
    output (1 for the final output itself); label-free."""
    return records.output_qualities(quality)


def shared_candidates(records: ThresholdRecords, limit: int = 2000) -> np.ndarray:
    """Candidate shared thresholds of image-level records, most conservative first: ``inf``
    (never exit), then the recorded confidences in decreasing order (at most ``limit``, spread by
    quantile). The first column of :meth:`~.anytime.ThresholdRecords.risk_sequence`."""
    return records.risk_sequence(limit)[:, 0]


def gap_losses(records: ThresholdRecords, thresholds: np.ndarray, quality: str = "miou") -> np.ndarray:
    """M x N: the per-image gap ``max(0, q_final - q_answer)`` under each setting: ``thresholds``
    is M shared values, or M x E rows (one value per exit)."""
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim == 1:
        t = np.repeat(t[:, None], len(records.exit_names), axis=1)
    q = per_image_quality(records, quality)
    answered = np.take_along_axis(q[None], records.outputs_of(t)[..., None], axis=2)[..., 0]
    return np.clip(q[None, :, records.final_output] - answered, 0.0, 1.0)


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (no scipy at run time)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k + 1)]
    m = max(terms)
    return min(1.0, math.exp(m) * sum(math.exp(t - m) for t in terms))


def hoeffding_bentkus_pvalue(risk_hat: float, n: int, epsilon: float) -> float:
    """p-value of the null "expected loss > epsilon" from a mean ``risk_hat`` of ``n`` losses in
    [0, 1] (Bates et al. 2021, Learn then Test, eq. for HB): min(Hoeffding, Bentkus)."""
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}.")
    r = min(max(risk_hat, 0.0), 1.0)
    a = min(r, epsilon)
    # Hoeffding: exp(-n h(a, eps)), h the Bernoulli relative entropy
    h = (a * math.log(a / epsilon) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - epsilon))
    p_hoeffding = math.exp(-n * h)
    p_bentkus = math.e * _binom_cdf(math.ceil(n * r), n, epsilon)
    return min(p_hoeffding, p_bentkus, 1.0)


def check_risk_args(method: str, epsilon: Optional[float], delta: float, quality: str) -> None:
    """ValueError for a risk-control setting :func:`calibrate_risk` cannot use (callers check
    before running a model)."""
    if method not in RISK_METHODS:
        raise ValueError(f"method must be one of {RISK_METHODS}, got {method!r}.")
    if epsilon is None or not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must be in (0, 1) (a per-image gap in units of {quality}, e.g. 0.05), "
                         f"got {epsilon}.")
    if method == "ucb" and not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}.")
    if quality not in QUALITIES:
        raise ValueError(f"quality must be one of {QUALITIES}, got {quality!r}.")


def calibrate_risk(records: ThresholdRecords, *, epsilon: float, method: str = "ucb", delta: float = 0.1,
                   quality: str = "miou", candidates: int = 2000) -> Calibration:
    """One threshold shared by every exit (image-level records; for per-pixel records one of
    their recorded settings), chosen by risk control (module docstring).

    ``epsilon``: the per-image gap allowed, in [0, 1] units of ``quality`` (0.01 = one point
    of per-image mIoU); ``delta`` (``ucb``): the probability the bound may fail. Returns a
    :class:`~.anytime_calibration.Calibration` (thresholds: the same value for every exit, ``NEVER`` when
    only the final head is safe) whose ``details`` hold the method, the empirical risk and the
    bound at the chosen threshold. ``candidates``: at most that many shared thresholds of
    image-level records (per-pixel records test all of theirs). ``feasible`` is False when even "never exit" cannot be
    certified (too few calibration images for ``epsilon``/``delta``): then no exit is used.
    """
    check_risk_args(method, epsilon, delta, quality)
    names = list(records.exit_names)
    if not names:
        raise ValueError("calibrate_risk: the model has no exits.")
    n = records.num_images
    if n == 0:
        raise ValueError("calibrate_risk: no calibration images.")
    if quality != "disagreement" and records.labelled_images == 0:
        raise ValueError(f"calibrate_risk: none of the {n} images has a labelled pixel, so the quality {quality!r} "
                         "cannot be measured; use the label-free quality 'disagreement'.")
    rows = records.risk_sequence(candidates)
    losses = gap_losses(records, rows, quality)  # M x N, most conservative setting first
    if method == "crc":
        monotone = np.maximum.accumulate(losses, axis=0)  # each image's worst loss at or above lam
        stat = (n * monotone.mean(1) + 1.0) / (n + 1.0)
        ok = stat <= epsilon
        run = int(np.argmin(ok)) if not ok.all() else len(ok)  # the leading run of certified thresholds
    else:  # fixed-sequence testing: stop at the first threshold whose null is not rejected
        risk, stat, run = losses.mean(1), np.ones(len(rows)), len(rows)
        for k, r in enumerate(risk):
            stat[k] = hoeffding_bentkus_pvalue(float(r), n, epsilon)
            if stat[k] > delta:
                run = k
                break
    feasible = run > 0
    j = max(run - 1, 0)
    row = rows[j] if feasible else np.full(len(names), math.inf)
    thresholds = {name: (NEVER if not math.isfinite(v) else float(v)) for name, v in zip(names, row)}
    shared = bool((row == row[0]).all())
    label = "p-value" if method == "ucb" else "bound"
    details = {
        "method": method, "epsilon": epsilon, "delta": delta if method == "ucb" else None, "quality": quality,
        # one value for every exit (None = never); a per-exit setting of per-pixel records is in the thresholds
        "threshold": (None if not math.isfinite(row[0]) else float(row[0])) if shared else "per exit",
        "empirical_risk": float(losses[j].mean()), label: float(stat[j]), "candidates": len(rows), "images": n,
    }
    if not feasible:
        need = (math.ceil(1.0 / epsilon - 1.0) if method == "crc"
                else math.ceil(math.log(delta) / math.log1p(-epsilon)))
        details["reason"] = (f"{n} calibration images cannot certify epsilon={epsilon}"
                             + (f" at delta={delta}" if method == "ucb" else "") + f": at least {need} are needed")
    objective = f"risk={method} epsilon={epsilon}" + (f" delta={delta}" if method == "ucb" else "") + f" ({quality} gap)"
    never = {name: NEVER for name in names}
    return Calibration(thresholds, policy_outcome(records, thresholds), policy_outcome(records, never),
                       objective, feasible, len(rows) - 1, details=details)
