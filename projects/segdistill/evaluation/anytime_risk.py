"""Risk-controlled exit thresholds for anytime inference (*Fast yet Safe*, Jazbec et al.,
NeurIPS 2024, arXiv 2405.20915).

:func:`~.anytime_calibration.calibrate` picks the thresholds whose mIoU on the calibration split is
within a margin of the final output's: an empirical choice, which a new sample of images may
not honour. Risk control picks one threshold ``lam`` shared by every exit (an image answers at
the first exit whose confidence reaches ``lam``; ``lam`` above 1 = the final head everywhere),
so that the *per-image performance gap* to the final output

    loss_i(lam) = max(0, q(final output of image i) - q(answer of image i under lam))  in [0, 1]

(``q``: the image's mIoU over the classes in its ground truth / 100, or its pixel accuracy) is
controlled on new images drawn like the calibration images:

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

Both guarantees assume the calibration and the new images are exchangeable (drawn alike):
calibrating on images the model was trained on breaks that (the exits are more confident
there). Both bound a per-image mean gap, not the gap of the dataset-level mIoU.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..modeling.meta_arch.anytime import FINAL, NEVER
from .anytime import ExitRecords, evaluate_thresholds, fixed_exit_outcome, miou_of_confusions, policy_outcome
from .anytime_calibration import Calibration

__all__ = ["QUALITIES", "RISK_METHODS", "check_risk_args", "per_image_quality", "gap_losses", "shared_candidates",
           "hoeffding_bentkus_pvalue", "calibrate_risk"]

QUALITIES = ("miou", "pixel_accuracy")
RISK_METHODS = ("crc", "ucb")


def per_image_quality(records: ExitRecords, quality: str = "miou") -> np.ndarray:
    """N x (E + 1) in [0, 1]: each output's quality on each image (exits, then the final head).
    ``miou``: the image's mIoU over the classes of its ground truth; ``pixel_accuracy``. An
    image without labelled pixels has quality 1 for every output (no gap)."""
    if quality not in QUALITIES:
        raise ValueError(f"quality must be one of {QUALITIES}, got {quality!r}.")
    conf = np.asarray(records.confusions, dtype=np.float64)
    labelled = conf.sum((-2, -1))
    if quality == "miou":
        q = miou_of_confusions(conf) / 100.0
    else:
        q = np.trace(conf, axis1=-2, axis2=-1) / np.maximum(labelled, 1.0)
    return np.where(labelled > 0, q, 1.0)


def shared_candidates(records: ExitRecords, limit: int = 2000) -> np.ndarray:
    """Candidate shared thresholds, most conservative first: ``inf`` (never exit), then the
    recorded confidences in decreasing order (at most ``limit``, spread by quantile)."""
    u = np.unique(records.confidences)
    if len(u) > limit:
        u = np.unique(np.quantile(u, np.linspace(0.0, 1.0, limit), method="nearest"))
    return np.concatenate([[np.inf], u[::-1]])


def gap_losses(records: ExitRecords, lambdas: np.ndarray, quality: str = "miou") -> np.ndarray:
    """M x N: the per-image gap ``max(0, q_final - q_answer)`` under each shared threshold."""
    lambdas = np.asarray(lambdas, dtype=np.float64)
    e = len(records.exit_names)
    q = per_image_quality(records, quality)
    _, _, answers = evaluate_thresholds(records, np.repeat(lambdas[:, None], e, axis=1))
    answered = np.take_along_axis(q[None], answers[..., None], axis=2)[..., 0]
    return np.clip(q[None, :, e] - answered, 0.0, 1.0)


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


def calibrate_risk(records: ExitRecords, *, epsilon: float, method: str = "ucb", delta: float = 0.1,
                   quality: str = "miou", candidates: int = 2000) -> Calibration:
    """One threshold shared by every exit, chosen by risk control (module docstring).

    ``epsilon``: the per-image gap allowed, in [0, 1] units of ``quality`` (0.01 = one point
    of per-image mIoU); ``delta`` (``ucb``): the probability the bound may fail. Returns a
    :class:`~.anytime_calibration.Calibration` (thresholds: the same value for every exit, ``NEVER`` when
    only the final head is safe) whose ``details`` hold the method, the empirical risk and the
    bound at the chosen threshold. ``feasible`` is False when even "never exit" cannot be
    certified (too few calibration images for ``epsilon``/``delta``): then no exit is used.
    """
    check_risk_args(method, epsilon, delta, quality)
    names = list(records.exit_names)
    if not names:
        raise ValueError("calibrate_risk: the model has no exits.")
    n = records.num_images
    if n == 0:
        raise ValueError("calibrate_risk: no calibration images.")
    lambdas = shared_candidates(records, candidates)
    losses = gap_losses(records, lambdas, quality)  # M x N, most conservative threshold first
    if method == "crc":
        monotone = np.maximum.accumulate(losses, axis=0)  # each image's worst loss at or above lam
        stat = (n * monotone.mean(1) + 1.0) / (n + 1.0)
        ok = stat <= epsilon
        run = int(np.argmin(ok)) if not ok.all() else len(ok)  # the leading run of certified thresholds
    else:  # fixed-sequence testing: stop at the first threshold whose null is not rejected
        risk, stat, run = losses.mean(1), np.ones(len(lambdas)), len(lambdas)
        for k, r in enumerate(risk):
            stat[k] = hoeffding_bentkus_pvalue(float(r), n, epsilon)
            if stat[k] > delta:
                run = k
                break
    feasible = run > 0
    j = max(run - 1, 0)
    lam = float(lambdas[j]) if feasible else math.inf
    thresholds = {name: (NEVER if not math.isfinite(lam) else lam) for name in names}
    label = "p-value" if method == "ucb" else "bound"
    details = {
        "method": method, "epsilon": epsilon, "delta": delta if method == "ucb" else None, "quality": quality,
        "threshold": None if not math.isfinite(lam) else lam, "empirical_risk": float(losses[j].mean()),
        label: float(stat[j]), "candidates": len(lambdas), "images": n,
    }
    if not feasible:
        need = (math.ceil(1.0 / epsilon - 1.0) if method == "crc"
                else math.ceil(math.log(delta) / math.log1p(-epsilon)))
        details["reason"] = (f"{n} calibration images cannot certify epsilon={epsilon}"
                             + (f" at delta={delta}" if method == "ucb" else "") + f": at least {need} are needed")
    objective = f"risk={method} epsilon={epsilon}" + (f" delta={delta}" if method == "ucb" else "") + f" ({quality} gap)"
    return Calibration(thresholds, policy_outcome(records, thresholds), fixed_exit_outcome(records, FINAL),
                       objective, feasible, len(lambdas) - 1, details=details)
