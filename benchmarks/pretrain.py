#!/usr/bin/env python
"""Pre-train the CamVid table's backbones here, since no ImageNet weights can be downloaded.

    python benchmarks/pretrain.py resnet18_camvid mobilenetv2_camvid   # the table's two
    python benchmarks/pretrain.py resnet18_demo                        # the transfer comparison
    python benchmarks/pretrain.py --list
    python benchmarks/pretrain.py resnet18_camvid --output DIR --data-root /data/camvid [KEY VALUE ...]

Each pre-training is a plain ``train_net.py`` training of DeepLabV3 with a config of
``configs/camvid/pretrain/`` (segmentation on CamVid train minus the HS3 analysis split, or on
the demo generator at scale), run in this process with ``--resume`` into
``OUTPUT/runs/<name>/``: an interrupted pre-training continues from its last checkpoint.
When it has finished, the backbone body alone is exported as a timm-format state dict,

    OUTPUT/<name>.pth     loaded by MODEL.TIMM.CHECKPOINT (heads and exits start fresh)
    OUTPUT/<name>.json    provenance: config, command, iterations, held-out mIoU, seconds

and ``OUTPUT/<name>.pth`` existing means done (a second invocation skips it). Files are read
with ``torch.load(weights_only=True)``. ``benchmarks/camvid_table.py`` runs the pre-trainings
its rows need as the first jobs of the table (one subprocess of this script each).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "camvid", "pretrain")
DEFAULT_OUTPUT = os.path.join("output", "pretrain")
BODY_PREFIX = "backbone.body."


@dataclass(frozen=True)
class Pretrain:
    """One pre-training: a config of configs/camvid/pretrain/ and the backbone it makes."""

    name: str
    backbone: str  # MODEL.TIMM.NAME the exported weights are for
    config: str
    data: str  # "camvid" or "demo": what the backbone learns from
    description: str


PRETRAINS: Dict[str, Pretrain] = {p.name: p for p in [
    Pretrain("resnet18_camvid", "resnet18", "resnet18_camvid.yaml", "camvid",
             "ResNet-18, DeepLabV3 segmentation on CamVid train minus the HS3 analysis split"),
    Pretrain("mobilenetv2_camvid", "mobilenetv2_100", "mobilenetv2_camvid.yaml", "camvid",
             "MobileNetV2, DeepLabV3 segmentation on CamVid train minus the HS3 analysis split"),
    Pretrain("resnet50_camvid", "resnet50", "resnet50_camvid.yaml", "camvid",
             "ResNet-50, DeepLabV3 segmentation on CamVid train minus the HS3 analysis split"),
    Pretrain("resnet18_demo", "resnet18", "resnet18_demo.yaml", "demo",
             "ResNet-18, DeepLabV3 segmentation on 3000 generated demo scenes (no CamVid image)"),
]}

# The demo generator at scale (configs/camvid/pretrain/resnet18_demo.yaml): registered by this
# script only, generated under $DETECTRON2_DATASETS/segdistill_demo_pretrain on first use.
DEMO_PRETRAIN = "segdistill_demo_pretrain"
DEMO_PRETRAIN_SIZE = dict(num_train=3000, num_val=200, height=180, width=240, seed=14)


def weights_path(output: str, name: str) -> str:
    return os.path.join(os.path.abspath(output), f"{name}.pth")


def run_folder(output: str, name: str) -> str:
    return os.path.join(os.path.abspath(output), "runs", name)


def get(name: str) -> Pretrain:
    if name not in PRETRAINS:
        raise SystemExit(f"[pretrain] unknown pre-training {name!r}; choose from {sorted(PRETRAINS)}")
    return PRETRAINS[name]


def worker_cmd(name: str, output: str, opts: Sequence[str] = ()) -> List[str]:
    """The command that runs (or resumes) one pre-training and exports its backbone."""
    return [sys.executable, os.path.abspath(__file__), "--output", os.path.abspath(output), name] + list(opts)


def register_demo_pretrain() -> None:
    """``segdistill_demo_pretrain_{train,val}``: the demo generator at the size above."""
    from segdistill.data.datasets.demo import DEMO_SPECS, DemoSpec, register_demo
    from segdistill.data.datasets.paths import datasets_root

    if DEMO_PRETRAIN not in DEMO_SPECS:
        DEMO_SPECS[DEMO_PRETRAIN] = DemoSpec(**DEMO_PRETRAIN_SIZE)
    register_demo(datasets_root())


def export_backbone(checkpoint: str, out_path: str, backbone: str) -> int:
    """Write the backbone body of a detectron2 checkpoint as a timm state dict; returns its tensors.

    Checks that the file covers every tensor of ``backbone``'s timm ``features_only`` body,
    so that MODEL.TIMM.CHECKPOINT loads it with nothing missing.
    """
    import timm
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = state.get("model", state)
    body = {k[len(BODY_PREFIX):]: v for k, v in model.items() if k.startswith(BODY_PREFIX)}
    if not body:
        raise ValueError(f"{checkpoint!r} has no '{BODY_PREFIX}*' tensors: not a build_timm_backbone model")
    want = timm.create_model(backbone, pretrained=False, features_only=True).state_dict()
    missing = sorted(set(want) - set(body))
    wrong = sorted(k for k in want if k in body and tuple(body[k].shape) != tuple(want[k].shape))
    if missing or wrong:
        raise ValueError(f"{checkpoint!r} does not hold a whole {backbone} body: missing {missing[:5]}, "
                         f"wrong shapes {wrong[:5]}")
    tmp = out_path + ".tmp"
    torch.save(body, tmp)
    os.replace(tmp, out_path)
    return len(body)


def last_eval(metrics_path: str) -> dict:
    found = {}
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                if '"sem_seg/mIoU"' in line:
                    found = json.loads(line)
    return {k: v for k, v in found.items() if k.split("/")[-1] in ("mIoU", "mACC", "pACC", "fwIoU")}


def pretrain(name: str, output: str = DEFAULT_OUTPUT, opts: Sequence[str] = ()) -> str:
    """Run (or resume) pre-training ``name`` in this process and export its backbone; returns the path."""
    p = get(name)
    out = weights_path(output, name)
    if os.path.isfile(out):
        print(f"[pretrain] {name}: done already ({out})", flush=True)
        return out
    folder = run_folder(output, name)
    sys.path.insert(0, ROOT)
    import segdistill  # noqa: F401  (registers datasets and models)
    import train_net

    if p.data == "demo":
        register_demo_pretrain()
    config = os.path.join(CONFIGS, p.config)
    args = train_net.argument_parser().parse_args(
        ["--config-file", config, "--resume", "SEED", "0", "OUTPUT_DIR", folder] + list(opts))
    t0 = time.time()
    print(f"[pretrain] {name}: {p.description}; training in {folder} (log.txt there)", flush=True)
    train_net.main(args)
    final = os.path.join(folder, "model_final.pth")
    if not os.path.isfile(final):
        raise SystemExit(f"[pretrain] {name}: training ended without {final}")
    n = export_backbone(final, out, p.backbone)
    info = {
        "name": name, "backbone": p.backbone, "data": p.data, "description": p.description,
        "config": os.path.relpath(config, ROOT), "opts": list(opts),
        "command": "python benchmarks/pretrain.py " + " ".join([name] + list(opts)),
        "held_out": last_eval(os.path.join(folder, "metrics.json")),
        "seconds_this_invocation": time.time() - t0, "tensors": n, "weights": out,
    }
    with open(os.path.join(os.path.dirname(out), f"{name}.json"), "w") as f:
        json.dump(info, f, indent=1)
    miou = info["held_out"].get("sem_seg/mIoU", float("nan"))
    print(f"[pretrain] {name}: exported {n} tensors to {out} (held-out mIoU {miou:.1f})", flush=True)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="pre-trainings to run: " + ", ".join(PRETRAINS))
    p.add_argument("--output", default=DEFAULT_OUTPUT, help="folder of the runs and the exported backbones")
    p.add_argument("--data-root", default="", help="CamVid folder (default: $SEGDISTILL_CAMVID_ROOT)")
    p.add_argument("--list", action="store_true", help="list the pre-trainings and what is done")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides of the training")
    args = p.parse_args(argv)
    # KEY VALUE pairs may also follow the names directly (as camvid_table.py passes them)
    names = [n for n in args.names if n in PRETRAINS]
    extra = [n for n in args.names if n not in PRETRAINS]
    if extra and "." not in extra[0]:
        p.error(f"unknown pre-training {extra[0]!r}; choose from {sorted(PRETRAINS)}")
    args.names, args.opts = names, extra + list(args.opts)
    if len(args.opts) % 2:
        p.error(f"overrides come as KEY VALUE pairs, got {args.opts}")
    if not args.names and not args.list:
        p.error("name at least one pre-training (or --list)")
    return args


def main(argv=None) -> List[str]:
    args = parse_args(argv)
    if args.list:
        for p in PRETRAINS.values():
            state = "done" if os.path.isfile(weights_path(args.output, p.name)) else "not run"
            print(f"{p.name:20s} {state:8s} {p.description}")
        return []
    if args.data_root:
        os.environ["SEGDISTILL_CAMVID_ROOT"] = os.path.abspath(args.data_root)
        if "segdistill" in sys.modules:  # registered on import, with the root of that time
            from segdistill.data.datasets.camvid import register_camvid

            register_camvid(os.path.abspath(args.data_root), replace=True)
    return [pretrain(n, args.output, args.opts) for n in args.names]


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(ROOT, "projects"))
    main()
