"""Risk-controlled exit thresholds (segdistill.evaluation.anytime_risk, *Fast yet Safe*):
per-image qualities and gaps against loops, the chosen threshold against a brute-force scan
of the rules with an independent p-value (scipy), and the guarantees themselves by
simulation: on a large synthetic population, the UCB threshold's true risk exceeds epsilon in
at most about delta of the calibration draws and the CRC threshold's true risk is at most
epsilon on average, while the uncorrected empirical choice fails about half the time."""
import importlib.util
import math
import os

import numpy as np
import pytest
from scipy import stats

from conftest import REPO
from segdistill.evaluation import metrics_from_confusion
from segdistill.evaluation.anytime import ExitRecords, policy_outcome
from segdistill.evaluation.anytime_risk import (
    calibrate_risk, gap_losses, hoeffding_bentkus_pvalue, per_image_quality, shared_candidates,
)
from segdistill.modeling.meta_arch.anytime import FINAL, NEVER

PIX = 10  # pixels per synthetic image


def population(n, seed, exits=2):
    """``n`` images of PIX pixels, all of class 0; exit j gets confidence c ~ U(0, 1) and gets
    Binomial(PIX, 0.7 (1 - c) / (j + 1)) pixels wrong (the final head none): a gap of k / PIX
    that falls with the confidence and with depth. Costs: exit j stops at 10 (j + 1)."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.0, 1.0, (n, exits))
    wrong = rng.binomial(PIX, 0.7 * (1.0 - conf) / (np.arange(exits) + 1.0))
    confs = np.zeros((n, exits + 1, 2, 2), dtype=np.int64)
    confs[:, :exits, 0, 0], confs[:, :exits, 0, 1] = PIX - wrong, wrong
    confs[:, exits, 0, 0] = PIX
    names = [f"e{j}" for j in range(exits)]
    return ExitRecords(names, conf, confs, np.tile(10.0 * np.arange(1, exits + 1), (n, 1)), np.ones((n, exits)),
                       np.zeros((n, exits)), np.full(n, 100.0))


def subset(records, idx):
    return ExitRecords(records.exit_names, records.confidences[idx], records.confusions[idx], records.prefix[idx],
                       records.exit_macs[idx], records.answer[idx], records.final[idx])


def test_per_image_quality_and_gaps_against_loops():
    rng = np.random.default_rng(0)
    n, e, k = 5, 2, 4
    confs = rng.integers(0, 15, (n, e + 1, k, k))
    confs[1, :, 2, :] = 0  # a class absent from image 1's ground truth
    confs[3] = 0  # an image without labelled pixels: no gap
    rec = ExitRecords(["a", "b"], rng.uniform(size=(n, e)), confs, np.zeros((n, e)), np.zeros((n, e)),
                      np.zeros((n, e)), np.zeros(n))
    names = [str(c) for c in range(k)]
    for quality in ("miou", "pixel_accuracy"):
        q = per_image_quality(rec, quality)
        for i in range(n):
            for j in range(e + 1):
                c = confs[i, j]
                if c.sum() == 0:
                    want = 1.0
                elif quality == "miou":
                    want = metrics_from_confusion(c, names)["mIoU"] / 100
                else:
                    want = np.trace(c) / c.sum()
                assert q[i, j] == pytest.approx(want), (quality, i, j)
        lam = 0.5
        loss = gap_losses(rec, np.array([lam]), quality)[0]
        for i in range(n):
            hit = [j for j in range(e) if rec.confidences[i, j] >= lam]
            ans = hit[0] if hit else e
            assert loss[i] == pytest.approx(max(0.0, q[i, e] - q[i, ans]))
    with pytest.raises(ValueError, match="quality must be one of"):
        per_image_quality(rec, "dice")


def test_hoeffding_bentkus_pvalue_against_scipy():
    for r, n, eps in [(0.0, 50, 0.1), (0.05, 200, 0.1), (0.08, 1000, 0.1), (0.2, 100, 0.1), (0.3, 40, 0.5)]:
        a = min(r, eps)
        kl = (a * math.log(a / eps) if a else 0.0) + (1 - a) * math.log((1 - a) / (1 - eps))
        want = min(math.exp(-n * kl), math.e * stats.binom.cdf(math.ceil(n * r), n, eps), 1.0)
        assert hoeffding_bentkus_pvalue(r, n, eps) == pytest.approx(want, rel=1e-9, abs=1e-300)
    assert hoeffding_bentkus_pvalue(0.0, 50, 0.1) == pytest.approx(0.9 ** 50)  # no loss seen: (1 - eps)^n


def brute_force_threshold(records, epsilon, method, delta, quality):
    """Scan the shared thresholds (never first, then the confidences downwards) with loops."""
    q = per_image_quality(records, quality)
    e, n = len(records.exit_names), records.num_images
    lams = [math.inf] + sorted(set(records.confidences.ravel().tolist()), reverse=True)

    def loss(i, lam):
        hit = [j for j in range(e) if records.confidences[i, j] >= lam]
        return max(0.0, q[i, e] - q[i, hit[0] if hit else e])

    chosen = None
    for k, lam in enumerate(lams):
        if method == "crc":  # each image's worst loss over the thresholds at or above lam
            risk = np.mean([max(loss(i, l2) for l2 in lams[:k + 1]) for i in range(n)])
            ok = (n * risk + 1) / (n + 1) <= epsilon
        else:
            r = np.mean([loss(i, lam) for i in range(n)])
            a = min(r, epsilon)
            kl = (a * math.log(a / epsilon) if a else 0.0) + (1 - a) * math.log((1 - a) / (1 - epsilon))
            p = min(math.exp(-n * kl), math.e * stats.binom.cdf(math.ceil(n * r), n, epsilon))
            ok = p <= delta
        if not ok:
            break
        chosen = lam
    return chosen


@pytest.mark.parametrize("method", ["crc", "ucb"])
@pytest.mark.parametrize("quality", ["miou", "pixel_accuracy"])
def test_chosen_threshold_is_the_brute_force_scan(method, quality):
    rec = population(60, seed=1)
    for eps in (0.05, 0.1, 0.2):
        cal = calibrate_risk(rec, epsilon=eps, method=method, delta=0.1, quality=quality)
        want = brute_force_threshold(rec, eps, method, 0.1, quality)
        assert want is not None and cal.feasible
        assert set(cal.thresholds.values()) == {want}, (eps, cal.thresholds, want)
        o = policy_outcome(rec, cal.thresholds)
        assert o.histogram() == cal.outcome.histogram() and cal.details["threshold"] == (
            None if math.isinf(want) else want)
        assert cal.details["empirical_risk"] == pytest.approx(gap_losses(rec, np.array([want]), quality)[0].mean())
    # a looser epsilon never chooses a more conservative threshold
    lams = [calibrate_risk(rec, epsilon=eps, method=method, quality=quality).details["threshold"] for eps in
            (0.05, 0.1, 0.2, 0.4)]
    lams = [math.inf if v is None else v for v in lams]
    assert lams == sorted(lams, reverse=True) and lams[-1] < lams[0]


def test_too_few_images_cannot_certify_and_say_how_many_are_needed():
    rec = population(20, seed=2)
    cal = calibrate_risk(rec, epsilon=0.03, method="crc")  # 1 / (n + 1) = 0.048 > 0.03
    assert not cal.feasible and set(cal.thresholds.values()) == {NEVER}
    assert cal.outcome.histogram()[FINAL] == 20 and "at least 33 are needed" in cal.details["reason"]
    cal = calibrate_risk(rec, epsilon=0.05, method="ucb", delta=0.1)  # 0.95^20 = 0.36 > 0.1
    assert not cal.feasible and "at least 45 are needed" in cal.details["reason"]
    assert calibrate_risk(population(45, seed=2), epsilon=0.05, method="ucb", delta=0.1).feasible
    with pytest.raises(ValueError, match="epsilon must be in"):
        calibrate_risk(rec, epsilon=0.0)
    with pytest.raises(ValueError, match="delta must be in"):
        calibrate_risk(rec, epsilon=0.1, delta=1.5)
    with pytest.raises(ValueError, match="method must be one of"):
        calibrate_risk(rec, epsilon=0.1, method="ltt")


def test_guarantees_hold_by_simulation_and_the_uncorrected_choice_does_not():
    """Calibrate on 200 independent draws of 200 images from a 5000-image population; measure
    each chosen threshold's true risk on the population."""
    pop = population(5000, seed=3)
    eps, delta, trials, n = 0.1, 0.1, 200, 200
    lams = shared_candidates(pop, limit=400)
    true_risk = gap_losses(pop, lams, "miou").mean(1)  # on the population, per candidate threshold
    rng = np.random.default_rng(4)
    ucb, crc, naive = [], [], []
    for _ in range(trials):
        cal = subset(pop, rng.choice(len(pop.final), n, replace=False))
        u = calibrate_risk(cal, epsilon=eps, method="ucb", delta=delta, candidates=400)
        c = calibrate_risk(cal, epsilon=eps, method="crc", candidates=400)
        # the uncorrected choice: the lowest threshold whose empirical risk (and every one above it) is <= eps
        cl = shared_candidates(cal, limit=400)
        emp = gap_losses(cal, cl, "miou").mean(1)
        run = int(np.argmin(emp <= eps)) if not (emp <= eps).all() else len(emp)
        naive_lam = cl[max(run - 1, 0)]
        for out, lam in ((ucb, u.details["threshold"]), (crc, c.details["threshold"]),
                         (naive, None if np.isinf(naive_lam) else float(naive_lam))):
            # the population's risk at a calibration threshold: recompute exactly at that value
            out.append(float(gap_losses(pop, np.array([math.inf if lam is None else lam]), "miou")[0].mean()))
    ucb, crc, naive = map(np.array, (ucb, crc, naive))
    assert true_risk[0] == 0.0 and true_risk.max() > 2 * eps  # never exit: no gap  # the problem is not trivial either way
    assert (ucb > eps).mean() <= delta  # P(risk > eps) <= delta (here far below: the bound is conservative)
    assert crc.mean() <= eps + 3 * crc.std() / math.sqrt(trials)  # E[risk] <= eps
    assert (naive > eps).mean() > 0.25  # without the correction the target is missed often
    assert ucb.mean() < crc.mean() <= eps + 0.01  # the high-probability bound is the stricter one


def test_calibrate_exits_command_line_checks_its_arguments():
    spec = importlib.util.spec_from_file_location("calibrate_exits", os.path.join(REPO, "tools", "calibrate_exits.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for argv in (["--risk-control", "ucb"], ["--epsilon", "0.1"], ["--risk-control", "crc", "--epsilon", "0.1",
                                                                  "--max-drop", "1"]):
        with pytest.raises(SystemExit) as e:
            tool.main(["--config-file", "x.yaml", "--output", "t.json", *argv])
        assert e.value.code == 2
