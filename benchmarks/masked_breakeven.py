#!/usr/bin/env python
"""Break-even frozen share of masked (sparse) execution against the dense stage.

    python benchmarks/masked_breakeven.py                                  # 1 CPU thread, the full grid
    python benchmarks/masked_breakeven.py --widths 128 --sizes 64x128 --mask boundary
    python benchmarks/masked_breakeven.py --device cuda --output breakeven.json

For each width (channels) and map size, a stage of ``--blocks`` timm ResNet BasicBlocks
(width -> width, identity shortcuts, random weights and norm statistics, ``eval()``) runs on
one ``1 x C x H x W`` input: dense (the stage's own forward) and ``sparse``
(``segdistill.modeling.masked``, forced at every share: ``max_active`` 1) for each frozen share
of ``--frozen``. Masks: ``random`` (pixels frozen independently) or ``boundary`` (active bands
around random blobs, thickened to the share: what an exit leaves unsure). Before timing, the
sparse output is checked against ``emulate`` (the same semantics on dense tensors).

Each run is repeated ``--repeats`` times after ``--warmup``; reported: the median milliseconds
of dense and sparse, their ratio, and the counted MACs ratio (what the sparse path should
approach). The break-even frozen share of a (width, size) is where the ratio falls to 1,
interpolated linearly between the two grid shares around the first crossing after which it
stays at or below 1 (``None`` if sparse never pays on the grid); it sets
``SPARSE_MAX_ACTIVE`` (= 1 - break-even). Threads: ``torch.set_num_threads(--threads)``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from timm.models.resnet import BasicBlock  # noqa: E402

from segdistill.modeling.masked import MaskedStage, PixelMask  # noqa: E402

MASKS = ("random", "boundary")


def parse_size(text: str) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a map size is HxW (e.g. 64x128), not {text!r}") from None
    return h, w


def build_stage(width: int, blocks: int, seed: int = 0) -> nn.Sequential:
    """``blocks`` BasicBlocks of ``width`` channels with random norm statistics, in eval mode."""
    torch.manual_seed(seed)
    stage = nn.Sequential(*[BasicBlock(width, width) for _ in range(blocks)])
    with torch.no_grad():
        for m in stage.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.4, 1.0)
    return stage.eval()


def make_mask(kind: str, size: Tuple[int, int], frozen: float, seed: int) -> torch.Tensor:
    """``1 x H x W`` boolean, about ``frozen`` of the pixels frozen."""
    g = torch.Generator().manual_seed(seed)
    n_active = round((1.0 - frozen) * size[0] * size[1])
    if kind == "random":
        order = torch.randperm(size[0] * size[1], generator=g)[:n_active]
        m = torch.zeros(size[0] * size[1], dtype=torch.bool)
        m[order] = True
        return m.view(1, *size)
    # boundary: distance to the nearest blob edge, the n_active closest pixels stay active
    coarse = torch.randint(0, 3, (1, 1, max(2, size[0] // 8), max(2, size[1] // 8)), generator=g).float()
    labels = F.interpolate(coarse, size=size, mode="nearest")[0, 0]
    edge = torch.zeros(size, dtype=torch.bool)
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    dist = torch.full(size, float(sum(size)))
    dist[edge] = 0
    ring = edge.float()[None, None]
    for d in range(1, max(size)):  # grow the bands one pixel at a time (Chebyshev distance)
        grown = F.max_pool2d(ring, 3, 1, 1)[0, 0] > 0
        dist[grown & (dist > d)] = d
        ring = grown.float()[None, None]
        if grown.all():
            break
    noise = torch.rand(size, generator=g) * 0.5  # breaks ties within a distance at random
    order = torch.argsort((dist + noise).flatten())[:n_active]
    m = torch.zeros(size[0] * size[1], dtype=torch.bool)
    m[order] = True
    return m.view(1, *size)


def median_ms(fn, warmup: int, repeats: int, sync) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def break_even(frozen: Sequence[float], ratios: Sequence[float]) -> Optional[float]:
    """The frozen share where ``ratios`` (sparse / dense time, by increasing ``frozen``) falls
    to 1 for good: linear interpolation around the last crossing from above 1 (``frozen[0]``
    if it never exceeds 1, None if it ends above 1)."""
    pairs = sorted(zip(frozen, ratios))
    if pairs[-1][1] > 1.0:
        return None
    last_above = max((i for i, (_, r) in enumerate(pairs) if r > 1.0), default=None)
    if last_above is None:
        return pairs[0][0]
    (f0, r0), (f1, r1) = pairs[last_above], pairs[last_above + 1]
    return f0 + (r0 - 1.0) / (r0 - r1) * (f1 - f0)


def run(widths: Sequence[int], sizes: Sequence[Tuple[int, int]], frozen: Sequence[float], *, blocks: int, mask: str,
        device: str, warmup: int, repeats: int) -> dict:
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    rows, summary = [], []
    for width in widths:
        stage = build_stage(width, blocks).to(dev)
        compiled = MaskedStage(stage)
        for size in sizes:
            x = torch.relu(torch.randn(1, width, *size, generator=torch.Generator().manual_seed(1))).to(dev)
            with torch.no_grad():
                dense_ms = median_ms(lambda: stage(x), warmup, repeats, sync)
                full_macs = float(compiled(x, PixelMask.full(1, size, device=dev), "emulate")[1].macs[0])
            ratios = []
            for k, f in enumerate(frozen):
                pm = PixelMask(make_mask(mask, size, f, seed=k).to(dev))
                with torch.no_grad():
                    ref, _ = compiled(x, pm, "emulate")
                out, report = compiled(x, pm, "sparse", max_active=1.0, min_pixels=0)
                err = float((out - ref).abs().max())
                if err > 1e-3 * max(1.0, float(ref.abs().max())):
                    raise AssertionError(f"sparse differs from emulate by {err} (width {width}, size {size}, frozen {f})")
                # a fresh mask object per call: its per-size pools are part of the cost
                sparse_ms = median_ms(lambda: compiled(x, PixelMask(pm.active), "sparse", max_active=1.0, min_pixels=0),
                                      warmup, repeats, sync)
                ratios.append(sparse_ms / dense_ms)
                rows.append({"width": width, "size": list(size), "frozen": f, "active_share": pm.share(size),
                             "dense_ms": dense_ms, "sparse_ms": sparse_ms, "time_ratio": ratios[-1],
                             "macs_ratio": float(report.macs[0]) / full_macs})
            summary.append({"width": width, "size": list(size), "break_even_frozen": break_even(frozen, ratios)})
    return {"device": str(dev), "threads": torch.get_num_threads(), "blocks": blocks, "mask": mask,
            "warmup": warmup, "repeats": repeats, "rows": rows, "break_even": summary}


def markdown(result: dict) -> str:
    lines = [f"Masked execution vs dense: {result['blocks']} BasicBlocks, {result['mask']} masks, "
             f"{result['device']}, {result['threads']} thread(s), median of {result['repeats']}.", "",
             "| width | size | frozen | dense ms | sparse ms | time ratio | MACs ratio |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['width']} | {r['size'][0]}x{r['size'][1]} | {r['frozen']:.2f} | {r['dense_ms']:.2f} | "
                     f"{r['sparse_ms']:.2f} | {r['time_ratio']:.2f} | {r['macs_ratio']:.2f} |")
    lines += ["", "| width | size | break-even frozen share |", "|---|---|---|"]
    for s in result["break_even"]:
        b = s["break_even_frozen"]
        lines.append(f"| {s['width']} | {s['size'][0]}x{s['size'][1]} | {'never' if b is None else f'{b:.2f}'} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--sizes", type=parse_size, nargs="+", default=[(8, 10), (16, 20), (32, 40), (64, 128)])
    p.add_argument("--frozen", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--mask", choices=MASKS, default="random")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--output", default="", help="write the result as JSON here")
    args = p.parse_args(argv)
    bad = [f for f in args.frozen if not 0.0 <= f < 1.0]
    if bad:
        p.error(f"--frozen shares must lie in [0, 1), got {bad}")
    torch.set_num_threads(args.threads)
    result = run(args.widths, args.sizes, sorted(args.frozen), blocks=args.blocks, mask=args.mask, device=args.device,
                 warmup=args.warmup, repeats=args.repeats)
    print(markdown(result))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
