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

5. with ``--pixel``, the per-pixel policy (``result["pixel"]``; docs/anytime.md, "Measuring the
   per-pixel policy"): ``collect_pixel_records`` on both splits over ``--pixel-grid`` (ADP-C's
   0.998 added), run in ``--pixel-mode``; rows calibrated for each ``--drops`` and ``--budgets``
   value, ADP-C's fixed 0.998, crc and ucb for each ``--risk-epsilons`` value (with the gap
   measured on the evaluation split) and every recorded setting, each with mIoU, counted GMACs,
   the frozen share before each stage and its difference to the image-level policy at the same
   D (MACs saved, points) and at equal MACs (mIoU); then timed runs paired with the final path
   (the operating point in each ``--pixel-timed-modes`` mode, ADP-C's 0.998 and "nothing
   frozen" in sparse) and the stage-by-stage sparse / emulate / dense times with every pixel active.

``--seeds-summary FOLDER ...`` runs no model: it reads the ``result_<label>.json`` of several
``--output`` folders (one per seed) and writes ``seeds_summary.json`` / ``.md`` in ``--output``:
every numeric entry's mean over the seeds with its 95 % Student-t interval, and the per-pixel
acceptance readings on those means.

Outputs in ``--output``: ``records_<label>_{calib,eval}.npz`` (with ``--pixel`` also
``records_<label>_pixel_<mode>_{calib,eval}.npz``), ``result_<label>.json`` (each step resumes
from them: records are reused, timed runs are not repeated), ``curve.json``, ``curve.md``
(tables) and ``curve.png`` (plot; also copied to ``--plot`` when given). Times are wall-clock
on the machine it runs on (``--threads``, default 1): say how loaded it was.
"""
from __future__ import annotations

import argparse
import functools
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
from segdistill.engine.mixed_precision import inference_precision  # noqa: E402
from segdistill.evaluation.anytime import ExitRecords, collect_records, fixed_exit_outcome, policy_outcome  # noqa: E402
from segdistill.evaluation.anytime_calibration import calibrate, check_held_out  # noqa: E402
from segdistill.evaluation.anytime_pixel import (  # noqa: E402
    DEFAULT_PIXEL_GRID, MAX_CANDIDATES, PixelRecords, collect_pixel_records, pixel_candidates,
)
from segdistill.evaluation.anytime_risk import QUALITIES, calibrate_risk, gap_losses  # noqa: E402
from segdistill.modeling.masked import MODES, MaskedStage, PixelMask  # noqa: E402
from segdistill.modeling.meta_arch.anytime import FINAL, PIXEL  # noqa: E402

logger = logging.getLogger("segdistill.anytime_curve")
DEFAULT_DROPS = "0,0.25,0.5,1,2,4,8"
#: ADP-C's fixed per-pixel threshold (``liuzhuang13/anytime``), one row of every per-pixel grid.
ADPC_THRESHOLD = 0.998


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
    pixel = args.pixel and bool(model.exit_names)
    if pixel:
        run_pixel(model, cfg, calib, evaluation, result, args, out_dir, label)
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
    if pixel:
        _time_pixel(model, cfg, evaluation, result, args, save)
    return result


def _spearman(a, b) -> float:
    """Spearman's rank correlation (no ties expected: distinct paths have distinct MACs)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


# ----------------------------------------------------------------------------- the per-pixel policy (--pixel)
def pixel_grid(values) -> list:
    """The shared thresholds per-pixel records run: the given ones, ADP-C's fixed 0.998 added when
    missing (its row is reported), at most ``MAX_CANDIDATES`` (each is a pass over each split)."""
    grid = list(dict.fromkeys(float(v) for v in values))
    if ADPC_THRESHOLD not in grid:
        grid.append(ADPC_THRESHOLD)
    if len(grid) > MAX_CANDIDATES:
        raise ValueError(f"--pixel-grid: {len(grid)} thresholds (ADP-C's {ADPC_THRESHOLD} included), each a pass over "
                         f"both splits; give at most {MAX_CANDIDATES}.")
    return grid


def _pixel_records(model, cfg, name, path, grid, mode):
    """Per-pixel records of split ``name`` (every setting of ``grid`` run in masked ``mode``),
    reused from ``path`` when it holds this split's records of the same exits and settings."""
    want = pixel_candidates(grid, model.exit_names)
    if os.path.isfile(path):
        rec = PixelRecords.load(path)
        if rec.dataset == name and rec.exit_names == model.exit_names and np.array_equal(rec.thresholds, want):
            return rec
    saved = model.pixel_mode
    model.pixel_mode = mode
    try:
        with inference_precision(cfg.TEST.PRECISION, cfg.MODEL.DEVICE):
            rec = collect_pixel_records(model, Trainer.build_test_loader(cfg, name), name, candidates=grid)
    finally:
        model.pixel_mode = saved
    rec.save(path)
    return rec


def _row_array(exit_names, thresholds) -> np.ndarray:
    """A thresholds dict (None or above 1 = never) as a row of the records (``inf`` = never)."""
    return np.array([math.inf if thresholds[n] is None or thresholds[n] > 1.0 else thresholds[n] for n in exit_names])


def image_front(result) -> list:
    """The image-level policy's calibrated operating points on the evaluation split (every
    ``--drops`` and ``--budgets`` point and the final output) reduced to their Pareto front:
    ``[GMACs, mIoU]`` pairs with GMACs rising and mIoU strictly rising."""
    fin = result["fixed"][FINAL]
    pts = {(c["GMACs"], c["mIoU"]) for c in result.get("curve", []) + result.get("budget_curve", [])}
    pts.add((fin["GMACs"], fin["mIoU"]))
    front = []
    for g, m in sorted(pts, key=lambda p: (p[0], -p[1])):
        if not front or m > front[-1][1]:
            front.append([g, m])
    return front


def front_miou(front, gmacs: float):
    """The image-level mIoU at ``gmacs`` on the front, linear between its points (what mixing the
    two neighbouring operating points, image by image, gives in expectation); None outside it."""
    xs, ys = [p[0] for p in front], [p[1] for p in front]
    if not front or gmacs < xs[0] * (1 - 1e-9) or gmacs > xs[-1] * (1 + 1e-9):
        return None
    return float(np.interp(gmacs, xs, ys))


def _pixel_row(rec_c, rec_e, row, final_miou, front, masked_stages, name, **extra) -> dict:
    """What setting ``row`` gave on the evaluation split (and on the calibration split), with
    its difference to the image-level policy at equal MACs."""
    s = rec_e.candidate_summary(int(rec_e.candidate_index(row)[0]))
    sc = rec_c.candidate_summary(int(rec_c.candidate_index(row)[0]))
    image = front_miou(front, s["GMACs"])
    return {"row": name, **extra, "thresholds": s["thresholds"], "calib_mIoU": sc["mIoU"],
            "mIoU": s["mIoU"], "GMACs": s["GMACs"], "MACs_saved_pct": s["MACs_saved_pct"],
            "drop": final_miou - s["mIoU"], "disagreement_pct": s["disagreement_pct"],
            "frozen": {st: s[f"frozen_{st}_pct"] for st in masked_stages},
            "pixels": {o: s[f"pixels_{o}_pct"] for o in rec_e.exit_names + [FINAL]},
            "answered": policy_outcome(rec_e, row).histogram(),
            "vs_image_equal_macs": None if image is None else {"image_mIoU": image, "mIoU": s["mIoU"] - image}}


def _vs_image(row: dict, image: dict) -> dict:
    """The per-pixel row against the image-level row calibrated for the same objective."""
    return {"image_mIoU": image["mIoU"], "image_MACs_saved_pct": image["MACs_saved_pct"],
            "MACs_saved_pts": row["MACs_saved_pct"] - image["MACs_saved_pct"], "mIoU": row["mIoU"] - image["mIoU"]}


def run_pixel(model, cfg, calib, evaluation, result, args, out_dir, label):
    """Per-pixel records on both splits and the rows calibrated from them (``result["pixel"]``)."""
    grid = pixel_grid(args.pixel_grid)
    mode = args.pixel_mode
    rec_c = _pixel_records(model, cfg, calib, os.path.join(out_dir, f"records_{label}_pixel_{mode}_calib.npz"), grid, mode)
    rec_e = _pixel_records(model, cfg, evaluation, os.path.join(out_dir, f"records_{label}_pixel_{mode}_eval.npz"),
                           grid, mode)
    exits, stages = model.exit_names, rec_e.stage_names
    masked_stages = stages[stages.index(exits[0]) + 1:] if exits[0] in stages else stages
    final = result["fixed"][FINAL]
    front = image_front(result)
    pix = result.setdefault("pixel", {})
    pix.update(mode=mode, grid=grid, images={"calib": rec_c.num_images, "eval": rec_e.num_images},
               masked_stages=masked_stages, image_front=front)
    never = np.full(len(exits), math.inf)
    row = functools.partial(_pixel_row, rec_c, rec_e, final_miou=final["mIoU"], front=front, masked_stages=masked_stages)
    rows = [row(never, name="final", policy=FINAL)]
    by_drop = {c["max_drop"]: c for c in result["curve"]}
    for drop in args.drops:
        cal = calibrate(rec_c, max_drop=drop)
        r = row(_row_array(exits, cal.thresholds), name=f"pixel D={drop:g}", policy=PIXEL, objective="max_drop",
                max_drop=drop, calib_final_mIoU=cal.final.miou)
        r["vs_image_same_drop"] = _vs_image(r, by_drop[drop])
        rows.append(r)
    by_budget = {c["budget"]: c for c in result["budget_curve"]}
    for budget in args.budgets:
        cal = calibrate(rec_c, budget=budget)
        r = row(_row_array(exits, cal.thresholds), name=f"pixel B={budget:g}", policy=PIXEL, objective="budget",
                budget=budget, feasible=cal.feasible)
        r["vs_image_same_budget"] = _vs_image(r, by_budget[budget])
        rows.append(r)
    # ADP-C: its fixed threshold after every exit, no calibration
    rows.append(row(np.full(len(exits), ADPC_THRESHOLD), name=f"ADP-C {ADPC_THRESHOLD:g}", policy=PIXEL, objective="fixed"))
    for method in ("crc", "ucb"):
        for eps in args.risk_epsilons:
            cal = calibrate_risk(rec_c, epsilon=eps, method=method, delta=args.risk_delta, quality=args.risk_quality)
            t = _row_array(exits, cal.thresholds)
            r = row(t, name=f"pixel {method} eps={eps:g}", policy=PIXEL, objective="risk", method=method,
                    epsilon=eps, delta=args.risk_delta if method == "ucb" else None, quality=args.risk_quality,
                    feasible=cal.feasible, reason=cal.details.get("reason", ""),
                    calib_risk=cal.details["empirical_risk"],
                    val_risk=float(gap_losses(rec_e, t[None], args.risk_quality)[0].mean()))
            # a UCB row that certifies an exit, and whether its measured gap on the evaluation split honours epsilon
            r["certified"] = bool(method == "ucb" and cal.feasible and np.isfinite(t).any())
            r["within_epsilon"] = bool(r["val_risk"] <= eps)
            rows.append(r)
    for t in rec_e.thresholds[1:]:  # descriptive: every recorded setting on the evaluation split
        rows.append(row(t, name="grid " + ",".join(f"{v:g}" for v in t), policy=PIXEL, objective="grid"))
    pix["rows"] = rows
    return pix


def _time_pixel(model, cfg, evaluation, result, args, save):
    """Timed runs of policy ``pixel`` (one image at a time, each paired with the final path on
    the same image): the operating point in each ``--pixel-timed-modes`` mode, ADP-C's 0.998
    and "nothing frozen" (thresholds above 1: no exit runs) in sparse mode."""
    pix = result["pixel"]
    timed = pix.setdefault("timed", {})
    exits = model.exit_names
    rows = {r["row"]: r for r in pix["rows"]}
    ops = [r for r in pix["rows"] if r.get("objective") == "max_drop"]
    adpc = rows[f"ADP-C {ADPC_THRESHOLD:g}"]
    runs = [("ADP-C:sparse", adpc, "sparse"), ("nothing_frozen:sparse", {"thresholds": {n: None for n in exits}}, "sparse")]
    if ops:  # the operating point: the calibrated drop nearest --operating-drop
        op = min(ops, key=lambda r: abs(r["max_drop"] - args.operating_drop))
        runs = [(f"pixel:{m}", op, m) for m in args.pixel_timed_modes] + runs
    saved = (model.policy, model.pixel_mode, model.pixel_thresholds)
    try:
        for key, row, mode in runs:
            spec = {"thresholds": row["thresholds"], "mode": mode}
            if key in timed and timed[key].get("spec") == spec:
                continue
            model.pixel_mode = mode
            model.set_pixel_thresholds({n: (2.0 if v is None else v) for n, v in row["thresholds"].items()})
            model.policy = PIXEL
            logger.info("timed run of policy pixel (%s, %s) on %s", key, mode, evaluation)
            t = _timed_run(model, cfg, evaluation)
            t["spec"] = spec
            t["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            t["time_vs_final"] = t["time_ms"] / t["time_ms_final"]
            t["time_saved_pct"] = 100.0 * (1.0 - t["time_vs_final"])
            # the acceptance reads this: measured time saving over the counted MACs saving
            t["time_to_macs_saving"] = (t["time_saved_pct"] / t["MACs_saved_pct"]) if t["MACs_saved_pct"] > 0 else None
            if "mIoU" in row:  # the records' row: the same MACs in any mode, the same mIoU in the records' mode
                t["row"] = row["row"]
                t["consistent"] = bool(abs(t["GMACs"] - row["GMACs"]) <= 1e-9 * max(1.0, row["GMACs"]) and
                                       (mode != pix["mode"] or abs(t["mIoU"] - row["mIoU"]) < 1e-6))
            timed[key] = t
            save()
    finally:
        policy, mode, thresholds = saved
        model.pixel_mode = mode
        if thresholds is not None:
            model.set_pixel_thresholds(thresholds, check=False)
        model.policy = policy
    if "stage_overhead" not in pix or pix["stage_overhead"].get("repeats") != args.overhead_repeats:
        pix["stage_overhead"] = stage_overhead(model, cfg, evaluation, args.overhead_repeats)
        save()


@torch.no_grad()
def stage_overhead(model, cfg, evaluation, repeats: int, warmup: int = 3) -> dict:
    """Nothing frozen, stage by stage: each backbone stage after the first exit (those policy
    ``pixel`` may run masked) at the evaluation split's padded input size, run dense (its own
    forward), masked ``sparse`` as deployed (the model's ``SPARSE_MAX_ACTIVE`` /
    ``SPARSE_MIN_PIXELS`` rule: with every pixel active it runs as ``emulate``), ``sparse`` forced (every stage gathered: the gather's own overhead)
    and ``emulate``. Median ms over ``repeats`` rounds after ``warmup``, the variants
    interleaved in each round so that a drifting load hits them alike."""
    inp = next(iter(Trainer.build_test_loader(cfg, evaluation)))[0]
    hw = model.padded_size(inp["image"].shape[-2:])
    modules = model.backbone.stage_modules()
    names = list(modules)
    exits = model.exit_names
    last = max(names.index(n) for n in list(model.sem_seg_head.in_features) + exits)
    stages = names[names.index(exits[0]) + 1:last + 1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, *hw, generator=gen).to(model.device)  # timing does not depend on the values
    inputs = {}
    for name in names[:last + 1]:
        if name in stages:
            inputs[name] = x
        x = modules[name](x)
    mask = PixelMask.full(1, hw, device=model.device)
    variants = {"dense": lambda n, s: modules[n](inputs[n]),
                "sparse": lambda n, s: s(inputs[n], mask, "sparse", max_active=model.sparse_max_active,
                                         min_pixels=model.sparse_min_pixels),
                "sparse_forced": lambda n, s: s(inputs[n], mask, "sparse", max_active=1.0, min_pixels=0),
                "emulate": lambda n, s: s(inputs[n], mask, "emulate")}
    plans = {n: MaskedStage(modules[n], n) for n in stages}
    times = {n: {v: [] for v in variants} for n in stages}
    ran_sparse = {}
    for k in range(warmup + repeats):
        for n in stages:
            for v, fn in variants.items():
                _sync(model.device)
                start = time.perf_counter()
                out = fn(n, plans[n])
                _sync(model.device)
                if k >= warmup:
                    times[n][v].append(1e3 * (time.perf_counter() - start))
                if v == "sparse" and k == 0:
                    ran_sparse[n] = bool(out[1].sparse)
    res = {"input_hw": list(hw), "image": inp["file_name"], "repeats": repeats, "stages": {}}
    total = {v: 0.0 for v in variants}
    for n in stages:
        med = {v: float(np.median(times[n][v])) for v in variants}
        for v in variants:
            total[v] += med[v]
        res["stages"][n] = {**{f"{v}_ms": med[v] for v in variants},
                            **{f"{v}_vs_dense": med[v] / med["dense"] for v in variants if v != "dense"},
                            "sparse_ran_sparse": ran_sparse[n]}
    res["total"] = {**{f"{v}_ms": total[v] for v in variants},
                    **{f"{v}_vs_dense": total[v] / total["dense"] for v in variants if v != "dense"}}
    return res


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- tables of the per-pixel rows
def _pct(v, fmt="{:+.1f}"):
    return "-" if v is None else fmt.format(v)


def pixel_table(r) -> list:
    """Markdown lines of one model's per-pixel rows (``result["pixel"]``)."""
    pix = r["pixel"]
    st = pix["masked_stages"]
    lines = ["", f"Per-pixel policy (records run in {pix['mode']} mode; grid {', '.join(f'{v:g}' for v in pix['grid'])}; "
             f"thresholds calibrated on the calibration split, measured on the evaluation split). "
             "'vs image, same objective': MACs saved and mIoU minus the image-level policy's calibrated for the same "
             "D or B; 'vs image, equal MACs': mIoU minus the image-level front's at the row's MACs:", "",
             "| policy | thresholds | val mIoU | drop | GMACs | MACs saved | vs image, same objective (MACs pts / mIoU) "
             "| vs image, equal MACs (mIoU) | " + " | ".join(f"frozen before {s}" for s in st) + " | pixels answered |",
             "|" + "---|" * (9 + len(st))]
    for c in pix["rows"]:
        th = ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in c["thresholds"].items())
        same = c.get("vs_image_same_drop") or c.get("vs_image_same_budget")
        same = "-" if same is None else f"{same['MACs_saved_pts']:+.1f} / {same['mIoU']:+.2f}"
        eq = "-" if c["vs_image_equal_macs"] is None else f"{c['vs_image_equal_macs']['mIoU']:+.2f}"
        name = c["row"] + ("" if c.get("feasible", True) else " (infeasible)")
        if c.get("objective") == "risk":
            name += f" (val gap {c['val_risk']:.4f}{', certified' if c['certified'] else ''})"
        answered = ", ".join(f"{k} {v:.0f}%" for k, v in c["pixels"].items())
        lines.append(f"| {name} | {th} | {c['mIoU']:.2f} | {c['drop']:+.2f} | {c['GMACs']:.3f} | "
                     f"{c['MACs_saved_pct']:.1f}% | {same} | {eq} | "
                     + " | ".join(f"{c['frozen'][s]:.0f}%" for s in st) + f" | {answered} |")
    timed = pix.get("timed", {})
    if timed:
        lines += ["", "Timed (one image at a time; time / final paired on the same image):", "",
                  "| run | mode | val mIoU | GMACs | MACs saved | ms / image | time / final | time saved | "
                  "time saved / MACs saved | matches the records |", "|---|---|---|---|---|---|---|---|---|---|"]
        for k, t in timed.items():
            ratio = "-" if t.get("time_to_macs_saving") is None else f"{t['time_to_macs_saving']:.2f}"
            lines.append(f"| {k} | {t['spec']['mode']} | {t['mIoU']:.2f} | {t['GMACs']:.3f} | {t['MACs_saved_pct']:.1f}% | "
                         f"{t['time_ms']:.1f} | {t['time_vs_final']:.3f}x | {t['time_saved_pct']:.1f}% | {ratio} | "
                         f"{t.get('consistent', '-')} |")
    so = pix.get("stage_overhead")
    if so:
        lines += ["", f"Nothing frozen, stage by stage (input {so['input_hw'][0]}x{so['input_hw'][1]}, median of "
                  f"{so['repeats']} rounds; sparse as deployed falls back to emulate above SPARSE_MAX_ACTIVE or below SPARSE_MIN_PIXELS):", "",
                  "| stage | dense ms | sparse (deployed) | sparse forced | emulate |", "|---|---|---|---|---|"]
        for n, s in list(so["stages"].items()) + [("total", so["total"])]:
            lines.append(f"| {n} | {s['dense_ms']:.2f} | {s['sparse_vs_dense']:.3f}x | {s['sparse_forced_vs_dense']:.3f}x "
                         f"| {s['emulate_vs_dense']:.3f}x |")
    return lines


# ----------------------------------------------------------------------------- the mean over seeds (--seeds-summary)
#: Fields that name a row of a result's lists (a row without any is not summarised: its meaning
#: may differ between seeds, as the shared-threshold sweep's points do).
ROW_KEYS = ("method", "epsilon", "max_drop", "budget")


def _row_key(d: dict):
    if "row" in d:
        return str(d["row"])
    parts = [f"{k}={d[k]:g}" if isinstance(d[k], float) else f"{k}={d[k]}" for k in ROW_KEYS if k in d]
    return " ".join(parts) or None


def flatten(obj, prefix: str = "") -> dict:
    """The numeric leaves of a result, ``{"path/to/leaf": value}`` (booleans as 0 / 1, so their
    mean is a share of seeds); a list of rows is keyed by each row's name (:func:`_row_key`)."""
    out = {}
    if isinstance(obj, bool):
        out[prefix] = float(obj)
    elif isinstance(obj, (int, float)):
        if math.isfinite(obj):
            out[prefix] = float(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(obj, list):
        for v in obj:
            key = _row_key(v) if isinstance(v, dict) else None
            if key is not None:
                out.update(flatten(v, f"{prefix}[{key}]"))
    return out


def mean_interval(values) -> dict:
    """Mean over seeds with its 95 % confidence interval (Student t; as the CamVid table's)."""
    v = [float(x) for x in values]
    res = {"n": len(v), "mean": float(np.mean(v)), "values": v}
    if len(v) > 1:
        from scipy.stats import t

        sd = float(np.std(v, ddof=1))
        half = float(t.ppf(0.975, len(v) - 1)) * sd / math.sqrt(len(v))
        res.update(sd=sd, lo=res["mean"] - half, hi=res["mean"] + half)
    return res


def seeds_summary(folders, output: str) -> dict:
    """Read ``result_<label>.json`` of every folder (one per seed), and write the mean over the
    seeds of every numeric entry, per model, with its 95 % interval (``seeds_summary.json``) and
    the acceptance readings on those means (``seeds_summary.md``)."""
    by_label = {}
    for folder in folders:
        files = sorted(f for f in os.listdir(folder) if f.startswith("result_") and f.endswith(".json"))
        if not files:
            raise FileNotFoundError(f"{folder!r} holds no result_<label>.json (an --output folder of this script).")
        for f in files:
            r = json.load(open(os.path.join(folder, f)))
            by_label.setdefault(r["label"], []).append((folder, flatten(r)))
    summary = {}
    for label, runs in by_label.items():
        keys = list(dict.fromkeys(k for _, flat in runs for k in flat))
        summary[label] = {"seeds": [f for f, _ in runs],
                          "mean": {k: mean_interval([flat[k] for _, flat in runs if k in flat]) for k in keys}}
        summary[label]["acceptance"] = acceptance(summary[label]["mean"])
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "seeds_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    text = summary_table(summary)
    with open(os.path.join(output, "seeds_summary.md"), "w") as f:
        f.write(text)
    print(text)
    return summary


def acceptance(mean: dict) -> dict:
    """The acceptance readings of the per-pixel policy on means over seeds: per calibrated drop
    D, within 1 mIoU of its own final output and (at least 15 points more MACs saved than the
    image-level policy at the same D, or at least 0.3 mIoU more at equal MACs); the sparse
    operating point's time saving at least half its MACs saving; with nothing frozen, sparse at
    most 5 % slower than dense (the policy, paired with the final path, and stage by stage);
    a UCB row certified in every seed whose mean measured gap is at most epsilon."""
    def m(key):
        return mean[key]["mean"] if key in mean else None

    drops = sorted({float(k[len("pixel/rows[pixel D="):].split("]")[0]) for k in mean
                    if k.startswith("pixel/rows[pixel D=")})
    rows = []
    for d in drops:
        p = f"pixel/rows[pixel D={d:g}]"
        drop, saved, eq = m(p + "/drop"), m(p + "/vs_image_same_drop/MACs_saved_pts"), m(p + "/vs_image_equal_macs/mIoU")
        ok = drop is not None and drop <= 1.0 and ((saved is not None and saved >= 15.0) or (eq is not None and eq >= 0.3))
        rows.append({"max_drop": d, "drop": drop, "MACs_saved_pts_vs_image": saved, "mIoU_vs_image_equal_macs": eq,
                     "n_equal_macs": mean.get(p + "/vs_image_equal_macs/mIoU", {}).get("n", 0), "pass": bool(ok)})
    ucb = []
    for k in mean:
        if k.startswith("pixel/rows[pixel ucb eps=") and k.endswith("/certified"):
            p = k[: -len("/certified")]
            eps = float(p.split("eps=")[1].rstrip("]"))
            cert, risk = m(p + "/certified"), m(p + "/val_risk")
            ucb.append({"epsilon": eps, "certified_share": cert, "val_risk": risk,
                        "pass": bool(cert == 1.0 and risk is not None and risk <= eps)})
    ratio, none_policy = m("pixel/timed/pixel:sparse/time_to_macs_saving"), m("pixel/timed/nothing_frozen:sparse/time_vs_final")
    stage = m("pixel/stage_overhead/total/sparse_vs_dense")
    return {"per_drop": rows, "pixel_policy": any(r["pass"] for r in rows),
            "time_to_macs_saving": ratio, "time_half_of_macs": None if ratio is None else ratio >= 0.5,
            "nothing_frozen_policy_vs_final": none_policy, "nothing_frozen_stages_sparse_vs_dense": stage,
            "nothing_frozen_within_5pct": None if none_policy is None and stage is None else
            all(v <= 1.05 for v in (none_policy, stage) if v is not None),
            "ucb": ucb, "ucb_certified_within_epsilon": any(u["pass"] for u in ucb)}


def _ci(e) -> str:
    if e is None:
        return "-"
    return f"{e['mean']:.2f}" + (f" [{e['lo']:.2f}, {e['hi']:.2f}]" if "lo" in e else "") + f" (n={e['n']})"


def summary_table(summary: dict) -> str:
    lines = ["Means over seeds, with 95 % intervals (Student t) and the number of seeds.", ""]
    for label, s in summary.items():
        mean = s["mean"]
        lines += [f"### {label} ({len(s['seeds'])} seeds)", ""]
        names = list(dict.fromkeys(k.split("]")[0][len("pixel/rows["):] for k in mean if k.startswith("pixel/rows[")))
        if names:
            lines += ["| policy | val mIoU | drop | GMACs | MACs saved % | vs image, same objective: MACs pts | "
                      "vs image, equal MACs: mIoU | val gap |", "|---|---|---|---|---|---|---|---|"]
            for n in names:
                p = f"pixel/rows[{n}]"
                same = mean.get(p + "/vs_image_same_drop/MACs_saved_pts") or mean.get(p + "/vs_image_same_budget/MACs_saved_pts")
                lines.append(f"| {n} | {_ci(mean.get(p + '/mIoU'))} | {_ci(mean.get(p + '/drop'))} | "
                             f"{_ci(mean.get(p + '/GMACs'))} | {_ci(mean.get(p + '/MACs_saved_pct'))} | {_ci(same)} | "
                             f"{_ci(mean.get(p + '/vs_image_equal_macs/mIoU'))} | {_ci(mean.get(p + '/val_risk'))} |")
        curve = list(dict.fromkeys(k.split("]")[0][len("curve["):] for k in mean if k.startswith("curve[")))
        risk = list(dict.fromkeys(k.split("]")[0][len("risk["):] for k in mean if k.startswith("risk[")))
        if curve or "fixed/final/mIoU" in mean:  # the image-level policy (step 3) and the fixed outputs
            lines += ["", "| image-level policy | val mIoU | drop | GMACs | MACs saved % | val risk (certified share) |",
                      "|---|---|---|---|---|---|"]
            for n in [f for f in mean if f.startswith("fixed/") and f.endswith("/mIoU")]:
                n = n.split("/")[1]
                lines.append(f"| {n if n == FINAL else 'exit:' + n} | {_ci(mean.get(f'fixed/{n}/mIoU'))} | | "
                             f"{_ci(mean.get(f'fixed/{n}/GMACs'))} | | |")
            rows = [(f"confidence, D={n.split('=')[1]}", f"curve[{n}]") for n in curve]
            rows += [(n.replace("method=", "").replace(" epsilon=", " eps="), f"risk[{n}]") for n in risk]
            for name, p in rows:
                cert = mean.get(p + "/feasible")
                risk_cell = "" if p.startswith("curve") else (
                    f"{_ci(mean.get(p + '/val_risk'))} ({_pct(None if cert is None else cert['mean'], '{:.0%}')})")
                lines.append(f"| {name} | {_ci(mean.get(p + '/mIoU'))} | {_ci(mean.get(p + '/drop'))} | "
                             f"{_ci(mean.get(p + '/GMACs'))} | {_ci(mean.get(p + '/MACs_saved_pct'))} | {risk_cell} |")
        timed = list(dict.fromkeys(k.split("/")[2] for k in mean if k.startswith("pixel/timed/")))
        if timed:
            lines += ["", "| timed run | time / final | time saved % | MACs saved % | time saved / MACs saved |",
                      "|---|---|---|---|---|"]
            for k in timed:
                p = f"pixel/timed/{k}"
                lines.append(f"| {k} | {_ci(mean.get(p + '/time_vs_final'))} | {_ci(mean.get(p + '/time_saved_pct'))} | "
                             f"{_ci(mean.get(p + '/MACs_saved_pct'))} | {_ci(mean.get(p + '/time_to_macs_saving'))} |")
        a = s["acceptance"]
        if a["per_drop"] or a["ucb"]:
            lines += ["", "Acceptance, on the means:", ""]
            for r in a["per_drop"]:
                lines.append(f"* D = {r['max_drop']:g}: drop {_pct(r['drop'], '{:+.2f}')} (at most 1), MACs saved vs "
                             f"image-level {_pct(r['MACs_saved_pts_vs_image'])} points (at least 15) or mIoU at equal MACs "
                             f"{_pct(r['mIoU_vs_image_equal_macs'], '{:+.2f}')} (at least 0.3, n={r['n_equal_macs']}): "
                             f"{'pass' if r['pass'] else 'fail'}")
            lines.append(f"* measured time saving / counted MACs saving (sparse operating point): "
                         f"{_pct(a['time_to_macs_saving'], '{:.2f}')} (at least 0.5): {a['time_half_of_macs']}")
            lines.append(f"* nothing frozen, sparse vs dense: policy {_pct(a['nothing_frozen_policy_vs_final'], '{:.3f}')}x, "
                         f"stages {_pct(a['nothing_frozen_stages_sparse_vs_dense'], '{:.3f}')}x (at most 1.05x): "
                         f"{a['nothing_frozen_within_5pct']}")
            for u in a["ucb"]:
                lines.append(f"* UCB epsilon {u['epsilon']:g}: certified in {_pct(u['certified_share'], '{:.0%}')} of the "
                             f"seeds, mean val gap {_pct(u['val_risk'], '{:.4f}')}: {'pass' if u['pass'] else 'fail'}")
        lines.append("")
    return "\n".join(lines)


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
        if "pixel" in r:
            lines += pixel_table(r)
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
    p.add_argument("--model", nargs=3, action="append", metavar=("LABEL", "CONFIG", "WEIGHTS"))
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
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    p.add_argument("--no-timing", action="store_true", help="skip the timed runs (step 4)")
    p.add_argument("--pixel", action="store_true",
                   help="add the per-pixel policy's rows (policy pixel: records on both splits, calibrated rows, "
                        "ADP-C's fixed 0.998, risk control, timed runs)")
    p.add_argument("--pixel-grid", default=",".join(f"{v:g}" for v in DEFAULT_PIXEL_GRID),
                   help=f"--pixel: shared thresholds run on both splits (ADP-C's {ADPC_THRESHOLD} is added; at most "
                        f"{MAX_CANDIDATES}: each is a pass over each split)")
    p.add_argument("--pixel-mode", choices=list(MODES), default="sparse",
                   help="--pixel: masked execution mode the records are run in (the counted MACs are the same in both)")
    p.add_argument("--pixel-timed-modes", default="sparse,emulate",
                   help="--pixel: modes the per-pixel operating point (--operating-drop) is timed in")
    p.add_argument("--overhead-repeats", type=int, default=20,
                   help="--pixel: timed rounds of the stage-by-stage comparison with nothing frozen")
    p.add_argument("--seeds-summary", nargs="+", default=None, metavar="FOLDER",
                   help="instead of running models: the mean over seeds of the results in these --output folders "
                        "(one per seed), written to --output")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides for every model")
    args = p.parse_args(argv)
    if args.seeds_summary:
        return seeds_summary(args.seeds_summary, args.output)
    if not args.model:
        p.error("--model is required (or --seeds-summary)")
    args.pixel_grid = pixel_grid(v for v in args.pixel_grid.split(",") if v.strip())
    args.pixel_timed_modes = [m for m in args.pixel_timed_modes.split(",") if m.strip()]
    bad = [m for m in args.pixel_timed_modes if m not in MODES]
    if bad:
        p.error(f"--pixel-timed-modes: unknown modes {bad}; choose from {list(MODES)}")
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
