"""The statistics of the CamVid table: paired differences with their confidence intervals, the
papers' claims and their verdicts, and the papers' premises (docs/results.md).

Pure functions of the runs' results (``{method: [result of a seed, ...]}``, each with ``seed``,
``mIoU`` and ``exits``); ``benchmarks/camvid_table.py`` runs the jobs and
``benchmarks/table_report.py`` writes what these compute.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Collection, Dict, List, Optional, Sequence, Tuple

from methods import METHODS

__all__ = ["Claim", "CLAIMS", "ALPHA", "paired", "p_value", "holm", "row_tests", "verdict", "premises", "exit_premise_per_run",
           "exit_mious", "EXIT_FAMILIES", "FULL_CLASS_EXIT_FAMILIES"]

# The families whose models have exits: their rows rest on the final output being above the exits.
EXIT_FAMILIES = ("ds", "sr", "hs3", "hs3_fuse")
# The families whose exits predict every class, so that an exit's mIoU and the final output's are
# on one scale; HS3's exits score their own K-cluster spaces (their premise is the trade-off
# rule's, checked on the Phase-1 model).
FULL_CLASS_EXIT_FAMILIES = ("ds", "sr")


@dataclass(frozen=True)
class Claim:
    """A paper's claim that row ``a`` beats row ``b``; ``gain``: the smallest gain the paper reports."""

    a: str
    b: str
    source: str
    gain: float


