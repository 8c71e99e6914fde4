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
from typing import Collection, Dict, List, Sequence

from methods import METHODS

__all__ = ["Claim", "CLAIMS", "paired", "verdict", "premises", "exit_mious", "EXIT_FAMILIES"]

# The families whose models have exits: their rows rest on the final output being above the exits.
EXIT_FAMILIES = ("ds", "sr", "hs3", "hs3_fuse")


@dataclass(frozen=True)
class Claim:
    """A paper's claim that row ``a`` beats row ``b``; ``gain``: the smallest gain the paper reports."""

    a: str
    b: str
    source: str
    gain: float


# The papers' numbers behind each gain: SR Table 1 (Cityscapes, OCRNet-HRNetV2-W48, the FSSS
# column); HS3 Table 1 (NYUD-v2: HRNetv2-w18-OCR 40.6 / DS 41.2 / HS3 41.7, w48 47.2 / 47.0 /
# 47.6), Table 6 (Cityscapes HRNetv2-w18: none 77.6, DS 77.7, manual 77.9, spectral 78.1),
# Table 2 (HS3-Fuse +1.2 over SA-Gates); FAKD Table 3 (Cityscapes, four students; "Ours" =
# FAKD-CWD) and Table 4 (ADE20K, PD -> PD-aug); HWD Tables II (ADE20K, three students) and III
# (Cityscapes, COCO-Stuff).
CLAIMS = [
    Claim("mea", "baseline", "SR Table 1, MEA vs baseline", 0.4),
    Claim("mea_srl", "mea", "SR Table 1, +SR-L vs MEA", 0.5),
    Claim("mea_srf", "mea", "SR Table 1, +SR-F vs MEA", 0.6),
    Claim("sr", "mea", "SR Table 1, SR vs MEA", 1.0),
    Claim("sr", "baseline", "SR Table 1, SR vs baseline", 1.4),
    Claim("hs3", "baseline", "HS3 Tables 1, 6, HS3 vs no auxiliary supervision", 0.4),
    Claim("hs3", "ds", "HS3 Tables 1, 6, HS3 vs DS", 0.4),
    Claim("hs3", "hs3_manual", "HS3 Table 6, trade-off rule (spectral) vs manual", 0.2),
    Claim("hs3_manual", "ds", "HS3 Table 6, manual vs DS", 0.2),
    Claim("hs3_fuse", "baseline", "HS3 Table 2, HS3-Fuse vs baseline", 1.2),
    Claim("cwd", "student", "FAKD Table 3, HWD Tables II-III, CWD vs student", 0.12),
    Claim("fakd_cwd", "student", "FAKD Table 3, FAKD vs student", 0.99),
    Claim("fakd_cwd", "cwd", "FAKD Table 3, FAKD vs CWD", 0.39),
    Claim("fakd_pd", "pd", "FAKD Table 4, PD-aug vs PD", 1.09),
    Claim("hwd", "student", "HWD Tables II-III, HWD vs student", 0.71),
    Claim("hwd", "cwd", "HWD Tables II-III, HWD vs CWD", 0.59),
    Claim("fakd_cwd", "skd", "FAKD Table 3, FAKD vs SKD", 1.18),
    Claim("fakd_cwd", "ifvd", "FAKD Table 3, FAKD vs IFVD", 0.6),
    Claim("fakd_cwd", "cirkd", "FAKD Table 3, FAKD vs CIRKD", 0.44),
    Claim("hwd", "skd", "HWD Tables II-III, HWD vs SKD", 0.82),
    Claim("hwd", "cirkd", "HWD Tables II-III, HWD vs CIRKD", 0.91),
    Claim("hwd", "mgd", "HWD Tables II-III, HWD vs MGD", 0.32),
]


def paired(base: List[dict], rows: List[dict]) -> dict:
    """Mean of rows - base over the seeds both finished, with its 95 % CI (Student t)."""
    b = {r["seed"]: r["mIoU"] for r in base}
    d = [r["mIoU"] - b[r["seed"]] for r in rows if r["seed"] in b]
    if not d:
        return {"n": 0}
    mean = statistics.mean(d)
    if len(d) < 2:
        return {"n": 1, "mean": mean}
    from scipy.stats import t

    half = t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return {"n": len(d), "mean": mean, "lo": mean - half, "hi": mean + half}


