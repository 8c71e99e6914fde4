#!/usr/bin/env python
"""Inference cost of HS3 and HS3-Fuse (the paper's Table 3 GMACs column): baseline, HS3
(must equal the baseline exactly: the exits are dropped), HS3-Fuse and its lighter variant.

    python benchmarks/hs3_gmacs.py                                  # demo: configs/demo/hs3/hs3_r18.yaml, 160x160
    python benchmarks/hs3_gmacs.py --config-file configs/demo/hs3/hs3_hrnet.yaml
    python benchmarks/hs3_gmacs.py --config-file configs/cityscapes/hs3/ocrnet_hrnetv2_w18_hs3.yaml --size 1024 2048

GMACs are fvcore's count (one per multiply-accumulate of conv / linear / matmul; fvcore calls
them "flops"), of one image in ``eval()`` at the given size, through the deployed forward;
parameters are those of the deployed state dict. The clusters file is not needed: a synthetic
one (K_i = N / 2^(exits - i)) is written to a temporary folder (the cluster count changes only
the exits' segmenters, which HS3 drops and HS3-Fuse counts).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))

import segdistill  # noqa: E402,F401
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.analysis import FlopCountAnalysis  # noqa: E402
from segdistill import add_segdistill_config  # noqa: E402
from segdistill.convert import deployed_state_dict  # noqa: E402
from segdistill.modeling.exits.hs3_clusters import save_clusters, synthetic_clusters  # noqa: E402


def measure(cfg, size):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    kept = set(deployed_state_dict(model))
    params = sum(p.numel() for n, p in model.named_parameters() if n in kept)  # deployed parameters
    img = torch.zeros(3, *size, dtype=torch.uint8)
    counter = FlopCountAnalysis(model, [{"image": img, "height": size[0], "width": size[1]}])
    counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with torch.no_grad():
        return counter.total(), params


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="configs/demo/hs3/hs3_r18.yaml", help="an hs3 (Phase-2) config")
    p.add_argument("--size", type=int, nargs=2, default=[160, 160], metavar=("H", "W"))
    p.add_argument("--lighter-scale", type=float, default=0.5, help="FUSE.CHANNEL_SCALE of the lighter variant")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    args = p.parse_args(argv)
    base = get_cfg()
    add_segdistill_config(base)
    base.merge_from_file(os.path.join(ROOT, args.config_file) if not os.path.isabs(args.config_file) else args.config_file)
    base.merge_from_list(args.opts)
    base.MODEL.DEVICE = "cpu"
    if base.MODEL.NORM in ("auto", "SyncBN"):
        base.MODEL.NORM = "BN"
    base.DATASETS.TRAIN = ()
    tmp = tempfile.mkdtemp()
    clusters = save_clusters(os.path.join(tmp, "clusters.json"), synthetic_clusters(
        base.MODEL.SEM_SEG_HEAD.NUM_CLASSES, list(base.MODEL.EXITS.IN_FEATURES)))
    variants = {}
    c = base.clone()
    c.MODEL.META_ARCHITECTURE = "SemanticSegmentorAnySize"
    variants["baseline"] = c
    for name, fuse, scale in (("HS3", False, 1.0), ("HS3-Fuse", True, 1.0), ("HS3-Fuse (lighter)", True, args.lighter_scale)):
        c = base.clone()
        c.MODEL.EXITS.MODE = "hs3"
        c.MODEL.EXITS.EVAL_EXITS = False
        c.MODEL.EXITS.HS3.CLUSTERS_FILE = clusters
        c.MODEL.EXITS.HS3.FUSE.ENABLED = fuse
        c.MODEL.EXITS.HS3.FUSE.CHANNEL_SCALE = scale
        variants[name] = c
    rows = {name: measure(c, tuple(args.size)) for name, c in variants.items()}
    b_macs, b_params = rows["baseline"]
    print(f"{args.config_file}, one {args.size[0]}x{args.size[1]} image, eval(); GMACs = fvcore count (multiply-accumulates)")
    print("| model | GMACs | vs baseline | params (M) |\n|---|---|---|---|")
    for name, (macs, params) in rows.items():
        print(f"| {name} | {macs / 1e9:.3f} | {macs / b_macs:.3f}x | {params / 1e6:.3f} |")
    same = rows["HS3"] == rows["baseline"]
    print(f"\nHS3 inference == baseline (MACs and params): {same}")
    if not same:
        raise SystemExit("HS3 must cost exactly the baseline at inference.")
    return rows


if __name__ == "__main__":
    main()
