#!/usr/bin/env python
"""The anytime trade-off curve: mIoU against average MACs of trained multi-exit models
(docs/anytime.md). Each ``--model LABEL CONFIG WEIGHTS`` is a training config (ds, sr, or
the plain ``none``; either exit head, ``MODEL.EXITS.HEAD`` sr or rh) and its checkpoint; each
becomes its deployed ``AnytimeSegmentor``.

    python benchmarks/anytime_curve.py --output output/anytime_demo/curve --threads 1 \
        --model DS configs/demo/exits/ds.yaml output/anytime_demo/ds/model_final.pth \
        --model SR configs/demo/exits/sr.yaml output/anytime_demo/sr/model_final.pth \
        --model DS-RH configs/demo/exits/ds_rh.yaml output/anytime_demo/ds_rh/model_final.pth \
        --model plain configs/demo/exits/none.yaml output/anytime_demo/none/model_final.pth \
        --opts DATASETS.TRAIN "('segdistill_demo_train_hs3_reduced',)" HS3_ANALYSIS.FRACTION 0.2

Per model, on the held-out calibration split (default ``<DATASETS.TRAIN[0]>_hs3_analysis``;
an evaluation split is refused) and on the evaluation split (default ``DATASETS.TEST[0]``):

1. every exit and the final head run once per image (``collect_records``: confidences,
   per-image confusion matrices, fvcore MACs of every path's parts), saved as ``.npz``;
2. fixed outputs (``exit:<name>``, ``final``) on the evaluation split;
3. for each ``--drops`` value D, thresholds calibrated on the calibration split (lowest
   average MACs at most D mIoU below the final output there) and their outcome on the
   evaluation split (exact: the policy's answer for an image is one of the recorded outputs);
   the same for each ``--budgets`` value B (best mIoU within B x the final path's MACs);
   risk-controlled thresholds (``--risk-epsilons``: one shared threshold per method, crc and
   ucb, ``segdistill.evaluation.anytime_risk``) and their per-image gap on the evaluation split;
   and, descriptive only, one threshold shared by every exit swept over the evaluation
   split's confidences (``--sweep-points``);
4. timed runs on the evaluation split (one image at a time, ``EVAL_FINAL`` on, so every image's
   policy time sits next to its own final-path time): the operating point (``--operating-drop``,
   default 1) and every fixed output. The operating point's measured mIoU and exit histogram
   must equal step 3's (printed as ``consistent``).

Outputs in ``--output``: ``records_<label>_{calib,eval}.npz``, ``result_<label>.json`` (each
step resumes from them), ``curve.json``, ``curve.md`` (tables) and ``curve.png`` (plot; also
copied to ``--plot`` when given). Times are wall-clock on the machine it runs on: say how
loaded it was.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))

import torch  # noqa: E402

import segdistill  # noqa: E402,F401
from detectron2.utils.logger import setup_logger  # noqa: E402
from segdistill.engine import Trainer  # noqa: E402
from segdistill.engine.anytime import (  # noqa: E402
    anytime_cfg, build_anytime_model, default_calibration_split, evaluate_policy, register_split,
)
from segdistill.evaluation.anytime import ExitRecords, collect_records, fixed_exit_outcome, policy_outcome  # noqa: E402
from segdistill.evaluation.anytime_calibration import calibrate, check_held_out  # noqa: E402
from segdistill.evaluation.anytime_risk import QUALITIES, calibrate_risk, gap_losses  # noqa: E402
from segdistill.modeling.meta_arch.anytime import FINAL  # noqa: E402

logger = logging.getLogger("segdistill.anytime_curve")
DEFAULT_DROPS = "0,0.25,0.5,1,2,4,8"


def _finite(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def _records(model, cfg, name, path):
    if os.path.isfile(path):
        rec = ExitRecords.load(path)
        if rec.dataset == name and rec.exit_names == model.exit_names:
            return rec
    rec = collect_records(model, Trainer.build_test_loader(cfg, name), name)
    rec.save(path)
    return rec


def _timed_run(model, cfg, name):
    """Policy as set on the model, EVAL_FINAL on: the evaluator's numbers."""
    model.eval_final = True
    try:
        res = evaluate_policy(cfg, model, name)
    finally:
        model.eval_final = False
    a = dict(res["anytime"])
    return {k: float(v) for k, v in a.items()}


