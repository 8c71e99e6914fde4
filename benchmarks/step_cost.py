#!/usr/bin/env python
"""The cost of a training step of each table method, counted and timed in one run: the FLOPs that
``SOLVER.BUDGET`` divides by (``segdistill.engine.budget``), beside single-thread CPU time, so
that a reader sees how far the count tracks the time, method by method.

    python benchmarks/step_cost.py                                   # every row of the table, 1 thread
    python benchmarks/step_cost.py --methods student pd cwd skd --rounds 10 --json cost.json
    python benchmarks/step_cost.py --methods baseline ds SOLVER.IMS_PER_BATCH 4   # KEY VALUE: every config

Each method is built from its CamVid-table config (``configs/camvid/table/<family>.yaml`` with
the method's overrides, ``benchmarks/methods.py``), random weights (the teacher too:
``MODEL.DISTILL.TEACHER.ALLOW_RANDOM``; cost does not depend on weights; HS3 rows get a
synthetic clusters file), on the CPU. The step's FLOPs are counted exactly as a budgeted run
counts them (``step_flops`` on ``synthetic_batch``: one forward with losses and backward,
``torch.utils.flop_counter``'s formulas), with the forward shares of the top-level modules (a
Distiller's ``student``, ``teacher``, ``distill_losses``) and the backward pass's. Then SGD steps on the same batch are timed in the same
process, interleaved round by round and rotated, as the process's CPU time per step (median
after the warm-up rounds), with torch at ``--threads`` threads (default 1: the table's setting).

Columns: GFLOPs per step and their ratio to ``--reference`` (the student alone by default, the
unit of the equal-compute block), CPU s per step and its ratio, and ``time / FLOPs`` relative
to the reference: 1.00 where the count tracks the time; above 1 where the method spends time
the counter does not see (element-wise work, memories, gathers, the optimizer's update of more
parameters). Timings belong on a quiet machine; the toy test only checks the plumbing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))
import torch  # noqa: E402
from methods import BLOCKS, METHODS  # noqa: E402

from detectron2.modeling import build_model  # noqa: E402
from segdistill.config import load_yaml_config  # noqa: E402
from segdistill.engine.budget import step_flops, synthetic_batch  # noqa: E402
from segdistill.modeling.exits.hs3_clusters import save_clusters, synthetic_clusters  # noqa: E402

__all__ = ["method_config", "count", "budget_for", "measure", "default_methods", "main"]

CONFIGS = os.path.join(ROOT, "configs", "camvid", "table")


def method_config(name: str, opts: Sequence[str] = (), clusters_dir: str = ""):
    """The table config of a method (its family's YAML with its overrides, then ``opts``), on the CPU,
    with a random teacher and no backbone file."""
    m = METHODS[name]
    extra = ["MODEL.DEVICE", "cpu", "MODEL.TIMM.CHECKPOINT", ""]
    cfg = load_yaml_config(os.path.join(CONFIGS, f"{m.family}.yaml"), list(m.opts) + extra + list(opts))
    cfg.defrost()
    if cfg.MODEL.META_ARCHITECTURE == "Distiller":
        cfg.MODEL.DISTILL.TEACHER.WEIGHTS = ""
        cfg.MODEL.DISTILL.TEACHER.ALLOW_RANDOM = True
        cfg.MODEL.DISTILL.TEACHER.OPTS = list(cfg.MODEL.DISTILL.TEACHER.OPTS) + ["MODEL.TIMM.CHECKPOINT", ""]
    if any(n in m.needs for n in ("hs3_clusters", "hs3_manual")):
        # a synthetic clusters file of the package's writer: the count only changes the exits' segmenters
        path = os.path.join(clusters_dir or tempfile.mkdtemp(), "clusters.json")
        cfg.MODEL.EXITS.HS3.CLUSTERS_FILE = save_clusters(
            path, synthetic_clusters(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, list(cfg.MODEL.EXITS.IN_FEATURES)))
    cfg.DATASETS.TRAIN = ()
    cfg.freeze()
    return cfg


def count(cfg) -> Dict[str, int]:
    """The counted FLOPs of one training step of ``cfg``'s model (``SOLVER.BUDGET``'s unit)."""
    torch.manual_seed(0)
    model = build_model(cfg)
    return step_flops(model, synthetic_batch(cfg, cfg.SOLVER.IMS_PER_BATCH))


def budget_for(steps: float, reference: str, opts: Sequence[str] = ()) -> float:
    """``SOLVER.BUDGET`` worth ``steps`` training steps of the ``reference`` method."""
    with tempfile.TemporaryDirectory() as tmp:
        return float(steps) * count(method_config(reference, opts, tmp))["total"]


def measure(names: List[str], opts: Sequence[str], rounds: int, warmup: int) -> Dict[str, dict]:
    """Per method: counted FLOPs (total and per top-level module) and median CPU s per SGD step."""
    out, models = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in names:
            cfg = method_config(n, opts, tmp)
            torch.manual_seed(0)
            model = build_model(cfg)
            batch = synthetic_batch(cfg, cfg.SOLVER.IMS_PER_BATCH)
            out[n] = {"flops": step_flops(model, batch), "cpu": []}
            params = [p for p in model.parameters() if p.requires_grad]
            models[n] = (model, torch.optim.SGD(params, lr=1e-4, momentum=0.9), batch)
        for r in range(warmup + rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                model, opt, batch = models[n]
                opt.zero_grad(set_to_none=True)
                c = time.process_time()
                losses = model(batch)
                sum(losses.values()).backward()
                opt.step()
                if r >= warmup:
                    out[n]["cpu"].append(time.process_time() - c)
    for n in names:
        cpu = sorted(out[n]["cpu"])
        out[n]["cpu_s"] = cpu[len(cpu) // 2]
    return out


def report(result: Dict[str, dict], reference: str) -> str:
    ref = result.get(reference)
    lines = ["| method | GFLOPs / step | x ref (FLOPs) | CPU s / step | x ref (CPU) | time / FLOPs vs ref | modules (GFLOPs) |",
             "|---|---|---|---|---|---|---|"]
    for n, r in result.items():
        f, c = r["flops"]["total"], r["cpu_s"]
        xf = f / ref["flops"]["total"] if ref else float("nan")
        xc = c / ref["cpu_s"] if ref else float("nan")
        parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in r["flops"].items() if k != "total")
        lines.append(f"| {n} | {f / 1e9:.2f} | {xf:.2f} | {c:.3f} | {xc:.2f} | {xc / xf:.2f} | {parts} |")
    return "\n".join(lines)


def default_methods() -> list:
    """The table's methods; not their variants (``<method>@<tag>``): an equal-compute or tuned row
    takes its method's step (only the iterations or weights differ), and the bf16 rows' autocast
    is the trainer's, which this count does not model."""
    return list(dict.fromkeys(n for _, ms in BLOCKS.values() for n in ms if "@" not in n))


def main(argv=None) -> dict:
    table_rows = default_methods()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=table_rows, help="methods of benchmarks/methods.py (then KEY VALUE)")
    p.add_argument("--reference", default="student", help="the method the ratios are taken against")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="", help="also write the result here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides of every config")
    args = p.parse_args(argv)
    names = [a for a in args.methods if a in METHODS]
    opts = args.methods[len(names):] + list(args.opts)
    if not names or names != args.methods[: len(names)] or len(opts) % 2 or any(o in METHODS for o in opts):
        p.error(f"give method names of {sorted(METHODS)} first, then KEY VALUE pairs; got {args.methods}")
    if args.reference not in names:
        names = [args.reference] + names
    torch.set_num_threads(args.threads)
    result = measure(names, opts, args.rounds, args.warmup)
    print(report(result, args.reference), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"reference": args.reference, "threads": args.threads, "rounds": args.rounds, "opts": opts,
                       "counter": "torch.utils.flop_counter.flop_registry", "methods": result}, f, indent=1)
    return result


if __name__ == "__main__":
    main()
