#!/usr/bin/env python
"""CPU latency of a deployed model: eager against its TorchScript and ONNX (onnxruntime) exports.

    python benchmarks/export_latency.py                       # demo student, 512x1024, one thread
    python benchmarks/export_latency.py --config-file configs/demo/deeplabv3_r18.yaml --threads 4
    python benchmarks/export_latency.py --formats torchscript --output latency.json

The model is built from the config with random weights (latency does not depend on the values)
and exported with tools/export_model.py (dynamic height and width; the file is checked against
the eager model before it is timed). Each format runs one raw ``1 x 3 x H x W`` image
``--warmup`` times, then ``--repeats`` timed runs; reported per format: the median, the
fastest and the slowest run in milliseconds (the spread shows how loaded the machine was),
and the median relative to eager. Eager and TorchScript run with ``torch.set_num_threads``,
onnxruntime with ``intra_op_num_threads`` (both ``--threads``, inter-op parallelism off).
ONNX needs the ``export`` extra (``pip install .[export]``); without it that format is skipped,
saying so.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import torch  # noqa: E402

import segdistill  # noqa: E402,F401
from detectron2.modeling import build_model  # noqa: E402
from segdistill.config import load_yaml_config  # noqa: E402
from export_model import export_model, exported_runner, require_onnx, verify  # noqa: E402

FORMATS = ("torchscript", "onnx")


def onnx_runner(path: str, threads: int):
    """onnxruntime on CPU with ``threads`` intra-op threads (what exported_runner does, threads pinned)."""
    _, ort = require_onnx()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return lambda image: session.run(None, {"image": image.numpy()})[0]


def timed(fn, image, warmup: int, repeats: int):
    for _ in range(warmup):
        fn(image)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(image)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def measure(cfg, size, formats, *, threads: int, warmup: int, repeats: int, folder: str) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)) * 255
    runs = {}

    def eager(x):
        with torch.no_grad():
            return model([{"image": x[0]}])[0]["sem_seg"]

    runs["eager"] = eager
    for fmt in formats:
        if fmt == "onnx":
            try:
                require_onnx()
            except ImportError as e:
                print(f"onnx skipped: {e}", file=sys.stderr)
                continue
        path = export_model(model, fmt, os.path.join(folder, f"model.{fmt}"), input_size=size)
        verify(model, fmt, path, [tuple(size)])
        runs[fmt] = onnx_runner(path, threads) if fmt == "onnx" else exported_runner(fmt, path)
    rows = {}
    for name, fn in runs.items():
        times = timed(fn, image, warmup, repeats)
        rows[name] = {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
                      "times_ms": times}
    for row in rows.values():
        row["vs_eager"] = row["median_ms"] / rows["eager"]["median_ms"]
    return {"config": cfg.MODEL.META_ARCHITECTURE, "size": list(size), "threads": threads, "warmup": warmup,
            "repeats": repeats, "torch": torch.__version__, "rows": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="configs/demo/distill/student.yaml", help="a deployed model's config")
    p.add_argument("--size", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"))
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--output", help="also write the result as JSON here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    args = p.parse_args(argv)
    config = args.config_file if os.path.isabs(args.config_file) else os.path.join(ROOT, args.config_file)
    cfg = load_yaml_config(config, args.opts)
    with tempfile.TemporaryDirectory() as folder:
        result = measure(cfg, args.size, args.formats, threads=args.threads, warmup=args.warmup,
                         repeats=args.repeats, folder=folder)
    result["config"] = args.config_file
    print(f"{args.config_file} at {args.size[0]}x{args.size[1]}, {args.threads} thread(s), "
          f"{args.repeats} runs after {args.warmup} warm-up:")
    print(f"{'format':<12} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'vs eager':>9}")
    for name, row in result["rows"].items():
        print(f"{name:<12} {row['median_ms']:>10.1f} {row['min_ms']:>8.1f} {row['max_ms']:>8.1f} {row['vs_eager']:>9.2f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
