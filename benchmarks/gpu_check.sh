#!/usr/bin/env bash
# The checks of a lent GPU in one run (under 8 minutes on one H100), written to one JSON and one
# markdown file: the CUDA-marked tests, one training step of every method in fp32 / bf16 / fp16
# (the project's train step), and benchmarks/overhead.py --device cuda with the precisions as
# columns. Everything it calls is tested on CPU (tests/test_mixed_precision.py, tests/test_overhead_benchmark.py).
#
#   bash benchmarks/gpu_check.sh [OUTPUT_PREFIX]      # default output/gpu_check -> .json, .md
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
OUT="${1:-output/gpu_check}"
export PYTHONPATH="$PWD/projects${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 470 "$PY" benchmarks/gpu_check.py --device cuda --output "$OUT" --batch 8 --size 512x512 \
    --rounds 5 --warmup 2 --tests-timeout 150
