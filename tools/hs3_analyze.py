#!/usr/bin/env python
"""HS3 Phase 1: from the evaluator's confusion matrices to the clusters file (docs/hs3.md).

    python tools/hs3_analyze.py CONFUSION_DIR [--output-dir DIR] [--method spectral|kmeans|manual]
        [--theta DEG] [--ks 2-18 | 2,4,8 | 2-170:4] [--seed 0] [--normalize row|none]
        [--exits res3,res4] [--features-dir DIR] [--ratio 0.5] [--groups groups.json] [--force]

CONFUSION_DIR holds ``confusion_sem_seg.npy`` (final output) and ``confusion_sem_seg_<exit>.npy``
(+ their .json) of a deep-supervision model evaluated on the analysis set (the evaluator
writes them to OUTPUT_DIR/inference/<dataset>/ or OUTPUT_DIR/inference/). Writes
curves.json, clusters.json, tradeoff.png and report.md to --output-dir (default
CONFUSION_DIR/hs3); steps whose outputs exist with the same inputs are skipped unless --force.
"""
import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects"))

from segdistill.hs3.report import METHODS, run_hs3_analysis  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("confusion_dir")
    p.add_argument("--output-dir", help="default: CONFUSION_DIR/hs3")
    p.add_argument("--method", choices=METHODS, default="spectral")
    p.add_argument("--theta", type=float, default=None,
                   help="trade-off angle in degrees (0 = deep supervision, 90 = exits match the final mIoU); "
                        "default: the paper's line through the origin")
    p.add_argument("--ks", default="", help="K grid: '2-18', '2,4,8', '2-170:4'; default every K from 2 to N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--normalize", choices=("row", "none"), default="row", help="confusion normalisation of the affinity")
    p.add_argument("--exits", default="", help="comma-separated exits, shallow to deep (default: all, weakest first)")
    p.add_argument("--features-dir", help="kmeans: features_<exit>.npy, per-class mean features [N, D]")
    p.add_argument("--ratio", type=float, default=0.5, help="manual: classes of an exit / classes of the next stage")
    p.add_argument("--groups", help="manual: JSON {exit: [[class names], ...]}; default: spectral clustering")
    p.add_argument("--force", action="store_true", help="redo every step even if its output is up to date")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    groups = None
    if args.groups:
        with open(args.groups) as f:
            groups = json.load(f)
    paths = run_hs3_analysis(
        args.confusion_dir, args.output_dir, method=args.method, theta=args.theta, k_grid=args.ks, seed=args.seed,
        normalize=args.normalize, exits=[e for e in args.exits.split(",") if e] or None,
        features_dir=args.features_dir, ratio=args.ratio, groups=groups, force=args.force,
    )
    for k, v in paths.items():
        print(f"{k}: {v}")
    return paths


if __name__ == "__main__":
    main()
