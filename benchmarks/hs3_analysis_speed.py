#!/usr/bin/env python
"""Speed and agreement of HS3's Phase-1 analysis: the fast spectral path against the
reference (scikit-learn's ``SpectralClustering`` for every K), measured in one run.

    python benchmarks/hs3_analysis_speed.py                         # 171 classes, every K, 3 exits + final
    python benchmarks/hs3_analysis_speed.py --reference-every 10    # the reference on every 10th K only (faster)
    python benchmarks/hs3_analysis_speed.py --classes 19 --exits 1  # toy size

The confusion matrices are synthetic, shaped like COCO-Stuff's (171 classes, confused mostly
inside their official supercategory, unequal class sizes, exits less accurate than the
final output); with ``--classes`` other than 171, classes are grouped at random.

Printed: the time of the trade-off curves (every stage, every K of the grid; wall and CPU
seconds) by the fast path and by the reference on the same K values, and their ratio; how
many (stage, K) clusterings are identical; the largest difference between the two clustered
mIoU curves; the K the paper's rule chooses per exit with each path and whether those
clusters are identical. Because the reference's own result moves with rounding (k-means++
can be left to choose between candidates whose potentials tie to rounding error, and the
two paths' eigenvectors differ by ~1e-12), the same statistics are printed for the fast
path against itself on the confusion perturbed by one part in 1e12: the noise floor.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _threads_from_argv(argv) -> str:
    return argv[argv.index("--threads") + 1] if "--threads" in argv[:-1] else "1"


if __name__ == "__main__":  # BLAS reads its thread count when numpy loads it
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, _threads_from_argv(sys.argv))

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))

from segdistill.hs3.analysis import (  # noqa: E402
    clustered_miou, default_k_grid, spectral_clusters_reference, tradeoff_curve,
)
from segdistill.hs3.choose import choose_ks  # noqa: E402

# (share of pixels right, share confused inside the group) of the final output and exits, deep to shallow
STAGES = [("final", 0.80, 0.12), ("res5", 0.70, 0.18), ("res4", 0.55, 0.28), ("res3", 0.40, 0.35)]


def class_groups(n: int, seed: int) -> np.ndarray:
    if n == 171:
        from segdistill.data.datasets.coco_stuff_meta import COCO_STUFF_SUPERCATEGORY

        names = list(dict.fromkeys(COCO_STUFF_SUPERCATEGORY))
        return np.array([names.index(s) for s in COCO_STUFF_SUPERCATEGORY])
    return np.random.default_rng(seed).integers(0, max(2, n // 6), n)


def synthetic_confusion(groups: np.ndarray, p_correct: float, p_group: float, seed: int) -> np.ndarray:
    """conf[gt, pred] counts: a share of each class's pixels right, a share confused inside its
    group, the rest anywhere, with per-class noise and class sizes over two orders of magnitude."""
    rng = np.random.default_rng(seed)
    n = len(groups)
    sizes = np.exp(rng.uniform(np.log(2e3), np.log(2e5), n)).astype(np.int64)
    conf = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        mates = np.flatnonzero((groups == groups[i]) & (np.arange(n) != i))
        w = np.full(n, (1 - p_correct - (p_group if len(mates) else 0.0)) / n)
        w[i] += p_correct
        if len(mates):
            w[mates] += p_group * rng.dirichlet(np.ones(len(mates)))
        w *= rng.uniform(0.5, 1.5, n)
        conf[i] = rng.multinomial(sizes[i], w / w.sum())
    return conf


def _cpu_seconds():
    """CPU time of this process and of its finished children (the fast path's worker processes)."""
    import resource

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def timed(fn):
    w, c = time.perf_counter(), _cpu_seconds()
    out = fn()
    return out, time.perf_counter() - w, _cpu_seconds() - c


def compare(name, a, b, ks, n, final_miou):
    """Agreement of two {stage: TradeoffCurve} on the K values in ks."""
    same = total = 0
    dmax = 0.0
    for s in a:
        for k in ks:
            total += 1
            same += bool(np.array_equal(a[s].assignment(k), b[s].assignment(k)))
            dmax = max(dmax, abs(a[s].miou(k) - b[s].miou(k)))
    print(f"{name}: identical clusterings {same}/{total} (stage, K); largest clustered-mIoU difference "
          f"{dmax:.3f} points")
    ca = choose_ks({s: a[s] for s in a}, n, final_miou)
    cb = choose_ks({s: b[s] for s in b}, n, final_miou)
    for s in ca:
        same_clusters = ca[s] == cb[s] and np.array_equal(a[s].assignment(ca[s]), b[s].assignment(cb[s]))
        print(f"  exit {s}: K chosen {ca[s]} vs {cb[s]} (theta through the origin); "
              f"clusters {'identical' if same_clusters else 'differ'}")
    return same, total, dmax


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=171)
    p.add_argument("--exits", type=int, default=3, help="exits besides the final output (at most 3)")
    p.add_argument("--reference-every", type=int, default=1,
                   help="run the reference on every N-th K of the grid only (the fast path runs every K)")
    p.add_argument("--no-reference", action="store_true", help="time the fast path only")
    p.add_argument("--seed", type=int, default=0, help="clustering seed")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic confusions")
    p.add_argument("--workers", type=int, default=0,
                   help="processes of the fast path (0: one per available CPU, 1: none); the reference uses one")
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS/OpenMP threads (when run as a script; OMP_NUM_THREADS etc. win if set)")
    args = p.parse_args(argv)
    n = args.classes
    groups = class_groups(n, args.data_seed)
    stages = STAGES[: 1 + max(0, min(3, args.exits))]
    confs = {s: synthetic_confusion(groups, pc, pg, args.data_seed + i) for i, (s, pc, pg) in enumerate(stages)}
    ks = default_k_grid(n)
    final_miou = clustered_miou(confs["final"], np.arange(n))
    print(f"HS3 Phase-1 analysis: {n} classes, {len(stages) - 1} exits + final, {len(ks)} K values "
          f"({ks[0]}..{ks[-1]}), seed {args.seed}, {os.cpu_count()} CPUs, BLAS threads "
          f"{os.environ.get('OPENBLAS_NUM_THREADS', os.environ.get('OMP_NUM_THREADS', 'default'))}, "
          f"load average {os.getloadavg()[0]:.1f}")

    fast, wall, cpu = timed(lambda: {s: tradeoff_curve(c, ks, stage=s, seed=args.seed, workers=args.workers)
                                     for s, c in confs.items()})
    print(f"fast path, every K: {wall:.2f} s wall, {cpu:.2f} s CPU (workers: {args.workers or 'one per CPU'})")

    rng = np.random.default_rng(1)
    noisy = {s: c * (1 + 1e-12 * rng.standard_normal(c.shape)) for s, c in confs.items()}
    floor = {s: tradeoff_curve(c, ks, stage=s, seed=args.seed, workers=args.workers) for s, c in noisy.items()}
    compare("noise floor (fast path vs itself on the confusion x (1 + 1e-12 noise))", fast, floor, ks, n, final_miou)

    if args.no_reference:
        return {"fast_s": wall}
    sub = ks[:: max(1, args.reference_every)]
    if sub[-1] != ks[-1]:
        sub.append(ks[-1])

    def reference():
        return {s: tradeoff_curve(c, sub, lambda k, c=c: spectral_clusters_reference(c, k, seed=args.seed), stage=s)
                for s, c in confs.items()}

    ref, rwall, rcpu = timed(reference)
    frac = len(sub) / len(ks)
    print(f"reference (scikit-learn SpectralClustering per K), {len(sub)} of {len(ks)} K values: {rwall:.2f} s wall, "
          f"{rcpu:.2f} s CPU" + ("" if frac == 1 else f" (every K: ~{rwall / frac:.0f} s wall, extrapolated)"))
    print(f"speed-up on every K: {rwall / frac / wall:.0f}x wall, {rcpu / frac / cpu:.0f}x CPU")
    if frac == 1:
        same, total, dmax = compare("fast vs reference", fast, ref, ks, n, final_miou)
    else:
        fast_sub = {s: type(c)(s, sub, [c.miou(k) for k in sub], [list(c.assignment(k)) for k in sub])
                    for s, c in fast.items()}
        same, total, dmax = compare("fast vs reference (K values of the reference)", fast_sub, ref, sub, n, final_miou)
    return {"fast_s": wall, "reference_s": rwall / frac, "same": same, "total": total, "max_miou_diff": dmax}


if __name__ == "__main__":
    main()
