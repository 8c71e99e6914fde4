"""The writing of the CamVid table: markdown (premises, blocks with paired CIs, HS3's clusters,
per-class IoU, verdict), results.json / summary.json, the plot, and the published copies.

It writes what ``benchmarks/camvid_table.py`` collected (the runs) and
``benchmarks/table_stats.py`` computed (premises, verdict), handed over as one
:class:`TableInputs`; it runs nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
from dataclasses import dataclass, field
from typing import Collection, Dict, List, Tuple

from methods import METHODS
from table_stats import ALPHA, paired, row_tests

__all__ = ["TableInputs", "write_table", "verdict_lines", "per_class_lines", "hs3_choice", "describe_clusters", "plot", "publish"]


@dataclass
class TableInputs:
    """What the table is written from."""

    out: str  # the output folder
    seeds: List[int]  # the invocation's seeds
    blocks: Dict[str, Tuple[str, List[str]]]  # the invocation's blocks: title, methods (the first: the baseline)
    rows: Collection[str]  # the methods of the invocation (``--methods``)
    results: Dict[str, List[dict]]  # method -> its finished runs' results
    premises: List[dict]  # table_stats.premises
    verdict: List[dict]  # table_stats.verdict
    pretraining: str  # the backbones' pre-training, in words
    pretraining_info: dict  # pre-training name -> its record
    phase1: dict  # the HS3 Phase-1 model's metrics on the analysis split ({} when not run)
    clusters: Dict[str, str]  # "hs3_clusters" / "hs3_manual" -> its clusters file
    tuning: Dict[str, dict] = field(default_factory=dict)  # method -> its tuning pick (camvid_table's pick.json)



def write_table(t: TableInputs, publish_to: str = "") -> str:
    """Write ``table.md``, ``results.json``, ``summary.json`` and ``table.png`` into ``t.out``
    (and copies into ``publish_to``); returns the markdown."""
    results, checks = t.results, t.premises
    lines = [f"CamVid val (101 images), final mIoU % of the deployed model over seeds {t.seeds} "
             f"(mean ± standard deviation; n = finished seeds). Δ: against the block's baseline, paired by "
             f"seed, with its 95 % confidence interval (Student t, n - 1 degrees of freedom). "
             f"Backbones: {t.pretraining}. Output: {shown_path(t.out)}", ""]
    lines += ["### Premises", ""]
    for c in checks:
        state = "holds" if c["ok"] else ("FAILS" if c.get("gate", True) else "FAILS in some runs (listed, per claim below)")
        lines.append(f"- {state}: {c['name']}: {c['text']}")
    lines.append("")
    pairs = [(n, names[0]) for names in ([n for n in block if n in t.rows] for _, block in t.blocks.values())
             for n in names[1:] if names and n != "teacher"]
    tests = row_tests(pairs, results)
    for title, block in t.blocks.values():
        names = [n for n in block if n in t.rows]
        if not names:
            continue
        base = results.get(names[0], [])
        lines += [f"### {title}", "",
                  f"| method | mIoU | n | Δ vs {METHODS[names[0]].label} [95 % CI] | p (Δ = 0): raw / Holm over "
                  f"{len(tests)} rows | exits mIoU (res2 / res3 / res4) | s / iter (shared machine) |",
                  "|---|---|---|---|---|---|---|"]
        for n in names:
            rs = results.get(n, [])
            if not rs:
                lines.append(f"| {METHODS[n].label} | (not run) | 0 | | | | |")
                continue
            vals = [r["mIoU"] for r in rs]
            mean = statistics.mean(vals)
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            delta = ""
            if n != names[0] and n != "teacher" and base:
                d = paired(base, rs)
                if d["n"] >= 2:
                    delta = f"{d['mean']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}] (n={d['n']})"
                elif d["n"] == 1:
                    delta = f"{d['mean']:+.1f} (n=1)"
            exits = ""
            if rs[0].get("exits"):
                exits = " / ".join(f"{statistics.mean(r['exits'][e] for r in rs):.1f}" for e in sorted(rs[0]["exits"]))
            spi = [r["sec_per_iter"] for r in rs if r.get("sec_per_iter")]
            spi_s = f"{statistics.mean(spi):.2f}" if spi else ""
            p = tests.get((n, names[0]))
            p_s = f"{p[0]:.3f} / {p[1]:.3f}" if p else ""
            lines.append(f"| {METHODS[n].label} | {mean:.1f} ± {std:.1f} | {len(vals)} | {delta} | {p_s} | {exits} | {spi_s} |")
        lines.append("")
    if t.tuning:
        lines += ["Tuning picks (mean held-out mIoU per grid factor of the default weight, trained on the reduced "
                  "split, scored on the analysis split; the pick in bold):", ""]
        for m, pk in t.tuning.items():
            grid = ", ".join((f"**x{f}: {sum(v) / len(v):.1f}**" if float(f) == pk["factor"] else
                              f"x{f}: {sum(v) / len(v):.1f}") for f, v in pk["held_out"].items())
            lines.append(f"- {METHODS[m].label}: {grid}; " + ", ".join(f"{k} {v:g}" for k, v in pk["weights"].items()))
        lines.append("")
    if "hs3" in t.blocks:
        choice = hs3_choice(t.clusters["hs3_clusters"])
        if choice:
            lines += choice + [""]
        for need, label in (("hs3_clusters", "trade-off rule"), ("hs3_manual", "manual ratio")):
            if os.path.isfile(t.clusters[need]):
                lines += [f"HS3 clusters ({label}): {describe_clusters(t.clusters[need])}", ""]
    lines += per_class_lines({n: rs for n, rs in results.items() if n in t.rows})
    verdict = t.verdict
    lines += ["### Verdict (claims of the papers, paired by seed)", ""]
    if all(c["ok"] for c in checks if c.get("gate", True)):
        lines += verdict_lines(verdict)
    else:
        failed = "; ".join(f"{c['name']}: {c['text']}" for c in checks if not c["ok"] and c.get("gate", True))
        lines += [f"Reading withheld: a premise of the papers does not hold (or is not measured yet) in this "
                  f"regime, so the differences above cannot test the papers' claims. {failed}"]
    lines.append("")
    text = "\n".join(lines)
    with open(os.path.join(t.out, "table.md"), "w") as f:
        f.write(text + "\n")
    summary = {m: [{"seed": r["seed"], "mIoU": round(r["mIoU"], 3),
                    "IoU": {k[len("sem_seg/IoU-"):]: round(v, 2) for k, v in r.get("metrics", {}).items()
                            if k.startswith("sem_seg/IoU-")},
                    "exits": {e: round(v, 3) for e, v in r.get("exits", {}).items()},
                    "sec_per_iter": r.get("sec_per_iter")} for r in rs] for m, rs in results.items()}
    common = {"seeds": t.seeds, "blocks": {b: list(block) for b, (_, block) in t.blocks.items()},
              "pretraining": t.pretraining_info, "premises": checks, "verdict": verdict,
              "phase1": t.phase1, "tuning": t.tuning}
    with open(os.path.join(t.out, "results.json"), "w") as f:
        json.dump(dict(common, results=results), f, indent=1)
    p1 = common["phase1"]
    common["phase1"] = {k: v for k, v in p1.items() if k.endswith("/mIoU")}
    with open(os.path.join(t.out, "summary.json"), "w") as f:
        json.dump(dict(common, results=summary), f, indent=1)
    plot(t)
    if publish_to:
        publish(t, publish_to)
    return text



def shown_path(path: str) -> str:
    """``path`` relative to the repository when inside it (a published table names no machine's folders)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rel = os.path.relpath(os.path.abspath(path), root)
    return path if rel.startswith("..") else rel


def verdict_lines(verdict: List[dict]) -> List[str]:
    """The verdict table: each claim's raw interval and p-values beside Holm's, the corrected
    verdict, the uncorrected reading, and the runs of its rows where the premise fails."""
    tests = max((v.get("tests", 0) for v in verdict), default=0)
    lines = [f"Verdict rule: each claim is two tests, \"Δ = 0\" and \"Δ = the paper's smallest gain\" (two-sided "
             f"Student t, the tests of the 95 % interval); Holm's step-down correction over all {tests} tests of "
             f"the table keeps the family-wise error at {ALPHA:g}. Reproduced: Δ = 0 rejected after Holm with Δ > 0 "
             "(in direction only where Δ = gain is rejected too, with Δ below it); not reproduced: Δ = 0 rejected with Δ < 0, or Δ = gain rejected with Δ below it; otherwise "
             "inconclusive. The uncorrected reading (the raw interval against 0 and the gain) is beside it.", "",
             "| claim | Δ [95 % CI] (n) | p (Δ = 0): raw / Holm | p (Δ = gain): raw / Holm | paper's smallest gain "
             "| verdict (Holm) | uncorrected | runs failing the premise |", "|---|---|---|---|---|---|---|---|"]
    for v in verdict:
        ps = [f"{v[k]:.3f} / {v[k + '_holm']:.3f}" if k in v else "" for k in ("p_zero", "p_gain")]
        fails = "; ".join(f"{METHODS[m].label} seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))}"
                          for m, s in v.get("premise_failures", {}).items())
        lines.append(f"| {v['source']}: {METHODS[v['a']].label} > {METHODS[v['b']].label} | {v['delta']} | {ps[0]} | "
                     f"{ps[1]} | {'+%.2f' % v['gain'] if v['gain'] > 0 else '(direction only)'} | {v['verdict']} | {v['raw_verdict']} | {fails} |")
    return lines


def per_class_lines(results: Dict[str, List[dict]]) -> List[str]:
    """Per-class IoU of every row (mean over its seeds), the classes no run predicts, and the
    class whose IoU moves most between the seeds of one row: where the mIoU's variance lives."""
    rows = [(n, rs) for n, rs in results.items() if rs and all(r.get("metrics") for r in rs)]
    classes = per_class_names({k: 0 for _, rs in rows for r in rs for k in r["metrics"]})
    if not classes:
        return []
    lines = ["### Per class (IoU %, mean over the row's seeds)", "",
             "| method | n | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
    spread = []  # (range over seeds, class, method, low, high)
    for n, rs in rows:
        ious = [[r["metrics"].get(f"sem_seg/IoU-{c}", float("nan")) for c in classes] for r in rs]
        means = [statistics.mean(col) for col in zip(*ious)]
        lines.append(f"| {METHODS[n].label} | {len(rs)} | " + " | ".join(f"{v:.1f}" for v in means) + " |")
        if len(rs) > 1:
            for c, col in zip(classes, zip(*ious)):
                spread.append((max(col) - min(col), c, n, min(col), max(col)))
    never = [c for i, c in enumerate(classes)
             if all(r["metrics"].get(f"sem_seg/IoU-{c}", 0.0) < 1.0 for _, rs in rows for r in rs)]
    lines.append("")
    if never:
        lines.append(f"Below 1 IoU in every run: {', '.join(never)} ({len(never)} of {len(classes)} classes).")
    if spread:
        per_class = {}
        for rng, c, n, lo, hi in spread:
            per_class.setdefault(c, []).append(rng)
        top = max(spread)
        lines.append(f"Largest seed-to-seed range within one row: {top[1]} in {METHODS[top[2]].label} "
                     f"({top[3]:.1f} to {top[4]:.1f} IoU); median range per class over the rows: "
                     + ", ".join(f"{c} {statistics.median(v):.1f}" for c, v in per_class.items()) + ".")
    return lines + [""]



def hs3_choice(path: str) -> List[str]:
    """The paper's rule in numbers, from the clusters file at ``path``: the reference, and each
    exit's chosen K (and why K = N); [] before the analysis ran."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        data = json.load(f)
    ref = data.get("info", {}).get("reference", {})
    n, m = ref.get("num_classes"), ref.get("mIoU")
    lines = [f"HS3 Phase 1 (analysis split): final output mIoU {m:.1f} over N = {n} classes, so the paper's rule "
             f"keeps the largest K with mIoU_exit(K) / K >= {m:.1f} / {n} = {m / n:.2f} per class."]
    for e, info in data["exits"].items():
        k = info["num_clusters"]
        mi = info.get("analysis_mIoU", float("nan"))  # the clusters file's per-exit record
        why = " (= N: this exit's full-class mIoU already meets the final output's per-class rate)" if k == n else ""
        lines.append(f"- {e}: K = {k}, mIoU {mi:.1f} in its {k}-cluster space ({mi / k:.2f} per class){why}")
    return lines



def describe_clusters(path: str) -> str:
    """Each exit's clusters in a clusters file, on one line."""
    with open(path) as f:
        data = json.load(f)
    parts = []
    for exit_name, info in data["exits"].items():
        groups = " ".join("{" + ", ".join(g) + "}" for g in info["clusters"])
        parts.append(f"{exit_name} (K = {info['num_clusters']}): {groups}")
    return "; ".join(parts)



def per_class_names(metrics: dict) -> List[str]:
    """The class names of a final-output evaluation, in CamVid's class order."""
    from segdistill.data.datasets.camvid import CAMVID_CLASSES

    names = {k[len("sem_seg/IoU-"):] for k in metrics if k.startswith("sem_seg/IoU-")}
    return [c for c in CAMVID_CLASSES if c in names] + sorted(names - set(CAMVID_CLASSES))



def plot(t: TableInputs) -> None:
    """table.png: every block's rows (mean bar, one dot per seed) against its baseline (and the teacher)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = t.results
    fig, axes = plt.subplots(1, len(t.blocks), figsize=(4.4 * len(t.blocks), 4.0), squeeze=False)
    for ax, (b, (title, block)) in zip(axes[0], t.blocks.items()):
        names = [n for n in block if n != "teacher"]
        for i, n in enumerate(names):
            vals = [r["mIoU"] for r in results.get(n, [])]
            if not vals:
                continue
            ax.bar(i, statistics.mean(vals), color="tab:gray" if i == 0 else "tab:blue", alpha=0.6)
            ax.scatter([i] * len(vals), vals, color="black", s=12, zorder=3)
        base = results.get(names[0], [])
        if base:
            ax.axhline(statistics.mean(r["mIoU"] for r in base), color="tab:gray", ls="--", lw=1)
        teacher = results.get("teacher", []) if b == "distill" else []
        if teacher:
            ax.axhline(teacher[0]["mIoU"], color="tab:red", ls=":", lw=1, label="teacher")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([METHODS[n].label.split(" (")[0] for n in names], rotation=45, ha="right", fontsize=8)
        ax.set_title(title.split(" (")[0], fontsize=10)
        ax.set_ylabel("CamVid val mIoU %")
        vals = [r["mIoU"] for n in names for r in results.get(n, [])]
        if vals:
            ax.set_ylim(max(0.0, min(vals) - 5), max(vals) + 3)
    fig.tight_layout()
    fig.savefig(os.path.join(t.out, "table.png"), dpi=120)
    plt.close(fig)



def publish(t: TableInputs, folder: str) -> None:
    """Copy table.md, table.png, summary.json and the HS3 analyses' plots and reports to ``folder``."""
    os.makedirs(folder, exist_ok=True)
    for f in ("table.md", "table.png", "summary.json"):
        shutil.copyfile(os.path.join(t.out, f), os.path.join(folder, f))
    for need, prefix in (("hs3_clusters", "hs3"), ("hs3_manual", "hs3_manual")):
        d = os.path.dirname(t.clusters[need])
        for f in ("tradeoff.png", "report.md", "clusters.json"):
            if os.path.isfile(os.path.join(d, f)):
                shutil.copyfile(os.path.join(d, f), os.path.join(folder, f"{prefix}_{f}"))