def run_model(label, config, weights, args, out_dir):
    path = os.path.join(out_dir, f"result_{label}.json")
    result = json.load(open(path)) if os.path.isfile(path) else {}
    cfg = anytime_cfg(config, list(args.opts) + ["MODEL.WEIGHTS", weights])
    calib = register_split(cfg, args.calib_dataset) if args.calib_dataset else default_calibration_split(cfg)
    evaluation = register_split(cfg, args.eval_dataset) if args.eval_dataset else cfg.DATASETS.TEST[0]
    check_held_out(calib, [evaluation] + list(cfg.DATASETS.TEST))
    model = build_anytime_model(cfg)
    result.update(label=label, config=config, weights=weights, calib_dataset=calib, eval_dataset=evaluation,
                  exits=model.exit_names, confidence=model.confidence)

    def save():
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    rec_c = _records(model, cfg, calib, os.path.join(out_dir, f"records_{label}_calib.npz"))
    rec_e = _records(model, cfg, evaluation, os.path.join(out_dir, f"records_{label}_eval.npz"))
    result["images"] = {"calib": rec_c.num_images, "eval": rec_e.num_images}
    result["fixed"] = {}
    for out in model.exit_names + [FINAL]:
        o, oc = fixed_exit_outcome(rec_e, out), fixed_exit_outcome(rec_c, out)
        result["fixed"][out] = {"mIoU": o.miou, "GMACs": o.avg_macs / 1e9, "mIoU_calib": oc.miou}
    final = result["fixed"][FINAL]
    if model.exit_names:
        best = max(model.exit_names, key=lambda n: result["fixed"][n]["mIoU"])
        result["premise"] = {"final_minus_best_exit_mIoU": final["mIoU"] - result["fixed"][best]["mIoU"],
                             "best_exit": best, "final_is_strongest": final["mIoU"] > result["fixed"][best]["mIoU"]}
        result["curve"] = []
        for drop in args.drops:
            cal = calibrate(rec_c, max_drop=drop, candidates=args.candidates)
            o = policy_outcome(rec_e, cal.thresholds)
            result["curve"].append({
                "max_drop": drop, "thresholds": {k: _finite(v) for k, v in cal.thresholds.items()},
                "calib_mIoU": cal.outcome.miou, "calib_final_mIoU": cal.final.miou,
                "mIoU": o.miou, "GMACs": o.avg_macs / 1e9, "drop": final["mIoU"] - o.miou,
                "MACs_saved_pct": 100.0 * (1 - o.avg_macs / (final["GMACs"] * 1e9)), "answered": o.histogram(),
            })
        result["budget_curve"] = []  # the other objective: the best mIoU within a MACs budget
        for budget in args.budgets:
            cal = calibrate(rec_c, budget=budget, candidates=args.candidates)
            o = policy_outcome(rec_e, cal.thresholds)
            result["budget_curve"].append({
                "budget": budget, "feasible": cal.feasible,
                "thresholds": {k: _finite(v) for k, v in cal.thresholds.items()}, "calib_mIoU": cal.outcome.miou,
                "mIoU": o.miou, "GMACs": o.avg_macs / 1e9, "drop": final["mIoU"] - o.miou,
                "MACs_saved_pct": 100.0 * (1 - o.avg_macs / (final["GMACs"] * 1e9)), "answered": o.histogram(),
            })
        # risk control (Fast yet Safe): one shared threshold with a guarantee on the per-image gap
        result["risk"] = []
        for method in ("crc", "ucb"):
            for eps in args.risk_epsilons:
                cal = calibrate_risk(rec_c, epsilon=eps, method=method, delta=args.risk_delta, quality=args.risk_quality)
                o = policy_outcome(rec_e, cal.thresholds)
                lam = cal.details["threshold"]
                val_risk = gap_losses(rec_e, np.array([math.inf if lam is None else lam]), args.risk_quality)[0]
                result["risk"].append({
                    "method": method, "epsilon": eps, "delta": args.risk_delta if method == "ucb" else None,
                    "quality": args.risk_quality, "feasible": cal.feasible, "threshold": lam,
                    "reason": cal.details.get("reason", ""), "calib_risk": cal.details["empirical_risk"],
                    "val_risk": float(val_risk.mean()), "mIoU": o.miou, "GMACs": o.avg_macs / 1e9,
                    "drop": final["mIoU"] - o.miou, "answered": o.histogram(),
                    "MACs_saved_pct": 100.0 * (1 - o.avg_macs / (final["GMACs"] * 1e9)),
                })
        # descriptive, no calibration: one threshold for every exit, swept over the evaluation
        # split's own confidences (where the trade-off bends; the calibrated points sit on it or near it)
        values = np.unique(rec_e.confidences)
        sweep = np.unique(np.quantile(values, np.linspace(0, 1, args.sweep_points), method="nearest"))
        result["sweep"] = []
        for t in list(sweep) + [math.inf]:
            o = policy_outcome(rec_e, {n: t for n in model.exit_names})
            result["sweep"].append({"threshold": _finite(float(t)), "mIoU": o.miou, "GMACs": o.avg_macs / 1e9,
                                    "answered": o.histogram()})
    save()
    if args.no_timing:
        return result
    timed = result.setdefault("timed", {})
    runs = [(f"exit:{n}", None) for n in model.exit_names] + [(FINAL, None)]
    if model.exit_names:
        op = min(result["curve"], key=lambda c: abs(c["max_drop"] - args.operating_drop))
        runs.insert(0, ("confidence", op))
    for policy, point in runs:
        if policy in timed:
            continue
        if point is not None:
            model.set_thresholds({k: (2.0 if v is None else v) for k, v in point["thresholds"].items()})
        model.policy = policy
        logger.info("%s: timed run of policy %s on %s", label, policy, evaluation)
        t = _timed_run(model, cfg, evaluation)
        t["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        if point is not None:
            hist = {k: round(t[f"answered_{k}_pct"] * t["images"] / 100) for k in point["answered"]}
            t["max_drop"] = point["max_drop"]
            t["consistent"] = bool(abs(t["mIoU"] - point["mIoU"]) < 1e-6 and hist == point["answered"])
        timed[policy] = t
        save()
    model.policy = FINAL
    if len(timed) > 2:  # does the measured time fall with the MACs? (paired ratios: robust to load drift)
        pols = sorted(timed, key=lambda k: timed[k]["GMACs"])
        macs = np.array([timed[k]["GMACs"] / timed[k]["GMACs_final"] for k in pols])
        ratio = np.array([timed[k]["time_ms"] / timed[k]["time_ms_final"] for k in pols])
        result["time_vs_macs"] = {
            "policies": pols, "macs_ratio": macs.tolist(), "time_ratio": ratio.tolist(),
            "spearman": _spearman(macs, ratio),
            # over every pair of policies whose MACs differ by more than 5 %: the costlier one is slower
            "time_monotone_in_macs": bool(all(ratio[j] > ratio[i] for i in range(len(pols)) for j in range(i + 1, len(pols))
                                              if macs[j] > 1.05 * macs[i])),
        }
        save()
    return result


def _spearman(a, b) -> float:
    """Spearman's rank correlation (no ties expected: distinct paths have distinct MACs)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def write_table(results, args, out_dir, machine):
    lines = [f"Machine: {machine}", ""]
    for r in results:
        fin = r["fixed"][FINAL]
        lines += [f"### {r['label']} ({r['config']})", "",
                  f"Evaluated on {r['eval_dataset']} ({r['images']['eval']} images); thresholds calibrated on "
                  f"{r['calib_dataset']} ({r['images']['calib']} images), confidence {r['confidence']}.", ""]
        if "premise" in r:
            p = r["premise"]
            lines += [f"Premise (final head stronger than every exit): {'holds' if p['final_is_strongest'] else 'FAILS'}"
                      f" (final - best exit {p['best_exit']} = {p['final_minus_best_exit_mIoU']:+.2f} mIoU).", ""]
        timed = r.get("timed", {})
        lines += ["| output | mIoU | GMACs | MACs / final | ms / image | time / final (paired) |", "|---|---|---|---|---|---|"]
        for out, f in r["fixed"].items():
            t = timed.get(FINAL if out == FINAL else f"exit:{out}")
            tt = f"{t['time_ms']:.1f} | {t['time_ms'] / t['time_ms_final']:.2f}x" if t else "- | -"
            lines.append(f"| {out} | {f['mIoU']:.2f} | {f['GMACs']:.3f} | {f['GMACs'] / fin['GMACs']:.2f}x | {tt} |")
        if "curve" in r:
            lines += ["", "Confidence policy, thresholds calibrated for at most D mIoU below the final output on the "
                      "calibration split:", "",
                      "| D | thresholds | calib mIoU (final) | val mIoU | val drop | GMACs | MACs saved | answered |",
                      "|---|---|---|---|---|---|---|---|"]
            for c in r["curve"]:
                th = ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in c["thresholds"].items())
                ans = ", ".join(f"{k} {v}" for k, v in c["answered"].items())
                lines.append(f"| {c['max_drop']:g} | {th} | {c['calib_mIoU']:.2f} ({c['calib_final_mIoU']:.2f}) | "
                             f"{c['mIoU']:.2f} | {c['drop']:+.2f} | {c['GMACs']:.3f} | {c['MACs_saved_pct']:.1f}% | {ans} |")
            lines += ["", "Confidence policy, thresholds calibrated for the best mIoU within B x the final path's "
                      "average MACs on the calibration split:", "",
                      "| B | thresholds | calib mIoU | val mIoU | val drop | GMACs | MACs saved | answered |",
                      "|---|---|---|---|---|---|---|---|"]
            for c in r.get("budget_curve", []):
                th = ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in c["thresholds"].items())
                ans = ", ".join(f"{k} {v}" for k, v in c["answered"].items())
                lines.append(f"| {c['budget']:g}{'' if c['feasible'] else ' (infeasible)'} | {th} | "
                             f"{c['calib_mIoU']:.2f} | {c['mIoU']:.2f} | {c['drop']:+.2f} | {c['GMACs']:.3f} | "
                             f"{c['MACs_saved_pct']:.1f}% | {ans} |")
            if r.get("risk"):
                lines += ["", f"Risk control (one shared threshold; per-image {r['risk'][0]['quality']} gap to the final "
                          "output at most epsilon: in expectation for crc, with probability 1 - delta for ucb):", "",
                          "| method | epsilon | threshold | calib risk | val risk | val mIoU | val drop | MACs saved | answered |",
                          "|---|---|---|---|---|---|---|---|---|"]
                for c in r["risk"]:
                    m = c["method"] + (f" (delta {c['delta']:g})" if c["delta"] is not None else "")
                    th = ("never" if c["threshold"] is None else f"{c['threshold']:.3f}") + (
                        "" if c["feasible"] else " (cannot certify: " + c["reason"].split(": ")[-1] + ")")
                    ans = ", ".join(f"{k} {v}" for k, v in c["answered"].items())
                    lines.append(f"| {m} | {c['epsilon']:g} | {th} | {c['calib_risk']:.4f} | {c['val_risk']:.4f} | "
                                 f"{c['mIoU']:.2f} | {c['drop']:+.2f} | {c['MACs_saved_pct']:.1f}% | {ans} |")
            lines += ["", "One threshold for every exit, swept on the evaluation split (descriptive, not calibrated):",
                      "", "| threshold | val mIoU | GMACs | answered |", "|---|---|---|---|"]
            sweep = r["sweep"]
            for c in sweep[:: max(1, len(sweep) // 8)] + ([sweep[-1]] if (len(sweep) - 1) % max(1, len(sweep) // 8) else []):
                ans = ", ".join(f"{k} {v}" for k, v in c["answered"].items())
                th = "never" if c["threshold"] is None else f"{c['threshold']:.3f}"
                lines.append(f"| {th} | {c['mIoU']:.2f} | {c['GMACs']:.3f} | {ans} |")
            tv = r.get("time_vs_macs")
            if tv:
                pairs = ", ".join(f"{p} {m:.2f}x / {q:.2f}x" for p, m, q in
                                  zip(tv["policies"], tv["macs_ratio"], tv["time_ratio"]))
                lines += ["", f"Measured time against MACs (timed policies, MACs / final and paired time / final): "
                          f"{pairs}; Spearman {tv['spearman']:+.2f}; of two policies more than 5% apart in MACs the costlier is slower: "
                          f"{tv['time_monotone_in_macs']}."]
            t = timed.get("confidence")
            if t:
                lines += ["", f"Operating point D = {t['max_drop']:g}, measured: mIoU {t['mIoU']:.2f} (final "
                          f"{t['mIoU_final']:.2f}), {t['GMACs']:.3f} GMACs ({t['MACs_saved_pct']:.1f}% saved), "
                          f"{t['time_ms']:.1f} ms / image vs {t['time_ms_final']:.1f} ms for the final path "
                          f"({100 * (1 - t['time_ms'] / t['time_ms_final']):.1f}% saved); matches the records: "
                          f"{t['consistent']}."]
        lines.append("")
    text = "\n".join(lines)
    with open(os.path.join(out_dir, "curve.md"), "w") as f:
        f.write(text)
    return text


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 6.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(results):
        col = colors[i % len(colors)]
        fixed = r["fixed"]
        if "curve" not in r:  # the plain model: its single exit
            f = fixed[FINAL]
            ax.plot([f["GMACs"]], [f["mIoU"]], "*", ms=16, color=col, label=f"{r['label']}: final (single exit)")
        else:
            xs = [fixed[n]["GMACs"] for n in fixed]
            ys = [fixed[n]["mIoU"] for n in fixed]
            ax.plot(xs, ys, "s:", color=col, alpha=0.7, label=f"{r['label']}: fixed exits")
            for n, x, y in zip(fixed, xs, ys):
                ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8, color=col)
            sw = sorted((c["GMACs"], c["mIoU"]) for c in r["sweep"])
            ax.plot(*zip(*sw), "-", lw=1, alpha=0.5, color=col, label=f"{r['label']}: one threshold, swept on val")
            pts = sorted((c["GMACs"], c["mIoU"]) for c in r["curve"])
            drops = ", ".join(f"{c['max_drop']:g}" for c in r["curve"])
            ax.plot(*zip(*pts), "o-", color=col, label=f"{r['label']}: confidence, calibrated for a max drop D = {drops}")
            if r.get("budget_curve"):
                bp = sorted((c["GMACs"], c["mIoU"]) for c in r["budget_curve"])
                budgets = ", ".join(f"{c['budget']:g}" for c in r["budget_curve"])
                ax.plot(*zip(*bp), "^--", color=col, alpha=0.8,
                        label=f"{r['label']}: confidence, calibrated for a MACs budget B = {budgets}")
            t = r.get("timed", {}).get("confidence")
            if t:
                ax.plot([t["GMACs"]], [t["mIoU"]], "D", ms=11, mfc="none", mew=2, color=col,
                        label=f"{r['label']}: operating point (D = {t['max_drop']:g}), timed")
            ax.axhline(fixed[FINAL]["mIoU"] - 1.0, color=col, lw=0.6, ls="--", alpha=0.5)
        timed = r.get("timed", {})
        if timed:
            pts = sorted((t["GMACs"], t["time_ms"]) for t in timed.values())
            ax2.plot(*zip(*pts), "o-", color=col, label=r["label"])
    ax.set(xlabel="average GMACs per image (fvcore)", ylabel="val mIoU (%)",
           title="Anytime trade-off (dashed: 1 mIoU below each model's final output)")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=2)
    ax.grid(alpha=0.3)
    ax2.set(xlabel="average GMACs per image", ylabel="measured ms / image",
            title="Measured time follows the MACs (every timed policy)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs=3, action="append", required=True, metavar=("LABEL", "CONFIG", "WEIGHTS"))
    p.add_argument("--output", required=True, help="folder for records, results, tables and the plot")
    p.add_argument("--calib-dataset", default="", help="default: <DATASETS.TRAIN[0]>_hs3_analysis")
    p.add_argument("--eval-dataset", default="", help="default: DATASETS.TEST[0]")
    p.add_argument("--drops", default=DEFAULT_DROPS, help="max mIoU drops (on the calibration split) of the curve")
    p.add_argument("--budgets", default="0.1,0.15,0.2,0.3,0.5",
                   help="MACs budgets (fractions of the final path's) of the best-mIoU curve")
    p.add_argument("--operating-drop", type=float, default=1.0, help="the curve point that is timed")
    p.add_argument("--candidates", type=int, default=16, help="threshold candidates per exit")
    p.add_argument("--sweep-points", type=int, default=25, help="points of the shared-threshold sweep")
    p.add_argument("--risk-epsilons", default="0.02,0.05,0.1",
                   help="risk control: per-image gaps allowed (crc and ucb rows; empty: none)")
    p.add_argument("--risk-delta", type=float, default=0.1, help="risk control (ucb): failure probability")
    p.add_argument("--risk-quality", choices=list(QUALITIES), default="miou")
    p.add_argument("--plot", default="", help="also copy the plot here (e.g. docs/images/anytime_demo.png)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--no-timing", action="store_true", help="skip the timed runs (step 4)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides for every model")
    args = p.parse_args(argv)
    args.drops = [float(v) for v in args.drops.split(",") if v.strip()]
    args.budgets = [float(v) for v in args.budgets.split(",") if v.strip()]
    args.risk_epsilons = [float(v) for v in args.risk_epsilons.split(",") if v.strip()]
    setup_logger(name="segdistill")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.output, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    start = time.time()
    results = [run_model(label, config, weights, args, args.output) for label, config, weights in args.model]
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average {load:.1f} at the start "
               f"and {load_end:.1f} at the end, {time.time() - start:.0f} s")
    with open(os.path.join(args.output, "curve.json"), "w") as f:
        json.dump({"machine": machine, "results": results}, f, indent=1)
    print(write_table(results, args, args.output, machine))
    png = plot(results, os.path.join(args.output, "curve.png"))
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        shutil.copyfile(png, args.plot)
    print(png)
    return results


if __name__ == "__main__":
    main()
