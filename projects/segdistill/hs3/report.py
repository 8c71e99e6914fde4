"""HS3 Phase-1 outputs a person can read, and the run that writes them (tools/hs3_analyze.py).

From a folder of the evaluator's confusion files, :func:`run_hs3_analysis` writes to its
output folder:

* ``curves.json``  every stage's trade-off curve (K, mIoU, clustering per K): the costly part;
* ``clusters.json`` the clusters file (MODEL.EXITS.HS3.CLUSTERS_FILE) with class names per cluster;
* ``tradeoff.png``  the curves, the reference point, the trade-off line and the chosen
  points (as the paper's Figure 2);
* ``report.md``     the choice per exit, the clusters and the curves as tables.

Each step records a fingerprint of its inputs (source files' contents and options) in
``hs3_state.json`` and is skipped when its output exists with the same fingerprint, so a
pipeline that is killed and restarted resumes; ``force=True`` redoes everything.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from .analysis import (
    StageConfusion, TradeoffCurve, clustered_miou, kmeans_clusters, load_confusions, parse_k_grid,
    spectral_clusters, tradeoff_curve,
)
from .choose import (
    choose_ks, clusters_from_assignments, constant_ratio_ks, line_side, manual_assignment, reference_theta,
    theta_line,
)
from ..modeling.exits.hs3_clusters import (
    HS3Clusters, cluster_names_of, dumps_readable, file_sha256, load_clusters, save_clusters,
)

__all__ = ["plot_tradeoff", "write_report", "run_hs3_analysis", "k_equals_n_warning", "METHODS"]

logger = logging.getLogger(__name__)
METHODS = ("spectral", "kmeans", "manual")
STATE_FILE = "hs3_state.json"


# ----------------------------------------------------------------------------- plot


def plot_tradeoff(curves: Mapping[str, TradeoffCurve], num_classes: int, final_miou: float,
                  chosen: Mapping[str, int], theta: Optional[float], out_path: str,
                  chosen_mious: Optional[Mapping[str, float]] = None) -> str:
    """Every stage's mIoU vs number of classes, the final output's reference point, the
    trade-off line at ``theta`` and each exit's chosen point (the paper's Figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    exits = [s for s in curves if s != "final"]
    if "final" in curves:
        c = curves["final"]
        ax.plot(c.ks, c.mious, ls="--", color="0.6", lw=1, marker=".", label="final output (clustered)")
    for i, s in enumerate(exits):
        c = curves[s]
        col = colors[(i + 1) % len(colors)]
        ax.plot(c.ks, c.mious, color=col, lw=1.2, marker=".", label=f"exit {s}")
        if s in chosen:
            k = chosen[s]
            m = (chosen_mious or {}).get(s, c.miou(k) if k in c.ks else float("nan"))
            ax.plot([k], [m], "o", ms=10, color=col, mec="k", zorder=5)
            ax.annotate(f"K={k}", (k, m), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.plot([num_classes], [final_miou], "o", ms=11, color=colors[0], mec="k", zorder=6, label="final output (reference)")
    (x0, y0), (x1, y1) = theta_line(num_classes, final_miou, theta)
    th = reference_theta(final_miou) if theta is None else float(theta)
    rule = "through the origin" if theta is None else "set"
    ax.plot([x0, x1], [y0, y1], "k--", lw=1, label=f"trade-off line, theta={th:.1f} deg ({rule})")
    ax.set(xlim=(0, num_classes + 1), ylim=(0, 100), xlabel="number of classes after clustering", ylabel="mIoU (%)",
           title="HS3 performance-complexity trade-off (analysis set)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


# ----------------------------------------------------------------------------- text report


def k_equals_n_warning(clusters: HS3Clusters) -> str:
    """A warning when every exit keeps all N classes (K = N): HS3 is then deep supervision
    (the trade-off rule found no clustering worth its loss of classes), else ""."""
    n = clusters.num_classes
    if clusters.exits and all(clusters.num_clusters(e) == n for e in clusters.exits):
        return (f"every exit keeps all {n} classes (K = N for {list(clusters.exits)}): HS3 with these clusters is "
                "deep supervision. The trade-off rule takes the largest K on or above its line, and that was N here; "
                "a larger theta (HS3_ANALYSIS.THETA, which favours accuracy) or the manual method gives fewer "
                "clusters (docs/hs3.md).")
    return ""


def write_report(out_path: str, clusters: HS3Clusters, curves: Mapping[str, TradeoffCurve], final_miou: float,
                 source_dir: str = "") -> str:
    """A short markdown report: the rule, the choice per exit, the clusters, the curves."""
    n = clusters.num_classes
    theta = clusters.theta
    th = reference_theta(final_miou) if theta is None else float(theta)
    lines = [
        "# HS3 Phase-1 analysis",
        "",
        f"- confusion matrices: `{source_dir}`" if source_dir else "",
        f"- classes: {n}; method: {clusters.method}; seed: {clusters.seed}",
        f"- reference (final output): mIoU {final_miou:.2f} with {n} classes, ratio {final_miou / n:.3f} mIoU/class",
        f"- trade-off line: theta = {th:.1f} deg" + (" (the paper's line through the origin)" if theta is None else " (set)"),
        "- rule: each exit takes the largest K whose (K, mIoU) lies on or above the line (docs/hs3.md)",
        "",
        "| exit | mIoU (all classes) | K | mIoU at K | mIoU/K |",
        "|---|---|---|---|---|",
    ]
    for name, e in clusters.exits.items():
        full = curves[name].miou(n) if name in curves and n in curves[name].ks else float("nan")
        m = e.extra.get("analysis_mIoU", float("nan"))
        lines.append(f"| {name} | {full:.2f} | {e.num_clusters} | {m:.2f} | {m / e.num_clusters:.3f} |")
    lines.append("")
    warning = k_equals_n_warning(clusters)
    if warning:
        lines += [f"**Warning**: {warning}", ""]
    for name in clusters.exits:
        lines.append(f"## {name}: {clusters.num_clusters(name)} clusters")
        lines.append("")
        for i, g in enumerate(clusters.groups(name)):
            lines.append(f"{i}. {', '.join(g)}")
        lines.append("")
    if curves:
        stages = list(curves)
        ks = sorted({k for c in curves.values() for k in c.ks})
        lines += ["## Trade-off curves (mIoU %)", "", "| K | " + " | ".join(stages) + " |",
                  "|---|" + "---|" * len(stages)]
        for k in ks:
            row = [f"{curves[s].miou(k):.2f}" if k in curves[s].ks else "" for s in stages]
            lines.append(f"| {k} | " + " | ".join(row) + " |")
        lines.append("")
    text = "\n".join(line for line in lines if line is not None) + "\n"
    with open(out_path, "w") as f:
        f.write(text)
    return out_path


# ----------------------------------------------------------------------------- the run


def _sha1_file(path: str) -> str:
    return file_sha256(path, "sha1")  # SHA-1, as the fingerprints of existing hs3_state.json files


def _fingerprint(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _exit_order(stages: Mapping[str, StageConfusion], exits: Optional[Sequence[str]]) -> List[str]:
    """Exits shallow to deep: as given, else by their mIoU on the full class set (weakest
    first: a shallower exit is weaker), ties by name."""
    have = [s for s in stages if s != "final"]
    if exits:
        missing = [e for e in exits if e not in have]
        if missing:
            raise ValueError(f"Exits {missing} have no confusion file (exits found: {have}).")
        return list(exits)
    full = {s: clustered_miou(stages[s].conf, np.arange(len(stages[s].conf))) for s in have}
    return sorted(have, key=lambda s: (full[s], s))


def _write_json(path: str, data) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(dumps_readable(data) + "\n")
    os.replace(tmp, path)


def run_hs3_analysis(
    confusion_dir: str,
    output_dir: Optional[str] = None,
    *,
    method: str = "spectral",
    theta: Optional[float] = None,
    k_grid: str = "",
    seed: int = 0,
    normalize: str = "row",
    exits: Optional[Sequence[str]] = None,
    features_dir: Optional[str] = None,
    ratio: float = 0.5,
    groups: Optional[Mapping[str, Sequence[Sequence[str]]]] = None,
    force: bool = False,
) -> Dict[str, str]:
    """Phase 1 from confusion files to the clusters file, plot and report (module doc).

    ``method``: "spectral" (paper 3.1) or "kmeans" (per-class features
    ``features_dir/features_<exit>.npy`` [N, D]; 3.1.3) choose K_i by the trade-off
    line at ``theta``; "manual" gives each exit ``ratio`` times the classes of the next
    stage, grouped as ``groups[exit]`` (lists of class names) or, when not given, by
    spectral clustering of that exit's confusion. Returns the paths written or kept.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    output_dir = output_dir or os.path.join(confusion_dir, "hs3")
    os.makedirs(output_dir, exist_ok=True)
    paths = {k: os.path.join(output_dir, f) for k, f in
             (("curves", "curves.json"), ("clusters", "clusters.json"), ("plot", "tradeoff.png"), ("report", "report.md"))}
    state_path = os.path.join(output_dir, STATE_FILE)
    state = {}
    if os.path.isfile(state_path) and not force:
        with open(state_path) as f:
            state = json.load(f)

    def fresh(step: str, fp: str) -> bool:
        if not force and os.path.isfile(paths[step]) and state.get(step) == fp:
            logger.info("HS3: %s is up to date (same inputs), skipped; --force redoes it.", paths[step])
            return True
        return False

    def done(step: str, fp: str) -> None:
        state[step] = fp
        _write_json(state_path, state)
        logger.info("HS3: wrote %s", paths[step])

    t0 = time.perf_counter()
    stages = load_confusions(confusion_dir)
    final = stages["final"]
    names = final.class_names
    n = len(names)
    order = _exit_order(stages, exits)
    if not order:
        raise ValueError(f"No exit confusion file (confusion_sem_seg_<exit>.npy) in {confusion_dir!r}: nothing to cluster.")
    final_miou = clustered_miou(final.conf, np.arange(n))
    ks = parse_k_grid(k_grid, n)
    logger.info("HS3: %d classes, final output mIoU %.2f, exits %s, %d K values, method %s",
                n, final_miou, order, len(ks), method)

    features: Dict[str, str] = {}
    if method == "kmeans":
        if not features_dir:
            raise ValueError("method 'kmeans' needs per-class features: features_dir/features_<exit>.npy, [num_classes, D].")
        for s in ["final"] + order:
            p = os.path.join(features_dir, f"features_{s}.npy")
            if os.path.isfile(p):
                features[s] = p
            elif s != "final":
                raise FileNotFoundError(f"method 'kmeans': no per-class features for exit {s!r} ({p!r} missing).")
    sources = {s: os.path.abspath(stages[s].path) for s in ["final"] + order}
    inputs = {
        "sources": {s: _sha1_file(p) for s, p in sources.items()},
        "features": {s: _sha1_file(p) for s, p in features.items()},
        "method": "kmeans" if method == "kmeans" else "spectral", "ks": ks, "seed": seed, "normalize": normalize,
        "stages": ["final"] + order,
    }
    fp_curves = _fingerprint(inputs)

    # 1. trade-off curves (the costly part)
    curves: Dict[str, TradeoffCurve] = {}
    if fresh("curves", fp_curves):
        with open(paths["curves"]) as f:
            data = json.load(f)
        curves = {s: TradeoffCurve.from_dict(s, d) for s, d in data["stages"].items()}
    else:
        for s in ["final"] + order:
            conf = stages[s].conf
            if method == "kmeans":
                if s not in features:
                    continue
                feats = np.load(features[s])
                if len(feats) != n:
                    raise ValueError(f"{features[s]!r}: {len(feats)} rows but {n} classes.")
                fn = (lambda f: (lambda k: kmeans_clusters(f, k, seed)))(feats)
            else:
                fn = None
            logger.info("HS3: trade-off curve of %s (%d K values)...", s, len(ks))
            curves[s] = tradeoff_curve(conf, ks, fn, stage=s, seed=seed, normalize=normalize,
                                       log_every=max(1, len(ks) // 4))
        _write_json(paths["curves"], {
            "class_names": names, "final_mIoU": final_miou, "params": {k: v for k, v in inputs.items() if k != "sources"},
            "sources": sources, "stages": {s: c.to_dict() for s, c in curves.items()},
        })
        done("curves", fp_curves)

    # 2. the choice and the clusters file
    choice_inputs = {"curves": fp_curves, "method": method, "theta": theta, "ratio": ratio, "groups": groups, "exits": order}
    fp_choice = _fingerprint(choice_inputs)
    if fresh("clusters", fp_choice):
        clusters = load_clusters(paths["clusters"], names, order)
    else:
        if method == "manual":
            chosen = constant_ratio_ks(order, n, ratio)
            assignments = {}
            for s in order:
                if groups and s in groups:
                    a = manual_assignment(groups[s], names, f"manual groups of exit {s!r}")
                    chosen[s] = int(a.max()) + 1
                elif chosen[s] in curves[s].ks:
                    a = curves[s].assignment(chosen[s])
                else:
                    a = spectral_clusters(stages[s].conf, chosen[s], seed=seed, normalize=normalize)
                assignments[s] = a
        else:
            chosen = choose_ks({s: curves[s] for s in order}, n, final_miou, theta)
            assignments = {s: curves[s].assignment(k) for s, k in chosen.items()}
        extra = {}
        for s, a in assignments.items():
            m = clustered_miou(stages[s].conf, a)
            extra[s] = {"analysis_mIoU": round(m, 4), "source": sources[s],
                        "on_or_above_line": bool(line_side(len(set(a.tolist())), m, n, final_miou, theta) <= 1e-9)}
        info = {
            "reference": {"num_classes": n, "mIoU": round(final_miou, 4), "theta_ref_deg": round(reference_theta(final_miou), 3)},
            "theta_used_deg": round(reference_theta(final_miou) if theta is None else float(theta), 3),
            "rule": "largest K whose (K, mIoU) is on or above the trade-off line" if method != "manual"
                    else f"constant ratio {ratio} of the next stage's classes",
            "k_grid": ks, "normalize": normalize, "exit_order": order,
        }
        if method == "manual":
            info["ratio"] = ratio
        clusters = clusters_from_assignments(names, {s: assignments[s] for s in order}, method=method, theta=theta,
                                             seed=seed, sources=sources, info=info, extra=extra)
        save_clusters(paths["clusters"], clusters)
        for s in order:
            logger.info("HS3: exit %s -> K=%d: %s", s, clusters.num_clusters(s), cluster_names_of(clusters.groups(s)))
        done("clusters", fp_choice)

    warning = k_equals_n_warning(clusters)
    if warning:
        logger.warning("HS3: %s", warning)
    # 3. the plot and 4. the report
    chosen = {s: clusters.num_clusters(s) for s in clusters.exits}
    chosen_mious = {s: float(clusters[s].extra.get("analysis_mIoU", float("nan"))) for s in clusters.exits}
    if not fresh("plot", fp_choice):
        plot_tradeoff(curves, n, final_miou, chosen, theta, paths["plot"], chosen_mious)
        done("plot", fp_choice)
    if not fresh("report", fp_choice):
        write_report(paths["report"], clusters, curves, final_miou, os.path.abspath(confusion_dir))
        done("report", fp_choice)
    logger.info("HS3: analysis done in %.1f s: %s", time.perf_counter() - t0, output_dir)
    return paths