# Each claim's gain is the smallest the paper reports in its tables for that comparison, over every
# column and row of the tables cited (a smaller gain makes "the interval excludes the paper's gain"
# harder to reach, so the verdict cannot be won by picking the paper's best column):
# SR Table 1 columns PC / MC / CS (PASCAL VOC and MS-COCO WSSS, Cityscapes FSSS): MEA +0.6 / +0.4 /
# +0.4; +SR-L over MEA +0.4 / +0.3 / +0.5; +SR-F over MEA +0.5 / +0.3 / +0.6; SR over MEA +0.8 /
# +0.5 / +1.0; SR over the baseline +1.4 / +0.9 / +1.4.
# HS3 Table 1 (NYUD-v2: w18-OCR 40.6 / DS 41.2 / HS3 41.7, w48 47.2 / 47.0 / 47.6), Table 3
# (Cityscapes val: DeepLab-v3+ WRN38 DS 82.8 / HS3 83.1; HRNetv2-w18 77.6 / 77.7 / 78.1; HS3-Fuse
# 81.8 and lighter 81.4 over w18-OCR 80.7), Table 6 (Cityscapes val HRNetv2-w18: none 77.6, DS
# 77.7, manual 77.9, spectral 78.1), Table 2 (NYUD-v2, HS3-Fuse over SA-Gate: 51.5 -> 52.2
# single-scale, 52.4 -> 53.5 multi-scale), Table 4 (Cityscapes test, HS3-Fuse 85.7 over its
# HRNet48-OCR-HMS baseline 85.4: the text's "gain of 0.3").
# FAKD Table 3 (four students, columns Cityscapes and Pascal VOC mIoU; "Ours" = FAKD-CWD), Table 4
# (ADE20K, PD -> PD-aug +1.09). HWD Table II (ADE20K, three students) and Table III (Cityscapes,
# COCO-Stuff).
CLAIMS = [
    Claim("mea", "baseline", "SR Table 1, MEA vs baseline (MC and CS columns)", 0.4),
    Claim("mea_srl", "mea", "SR Table 1, +SR-L vs MEA (MC column)", 0.3),
    Claim("mea_srf", "mea", "SR Table 1, +SR-F vs MEA (MC column)", 0.3),
    Claim("sr", "mea", "SR Table 1, SR vs MEA (MC column)", 0.5),
    Claim("sr", "baseline", "SR Table 1, SR vs baseline (MC column)", 0.9),
    Claim("hs3", "baseline", "HS3 Table 1, HS3 vs no auxiliary supervision (HRNetv2-w48 rows)", 0.4),
    Claim("hs3", "ds", "HS3 Table 3, HS3 vs DS (DeepLab-v3+ WRN38 rows)", 0.3),
    Claim("hs3", "hs3_manual", "HS3 Table 6, trade-off rule (spectral) vs manual", 0.2),
    Claim("hs3_manual", "ds", "HS3 Table 6, manual vs DS", 0.2),
    Claim("hs3_fuse", "baseline", "HS3 Table 4, HS3-Fuse vs its HRNet48-OCR-HMS baseline (Cityscapes test)", 0.3),
    Claim("cwd", "student", "HWD Table III, CWD vs student (COCO-Stuff)", 0.12),
    Claim("fakd_cwd", "student", "FAKD Table 3, FAKD vs student (Cityscapes, ISANet-R18)", 0.99),
    Claim("fakd_cwd", "cwd", "FAKD Table 3, FAKD vs CWD (Pascal VOC, DeepLab-MV2)", 0.01),
    Claim("fakd_pd", "pd", "FAKD Table 4, PD-aug vs PD (ADE20K)", 1.09),
    Claim("hwd", "student", "HWD Table III, HWD vs student (COCO-Stuff)", 0.71),
    Claim("hwd", "cwd", "HWD Table III, HWD vs CWD (COCO-Stuff)", 0.59),
    Claim("fakd_cwd", "skd", "FAKD Table 3, FAKD vs SKD (Cityscapes, HRNet18s)", 1.18),
    Claim("fakd_cwd", "ifvd", "FAKD Table 3, FAKD vs IFVD (Pascal VOC, DeepLab-MV2)", 0.12),
    Claim("fakd_cwd", "cirkd", "FAKD Table 3, FAKD vs CIRKD (Cityscapes, ISANet-R18)", 0.44),
    Claim("hwd", "skd", "HWD Table III, HWD vs SKD (COCO-Stuff)", 0.82),
    Claim("hwd", "cirkd", "HWD Table III, HWD vs CIRKD (COCO-Stuff)", 0.91),
    Claim("hwd", "mgd", "HWD Table III, HWD vs MGD (COCO-Stuff)", 0.32),
    # The 2023 rows: only their authors' README tables could be read here, not the papers' tables
    # (docs/reproduce.md), and they give one setting each: Cityscapes val, DeepLabV3-R18 taught by
    # DeepLabV3-R101, the student alone 74.21 (Af-DCD's README): Af-DCD 77.03 (+2.82), MasKD 77.00
    # (+2.79; MasKD's segmentation README, and Af-DCD's). No DiffKD segmentation number could be
    # read, so DiffKD has no claim.
    Claim("afdcd", "student", "Af-DCD README table, Af-DCD vs student (Cityscapes, DeepLabV3-R18; paper's table unread)",
          2.82),
    Claim("maskd", "student", "MasKD segmentation README, MasKD vs student (Cityscapes, DeepLabV3-R18; paper's table "
          "unread)", 2.79),
] + [
    # Laube et al. 2026 (arXiv 2604.25530): at matched training compute, plain logit (PD) and feature
    # (FitNet) distillation beat the segmentation-specific losses. Its tables are not among the papers
    # here, so no gain is taken from them: gain 0, the direction only.
    Claim(a, b, f"Laube et al. 2026, equal compute: {a.split('@')[0].upper()} vs {b.split('@')[0].upper()}", 0.0)
    for a in ("pd@ec", "fitnet@ec") for b in ("skd@ec", "ifvd@ec", "cirkd@ec")
]

# The family-wise error rate the corrected verdicts keep (Holm over every test of the table's claims).
ALPHA = 0.05


