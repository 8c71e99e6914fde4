#!/usr/bin/env python
"""The checks of a lent GPU in one run, written to one JSON and one markdown file.

    python benchmarks/gpu_check.py --device cuda --output output/gpu_check   # what gpu_check.sh runs
    python benchmarks/gpu_check.py --device cpu --methods sr cwd --batch 2 --size 32x32 --skip-tests  # toy run

1. **CUDA tests**: ``pytest -m cuda`` (the tests that need a GPU; skipped without one), its
   exit status and summary line.
2. **One training step of every method in every precision** (fp32, bf16, and fp16 on CUDA):
   the project's own step (:func:`segdistill.engine.build_train_step`: detectron2's
   SimpleTrainer for fp32, :class:`~segdistill.engine.MixedPrecisionTrainer` otherwise, with
   its GradScaler for fp16) on a random batch, the models of ``benchmarks/overhead.py``
   (demo configs, random teacher). Per step: the loss terms all finite, the parameters still
   float32, the second step's time and, on CUDA, the peak memory of that step and its
   host-device synchronisations (``torch.cuda.set_sync_debug_mode``: one warning per
   synchronising call, counted; the table adds them beyond the method's baseline row, which
   ``tests/test_gpu_readiness.py`` bounds on CPU by counting the ops that would synchronise).
   A failure is recorded (its error) and the run goes on.
3. **The overhead benchmark** (``benchmarks/overhead.py``) on the same device with the
   precisions as columns.

Writes ``<output>.json`` (everything) and ``<output>.md`` (the tables).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import overhead  # noqa: E402  (benchmarks/overhead.py: its rows and model building)
from detectron2.utils.events import EventStorage  # noqa: E402
from segdistill.engine import build_train_step  # noqa: E402
from segdistill.engine.hooks import FollowsTrainingProgress  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cuda_tests(timeout: int) -> dict:
    """``pytest -m cuda`` in a subprocess: its exit status and last line."""
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "projects")}
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        lines = [line for line in p.stdout.strip().splitlines() if line.strip()]
        # pytest's "no tests collected" (5) is no failure of the code
        return {"returncode": p.returncode, "ok": p.returncode in (0, 5), "summary": lines[-1] if lines else "",
                "seconds": time.perf_counter() - t0}
    except subprocess.TimeoutExpired:
        return {"returncode": None, "ok": False, "summary": f"timed out after {timeout} s",
                "seconds": time.perf_counter() - t0}


def one_step(name: str, precision: str, settings, batch, device: str) -> dict:
    """Two steps of ``name`` in ``precision`` through the project's train step; the second timed."""
    row = overhead.ROWS[name]
    model = overhead.build(row.config, row.overrides, settings).train()
    cfg = overhead.load_cfg(row.config, row.overrides, settings)
    if isinstance(model, FollowsTrainingProgress):  # a Distiller's or an exit model's schedules
        model.set_training_progress(cfg.SOLVER.MAX_ITER // 2, cfg.SOLVER.MAX_ITER)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    step = build_train_step(model, itertools.repeat(batch), opt, dtype=DTYPES[precision])
    cuda = device.startswith("cuda")
    with EventStorage(0) as storage:
        for i in range(2):
            step.iter = i
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            count_syncs = cuda and i == 1
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if count_syncs:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    step.run_step()
                finally:
                    if count_syncs:
                        torch.cuda.set_sync_debug_mode("default")
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            syncs = sum("synchroniz" in str(w.message) for w in caught) if count_syncs else None
            storage.step()
        losses = {k: float(h.latest()) for k, h in storage.histories().items()
                  if k.startswith("loss_") or k == "total_loss"}
    return {
        "ok": all(math.isfinite(v) for v in losses.values())
        and all(p.dtype == torch.float32 for p in model.parameters()),
        "total_loss": losses.get("total_loss"), "losses": losses, "step_s": seconds,
        "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None, "syncs": syncs,
        "params_float32": all(p.dtype == torch.float32 for p in model.parameters()),
    }


def training_steps(methods: List[str], precisions: List[str], device: str, batch_size: int, size) -> Dict:
    settings = overhead.Settings(device)
    baselines = {overhead.ROWS[m].baseline for m in methods}
    names = [n for n in overhead.ROWS if n in baselines or n in methods]  # overhead.py's rows and order
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        if any(overhead.HS3 in overhead.ROWS[n].overrides for n in names):
            hs3_cfg = overhead.load_cfg("configs/demo/hs3/hs3_r18.yaml", (), settings)
            settings = settings._replace(clusters=overhead.write_clusters(
                tmp, list(hs3_cfg.MODEL.EXITS.IN_FEATURES), hs3_cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES))
        num_classes = overhead.load_cfg(overhead.PLAIN_CONFIG, (), settings).MODEL.SEM_SEG_HEAD.NUM_CLASSES
        batch = overhead.make_batch(batch_size, size, num_classes)
        out = {}
        for n in names:
            out[n] = {}
            for precision in precisions:
                overhead.progress(f"one training step: {n} in {precision}")
                try:
                    out[n][precision] = one_step(n, precision, settings, batch, device)
                except Exception as e:  # recorded: the report lists every failure, the run goes on
                    out[n][precision] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
    return out


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# GPU check ({s['where']})", "",
             f"torch {s['torch']}; batch {s['batch']} x {s['size'][0]}x{s['size'][1]}.", ""]
    t = result.get("cuda_tests")
    if t:
        lines += ["## CUDA tests (pytest -m cuda)", "", f"{'ok' if t['ok'] else 'FAILED'}: {t['summary']}", ""]
    steps = result["steps"]
    precisions = s["precisions"]
    lines += ["## One training step per method and precision", "",
              "Syncs: host-device synchronisations of the step beyond its baseline row's (CUDA only).", "",
              "| method | " + " | ".join(f"{p} loss | {p} step (ms) | {p} peak (MiB) | {p} syncs" for p in precisions) + " |",
              "| --- |" + " --- | --- | --- | --- |" * len(precisions)]
    baseline_of = {n: overhead.ROWS[n].baseline for n in steps if n in overhead.ROWS}
    for n, per in steps.items():
        cells = []
        for p in precisions:
            v = per[p]
            if not v["ok"]:
                cells += [f"FAIL {v.get('error', 'non-finite loss or non-float32 weights')}", "-", "-", "-"]
            else:
                peak = "-" if v["peak_bytes"] is None else f"{v['peak_bytes'] / 2**20:.0f}"
                base = steps.get(baseline_of.get(n), {}).get(p, {}).get("syncs")
                syncs = "-" if v.get("syncs") is None else (
                    f"{v['syncs']}" if base is None or baseline_of.get(n) == n else f"{v['syncs']} (+{v['syncs'] - base})")
                cells += [f"{v['total_loss']:.4f}", f"{v['step_s'] * 1e3:.1f}", peak, syncs]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    failed = [f"{n} ({p})" for n, per in steps.items() for p, v in per.items() if not v["ok"]]
    lines += ["", f"Steps failed: {', '.join(failed) if failed else 'none'}.", ""]
    if result.get("overhead_markdown"):
        lines += ["## Overhead (benchmarks/overhead.py)", "", result["overhead_markdown"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--output", default="output/gpu_check", help="writes OUTPUT.json and OUTPUT.md")
    p.add_argument("--methods", nargs="+", default=["all"], metavar="METHOD")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=overhead.parse_size, default=(512, 512), metavar="HxW")
    p.add_argument("--rounds", type=int, default=5, help="overhead.py's timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="overhead.py's warm-up rounds")
    p.add_argument("--skip-tests", action="store_true", help="do not run pytest -m cuda")
    p.add_argument("--skip-overhead", action="store_true", help="do not run overhead.py")
    p.add_argument("--tests-timeout", type=int, default=120)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    try:
        methods = overhead.resolve_methods(args.methods)
    except ValueError as e:
        p.error(str(e))
    cuda = args.device == "cuda"
    precisions = ["fp32", "bf16"] + (["fp16"] if cuda else [])
    if not cuda:
        torch.set_num_threads(1)
    where = f"CUDA {torch.cuda.get_device_name()}" if cuda else f"CPU, {torch.get_num_threads()} thread(s)"
    result = {"settings": {"device": args.device, "where": where, "torch": torch.__version__, "batch": args.batch,
                           "size": list(args.size), "methods": methods, "precisions": precisions}}
    if not args.skip_tests:
        overhead.progress("pytest -m cuda")
        result["cuda_tests"] = cuda_tests(args.tests_timeout)
    result["steps"] = training_steps(methods, precisions, args.device, args.batch, args.size)
    if not args.skip_overhead:
        md = args.output + ".overhead.md"
        result["overhead"] = overhead.main(
            ["--device", args.device, "--methods", *methods, "--batch", str(args.batch),
             "--size", f"{args.size[0]}x{args.size[1]}", "--rounds", str(args.rounds), "--warmup", str(args.warmup),
             "--precisions", *precisions, "channels_last", "bf16_channels_last", "--markdown", md])
        with open(md) as f:
            result["overhead_markdown"] = f.read()
        os.remove(md)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output + ".json", "w") as f:
        json.dump(result, f, indent=2, default=str)
    with open(args.output + ".md", "w") as f:
        f.write(markdown(result))
    overhead.progress(f"wrote {args.output}.json and {args.output}.md")
    return result


if __name__ == "__main__":
    main()
