#!/usr/bin/env python
"""Training and inference cost of multi-exit training: none vs ds vs sr (the paper's Table 2).

    python benchmarks/sr_overhead.py                      # demo scale: DeepLabV3-R18, batch 8, 128x128
    python benchmarks/sr_overhead.py --ablation           # + MEA, MEA+SR-L, MEA+SR-F columns
    python benchmarks/sr_overhead.py --device cuda --iters 30

One process builds every mode from ``configs/demo/exits/<mode>.yaml`` with the same seed and
times SGD steps (forward, backward, update) on the same batch, the modes interleaved round
by round so that load on the machine affects them alike; the step time is the median over
rounds and is reported as a ratio to ``none``. On CPU the process's CPU time of a step is
reported too: on a shared machine it is far less sensitive to other processes than the wall
time, and it is the figure the target line uses. Memory: the bytes autograd saves for the
backward pass (any device) and, on CUDA, the peak allocated memory of a step. Parameters and
FLOPs (fvcore, one image): at training, the whole model (backbone, head, exits and
classifiers; losses not counted); at inference, the model in ``eval()`` as deployed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))

import segdistill  # noqa: E402,F401
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from segdistill import add_segdistill_config  # noqa: E402
from segdistill.modeling.heads import head_outputs  # noqa: E402

# column -> (config file, overrides); the ablation columns are the paper's Table 2 ones.
MODES = {
    "none": ("none.yaml", []),
    "ds": ("ds.yaml", []),
    "sr": ("sr.yaml", []),
}
ABLATION = {
    "MEA": ("sr.yaml", ["MODEL.EXITS.SR.F_WEIGHT", "0.0", "MODEL.EXITS.SR.L_WEIGHT", "0.0"]),
    "MEA+SR-L": ("sr.yaml", ["MODEL.EXITS.SR.F_WEIGHT", "0.0"]),
    "MEA+SR-F": ("sr.yaml", ["MODEL.EXITS.SR.L_WEIGHT", "0.0"]),
}


def load_cfg(config_dir, name, overrides, device):
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(os.path.join(config_dir, name))
    cfg.merge_from_list(list(overrides))
    if device:
        cfg.MODEL.DEVICE = device
    return cfg


def make_batch(n, size, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n):
        label = torch.randint(0, num_classes, (size // 8, size // 8), generator=g)
        label = label.repeat_interleave(8, 0).repeat_interleave(8, 1)  # blobs, a few classes per image
        label[:4] = 255
        batch.append({"image": torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8),
                      "sem_seg": label, "height": size, "width": size})
    return batch


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def train_step(model, opt, batch):
    losses = model(batch)
    loss = sum(losses.values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def saved_bytes(model, batch):
    """Bytes of the distinct tensors autograd keeps for the backward pass of one step."""
    seen = {}

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            seen[key[0]] = key[1]
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = model(batch)
    sum(losses.values()).backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


class TrainingGraph(nn.Module):
    """Everything a training step computes before the losses, as a traceable module."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        m = self.model
        feats = m.backbone(x)
        if getattr(m, "exits", None):
            out = m.forward_outputs(feats, x.shape[-2:])
            tensors = [out.final.seg_logits] + ([out.final.cls_logits] if out.final.cls_logits is not None else [])
            for e in out.exits.values():
                tensors += [e.features, e.seg_logits] + ([e.cls_logits] if e.cls_logits is not None else [])
            return tuple(tensors)
        return head_outputs(m.sem_seg_head, feats)["logits"]


def flops(model, size, device, training):
    from detectron2.utils.analysis import FlopCountAnalysis as D2Flops
    from fvcore.nn import FlopCountAnalysis

    img = make_batch(1, size, 2)[0]
    if training:
        x = ((img["image"].to(device).float() - model.pixel_mean) / model.pixel_std)[None]
        model.train()
        counter = FlopCountAnalysis(TrainingGraph(model), (x,))
    else:
        model.eval()
        if hasattr(model, "eval_exits"):
            model.eval_exits = False  # as deployed: exits off
        counter = D2Flops(model, [{"image": img["image"].to(device), "height": size, "width": size}])
    counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with torch.no_grad():
        total = counter.total()
    model.train()
    return total