def paired(base: List[dict], rows: List[dict]) -> dict:
    """Mean of rows - base over the seeds both finished, with its 95 % CI (Student t), its
    standard error ``se`` and degrees of freedom ``df``."""
    b = {r["seed"]: r["mIoU"] for r in base}
    d = [r["mIoU"] - b[r["seed"]] for r in rows if r["seed"] in b]
    if not d:
        return {"n": 0}
    mean = statistics.mean(d)
    if len(d) < 2:
        return {"n": 1, "mean": mean}
    from scipy.stats import t

    se = statistics.stdev(d) / math.sqrt(len(d))
    half = t.ppf(0.975, len(d) - 1) * se
    return {"n": len(d), "mean": mean, "lo": mean - half, "hi": mean + half, "se": se, "df": len(d) - 1}


def p_value(d: dict, value: float = 0.0) -> float:
    """Two-sided p-value of "the paired difference equals ``value``" (Student t, the test whose
    95 % interval ``paired`` reports: p < 0.05 exactly when the interval excludes ``value``)."""
    from scipy.stats import t

    if d["se"] == 0:  # every seed gave the same difference
        return 1.0 if d["mean"] == value else 0.0
    return float(min(1.0, 2 * t.sf(abs(d["mean"] - value) / d["se"], d["df"])))


def holm(pvalues: Sequence[float]) -> List[float]:
    """Holm's step-down adjusted p-values (same order as given): the i-th smallest p times
    (m - i + 1), made non-decreasing, capped at 1. A hypothesis is rejected at family-wise level
    alpha when its adjusted p is below alpha, whatever the dependence between the tests."""
    m = len(pvalues)
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda k: pvalues[k])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def verdict(results: Dict[str, List[dict]], claims: Sequence[Claim] = CLAIMS,
            run_failures: Optional[Dict[str, List[int]]] = None, alpha: float = ALPHA) -> List[dict]:
    """Each claim whose two rows ran: the paired difference, its CI, and what it says of the claim,
    corrected for the number of claims.

    Each claim carries two tests: "the difference is 0" (rejected the way of the claim: reproduced;
    the other way: the other way) and "the difference is the paper's smallest gain" (rejected below
    it: the interval excludes the paper's gain; no such test for a claim of gain 0, a direction
    only). Both rejected, above 0 and below the gain: "reproduced in direction only". Holm's correction runs over every test of every claim with at least two paired seeds,
    and ``verdict`` is the corrected reading;
    ``raw_verdict`` is the reading of the uncorrected 95 % interval, as before the correction.
    ``run_failures`` (``{method: [seed, ...]}``, from :func:`exit_premise_per_run`) lists, per claim,
    the runs of its two rows whose final output is not above every exit."""
    rows = []
    for c in claims:
        if c.a not in METHODS or c.b not in METHODS:
            continue
        a, b = results.get(c.a), results.get(c.b)
        if a is None or b is None:
            continue  # rows not in this invocation
        rows.append((c, paired(b, a)))
    tested = [(c, d) for c, d in rows if d["n"] >= 2]
    # one family: "Δ = 0" for every claim, and "Δ = gain" for every claim with a gain above 0
    raw, where = [], []
    for i, (c, d) in enumerate(tested):
        raw.append(p_value(d))
        where.append((i, "zero"))
        if c.gain > 0:
            raw.append(p_value(d, c.gain) if d["mean"] < c.gain else 1.0)
            where.append((i, "gain"))
    adjusted = holm(raw)
    tests = {}
    for (i, kind), p, h in zip(where, raw, adjusted):
        tests.setdefault(id(tested[i][1]), {})[kind] = (p, h)
    out = []
    for c, d in rows:
        failures = {m: (run_failures or {}).get(m, []) for m in (c.a, c.b)}
        extra = dict(premise_failures={m: s for m, s in failures.items() if s})
        if d["n"] < 2:
            v = raw_v = "pending (fewer than 2 paired seeds)"
            delta = f"n={d['n']}"
        else:
            delta = f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] (n={d['n']})"
            if d["lo"] > 0 and d["hi"] < c.gain:
                raw_v = "reproduced in direction only (the CI excludes the paper's gain)"
            elif d["lo"] > 0:
                raw_v = "reproduced"
            elif d["hi"] < 0:
                raw_v = "not reproduced (the CI is below 0)"
            elif d["hi"] < c.gain:
                raw_v = "not reproduced (the CI excludes the paper's gain)"
            else:
                raw_v = "inconclusive"
            p0, p0h = tests[id(d)]["zero"]
            pg, pgh = tests[id(d)].get("gain", (1.0, 1.0))
            if p0h < alpha and d["mean"] > 0 and pgh < alpha:
                v = "reproduced in direction only (below the paper's gain after Holm)"
            elif p0h < alpha and d["mean"] > 0:
                v = "reproduced"
            elif p0h < alpha:
                v = "not reproduced (below 0 after Holm)"
            elif pgh < alpha:
                v = "not reproduced (below the paper's gain after Holm)"
            else:
                v = "inconclusive"
            extra.update(p_zero=p0, p_zero_holm=p0h, tests=len(raw))
            if "gain" in tests[id(d)]:
                extra.update(p_gain=pg, p_gain_holm=pgh)
        out.append(dict(a=c.a, b=c.b, source=c.source, gain=c.gain, delta=delta, verdict=v, raw_verdict=raw_v,
                        **{k: d.get(k) for k in ("mean", "lo", "hi", "n")}, **extra))
    return out