def verdict(results: Dict[str, List[dict]], claims: Sequence[Claim] = CLAIMS) -> List[dict]:
    """Each claim whose two rows ran: the paired difference, its CI and what it says of the claim."""
    out = []
    for c in claims:
        if c.a not in METHODS or c.b not in METHODS:
            continue
        a, b = results.get(c.a), results.get(c.b)
        if a is None or b is None:
            continue  # rows not in this invocation
        d = paired(b, a)
        if d["n"] < 2:
            v, delta = "pending (fewer than 2 paired seeds)", f"n={d['n']}"
        else:
            delta = f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] (n={d['n']})"
            if d["lo"] > 0:
                v = "reproduced"
            elif d["hi"] < 0:
                v = "not reproduced (significantly the other way)"
            elif d["hi"] < c.gain:
                v = "not reproduced (the CI excludes the paper's gain)"
            else:
                v = "inconclusive"
        out.append(dict(a=c.a, b=c.b, source=c.source, gain=c.gain, delta=delta, verdict=v,
                        **{k: d.get(k) for k in ("mean", "lo", "hi", "n")}))
    return out


def exit_mious(metrics: dict) -> Dict[str, float]:
    """``{exit: mIoU}`` of an evaluation's ``sem_seg_<exit>/mIoU`` entries (the teacher's excluded)."""
    return {k.split("/")[0][len("sem_seg_"):]: v for k, v in metrics.items()
            if k.startswith("sem_seg_") and k.endswith("/mIoU") and not k.startswith("sem_seg_teacher")}


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
                name="final above every DS exit (Phase-1 DS model, analysis split)", ok=min(margins.values()) > 0,
                text=f"final {p1['sem_seg/mIoU']:.1f}; exits " + ", ".join(f"{e} {v:.1f}" for e, v in exits.items())
                + "; margins " + ", ".join(f"{e} {m:+.1f}" for e, m in margins.items())))
        elif phase1_expected:
            checks.append(dict(name="final above every DS exit (Phase-1 DS model, analysis split)", ok=False,
                               text="not measured yet (the HS3 Phase 1 has not finished)"))
        base, ds = results.get("baseline", []), results.get("ds", [])
        if base and ds:
            b = statistics.mean(r["mIoU"] for r in base)
            dsf = statistics.mean(r["mIoU"] for r in ds)
            ex = {e: statistics.mean(r["exits"][e] for r in ds) for e in sorted(ds[0]["exits"])}
            margins = {e: b - v for e, v in ex.items()}
            checks.append(dict(
                name="baseline's final above every DS exit (val)", ok=bool(margins) and min(margins.values()) > 0,
                text=f"baseline {b:.1f} (n={len(base)}), DS final {dsf:.1f}; DS exits "
                + ", ".join(f"{e} {v:.1f}" for e, v in ex.items()) + " (n=" + str(len(ds)) + "); margins "
                + ", ".join(f"{e} {m:+.1f}" for e, m in margins.items())))
        else:
            checks.append(dict(name="baseline's final above every DS exit (val)", ok=False,
                               text="not measured yet (baseline and DS runs needed)"))
    if "teacher" in names or "student" in names:
        t, s = results.get("teacher", []), results.get("student", [])
        if t and s:
            tv = t[0]["mIoU"]
            sv = [r["mIoU"] for r in s]
            margin = tv - statistics.mean(sv)
            ok = margin >= min_teacher_margin and tv > max(sv)
            checks.append(dict(
                name=f"teacher clearly above the student (>= {min_teacher_margin:g} mIoU, above every seed)",
                ok=ok, text=f"teacher {tv:.1f}; student alone {statistics.mean(sv):.1f} (best seed {max(sv):.1f}, "
                f"n={len(sv)}); margin {margin:+.1f}"))
        else:
            checks.append(dict(name="teacher clearly above the student", ok=False,
                               text="not measured yet (teacher and student runs needed)"))
    return checks