def count_params(model, deployed):
    if not deployed:
        return sum(p.numel() for p in model.parameters())
    keep = set(model.deploy_state_dict()) if hasattr(model, "deploy_state_dict") else None
    return sum(p.numel() for n, p in model.named_parameters() if keep is None or n in keep)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-dir", default=os.path.join(ROOT, "configs/demo/exits"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--iters", type=int, default=10, help="timed rounds (each times every mode once)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="", help="default: MODEL.DEVICE of the configs")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--ablation", action="store_true", help="also MEA, MEA+SR-L, MEA+SR-F")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every mode")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = dict(MODES, **(ABLATION if args.ablation else {}))

    models, opts = {}, {}
    for name, (file, overrides) in modes.items():
        cfg = load_cfg(args.config_dir, file, overrides + list(args.opts), args.device)
        torch.manual_seed(0)
        models[name] = build_model(cfg).train()
        opts[name] = torch.optim.SGD(models[name].parameters(), lr=1e-3, momentum=0.9)
    device = models["none"].device
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    batch = make_batch(args.batch, args.size, num_classes)
    cuda = str(device).startswith("cuda")

    times = {m: [] for m in modes}
    cpu_times = {m: [] for m in modes}
    peak = {}
    for r in range(args.warmup + args.iters):
        for m in modes:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t, c = time.perf_counter(), time.process_time()
            train_step(models[m], opts[m], batch)
            sync(device)
            if r >= args.warmup:
                times[m].append(time.perf_counter() - t)
                cpu_times[m].append(time.process_time() - c)
            if cuda:
                peak[m] = torch.cuda.max_memory_allocated()
    saved = {m: saved_bytes(models[m], batch) for m in modes}
    stats = {}
    for m in modes:
        stats[m] = dict(
            time=statistics.median(times[m]), cpu=statistics.median(cpu_times[m]),
            params_train=count_params(models[m], False), params_infer=count_params(models[m], True),
            flops_train=flops(models[m], args.size, device, True), flops_infer=flops(models[m], args.size, device, False),
        )

    base = stats["none"]
    cols = list(modes)
    where = "CUDA " + torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nDeepLabV3-R18 demo model ({os.path.basename(args.config_dir)} configs), batch {args.batch}, "
          f"{args.size}x{args.size}, {where}; median of {args.iters} interleaved steps")
    w = max(12, *(len(c) + 2 for c in cols))
    print("| " + "metric".ljust(30) + " | " + " | ".join(c.rjust(w) for c in cols) + " |")
    print("|" + "-" * 32 + "|" + "|".join("-" * (w + 2) for _ in cols) + "|")

    def row(label, values):
        print("| " + label.ljust(30) + " | " + " | ".join(v.rjust(w) for v in values) + " |")

    row("train step (ms)", [f"{stats[c]['time'] * 1e3:.1f}" for c in cols])
    row("train step / none", [f"{stats[c]['time'] / base['time']:.3f}x" for c in cols])
    if not cuda:
        row("train step, CPU time (ms)", [f"{stats[c]['cpu'] * 1e3:.1f}" for c in cols])
        row("train step, CPU time / none", [f"{stats[c]['cpu'] / base['cpu']:.3f}x" for c in cols])
    row("saved for backward (MB)", [f"{saved[c] / 2**20:.1f}" for c in cols])
    row("saved for backward / none", [f"{saved[c] / saved['none']:.3f}x" for c in cols])
    if cuda:
        row("peak CUDA memory (MB)", [f"{peak[c] / 2**20:.1f}" for c in cols])
        row("peak CUDA memory / none", [f"{peak[c] / peak['none']:.3f}x" for c in cols])
    row("params, training (M)", [f"{stats[c]['params_train'] / 1e6:.3f}" for c in cols])
    row("params, inference (M)", [f"{stats[c]['params_infer'] / 1e6:.3f}" for c in cols])
    row("FLOPs, training, 1 image (G)", [f"{stats[c]['flops_train'] / 1e9:.3f}" for c in cols])
    row("FLOPs, inference, 1 image (G)", [f"{stats[c]['flops_infer'] / 1e9:.3f}" for c in cols])
    same = all(stats[c]["params_infer"] == base["params_infer"] and stats[c]["flops_infer"] == base["flops_infer"]
               for c in cols)
    print(f"\ninference parameters and FLOPs equal the baseline's exactly: {same}")
    key = "time" if cuda else "cpu"
    print(f"sr train step / none ({'wall' if cuda else 'CPU'} time): {stats['sr'][key] / base[key]:.3f}x (target <= 1.15x)")
    return stats


if __name__ == "__main__":
    main()