def row_tests(pairs: Sequence[Tuple[str, str]], results: Dict[str, List[dict]]) -> Dict[Tuple[str, str], Tuple[float, float]]:
    """The table's rows against their block's baseline as one family: ``{(row, baseline): (raw p,
    Holm p)}`` of "the paired difference is 0", for each distinct pair with two paired seeds or more
    (a row shown in two blocks is one test)."""
    tested = []
    for a, b in dict.fromkeys(pairs):
        d = paired(results.get(b, []), results.get(a, []))
        if d["n"] >= 2:
            tested.append(((a, b), p_value(d)))
    adjusted = holm([p for _, p in tested])
    return {k: (p, h) for (k, p), h in zip(tested, adjusted)}


def exit_mious(metrics: dict) -> Dict[str, float]:
    """``{exit: mIoU}`` of an evaluation's ``sem_seg_<exit>/mIoU`` entries (the teacher's excluded)."""
    return {k.split("/")[0][len("sem_seg_"):]: v for k, v in metrics.items()
            if k.startswith("sem_seg_") and k.endswith("/mIoU") and not k.startswith("sem_seg_teacher")}


def _exit_rows(names: Collection[str], results: Dict[str, List[dict]]) -> List[str]:
    # in the catalogue's order, whatever the order (or hash seed) of ``names``
    return [n for n in METHODS if n in names and METHODS[n].family in FULL_CLASS_EXIT_FAMILIES
            and any(r.get("exits") for r in results.get(n, []))]


def exit_premise_per_run(names: Collection[str], results: Dict[str, List[dict]]) -> Dict[str, List[dict]]:
    """Inside each run of each full-class multi-exit row: the exits whose mIoU reaches the run's
    final output, ``{method: [{"seed", "exit", "margin"}, ...]}`` (margin = final - exit, <= 0)."""
    out = {}
    for n in _exit_rows(names, results):
        out[n] = [dict(seed=r["seed"], exit=e, margin=r["mIoU"] - v)
                  for r in sorted(results[n], key=lambda r: r["seed"]) for e, v in sorted(r.get("exits", {}).items())
                  if v >= r["mIoU"]]
    return out


def exit_premise_checks(names: Collection[str], results: Dict[str, List[dict]]) -> List[dict]:
    """"Final above every exit" inside each model: on each row's mean over its seeds (``gate``: a
    failure withholds the reading), and in each run (not a gate: its failures are listed, and each
    claim of a row with failing runs names them)."""
    rows = _exit_rows(names, results)
    if not rows:
        return [dict(name="final above every exit inside each multi-exit model (val)", ok=False, gate=True,
                     text="not measured yet (multi-exit runs needed)")]
    parts, ok = [], True
    for n in rows:
        rs = results[n]
        final = statistics.mean(r["mIoU"] for r in rs)
        margins = {e: final - statistics.mean(r["exits"][e] for r in rs) for e in sorted(rs[0]["exits"])}
        ok = ok and min(margins.values()) > 0
        parts.append(f"{METHODS[n].label} {final:.1f} (n={len(rs)}; margins "
                     + ", ".join(f"{e} {m:+.2f}" for e, m in margins.items()) + ")")
    per_run = exit_premise_per_run(names, results)
    runs = sum(len(results[n]) for n in rows)
    failed = [(n, f) for n in rows for f in per_run[n]]
    seeds = {(n, f["seed"]) for n, f in failed}
    text = ("none" if not failed else "; ".join(
        f"{METHODS[n].label} seed {f['seed']} {f['exit']} ({f['margin']:+.3f})" for n, f in failed))
    return [dict(name="final above every exit inside each multi-exit model (val, mean over its seeds)", ok=ok,
                 gate=True, text="; ".join(parts)),
            dict(name="final above every exit inside each run (val, every seed)", ok=not failed, gate=False,
                 text=f"{len(seeds)} of {runs} runs fail: {text}" if failed else f"holds in all {runs} runs",
                 failures={n: sorted({f["seed"] for f in per_run[n]}) for n in rows if per_run[n]})]


def premises(names: Collection[str], results: Dict[str, List[dict]], phase1: dict, phase1_expected: bool,
             min_teacher_margin: float) -> List[dict]:
    """The papers' premises in this regime, with their margins (camvid_table's doc, step 3):
    ``names`` the rows of the invocation, ``results`` their runs, ``phase1`` the Phase-1 DS
    model's metrics on the analysis split ({} when not run), ``phase1_expected`` whether the
    invocation runs that Phase 1, ``min_teacher_margin`` the teacher's margin the premise needs."""
    checks = []
    if any(n in METHODS and METHODS[n].family in EXIT_FAMILIES for n in names):
        p1 = phase1
        exits = exit_mious(p1)
        if "sem_seg/mIoU" in p1 and exits:
            margins = {e: p1["sem_seg/mIoU"] - v for e, v in exits.items()}
            checks.append(dict(
                name="final above every DS exit (Phase-1 DS model, analysis split)", ok=min(margins.values()) > 0, gate=True,
                text=f"final {p1['sem_seg/mIoU']:.1f}; exits " + ", ".join(f"{e} {v:.1f}" for e, v in exits.items())
                + "; margins " + ", ".join(f"{e} {m:+.1f}" for e, m in margins.items())))
        elif phase1_expected:
            checks.append(dict(name="final above every DS exit (Phase-1 DS model, analysis split)", ok=False, gate=True,
                               text="not measured yet (the HS3 Phase 1 has not finished)"))
        checks += exit_premise_checks(names, results)
    if "teacher" in names or "student" in names:
        t, s = results.get("teacher", []), results.get("student", [])
        if t and s:
            tv = t[0]["mIoU"]
            sv = [r["mIoU"] for r in s]
            margin = tv - statistics.mean(sv)
            ok = margin >= min_teacher_margin and tv > max(sv)
            checks.append(dict(
                name=f"teacher clearly above the student (>= {min_teacher_margin:g} mIoU, above every seed)",
                ok=ok, gate=True, text=f"teacher {tv:.1f}; student alone {statistics.mean(sv):.1f} (best seed {max(sv):.1f}, "
                f"n={len(sv)}); margin {margin:+.1f}"))
        else:
            checks.append(dict(name="teacher clearly above the student", ok=False, gate=True,
                               text="not measured yet (teacher and student runs needed)"))
    return checks
