"""Peak memory of CIRKD's batch term (forward + backward), accounted without running it.

The term at the papers' scale (batch 8, a 512 x 1024 crop: a 64 x 128 tap at stride 8, 8192
pixels per image, below the 256 x 256 pooling threshold) would take minutes of CPU per step, so
the script runs it on PyTorch's ``meta`` device, where every op allocates nothing and computes
nothing but still produces tensors of the right sizes, and accounts the bytes of every storage
an op creates until the last reference to it dies (autograd's saved tensors included), as an
allocator would see them. It reports the peak above the inputs for the chunked, checkpointed term
(``segdistill.modeling.distill.cirkd.batch_relation_loss``) and for the per-pair form without
checkpointing that it replaced (every pair's maps kept for the backward), against a budget.

    python benchmarks/cirkd_memory.py [--batch 8] [--height 64] [--width 128] [--channels 256]
        [--budget-gib 4]

Exit status 1 when the chunked term's peak is over the budget. Numbers: docs/distillation.md
("Cost on a GPU").
"""
from __future__ import annotations

import argparse
import os
import sys
import weakref

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects"))

from segdistill.modeling.distill.cirkd import batch_relation_loss  # noqa: E402

GIB = 1 << 30


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under the mode and still referenced; ``peak`` their maximum."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes = {}

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._sizes:  # a view of a storage already counted
            return
        self._sizes[key] = storage.nbytes()
        self.live += self._sizes[key]
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key) -> None:
        self.live -= self._sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def per_pair_loss(student, teacher, temperature):
    """The batch term as one product per image pair, every pair's maps kept for the backward
    (the form the chunked term replaced), for the comparison."""
    s, t = student.flatten(2).transpose(1, 2), teacher.detach().flatten(2).transpose(1, 2)
    total = s.new_zeros(())
    for a in range(s.shape[0]):
        for b in range(s.shape[0]):
            log_ps = F.log_softmax(s[a] @ s[b].t() / temperature, dim=1)
            log_pt = F.log_softmax(t[a] @ t[b].t() / temperature, dim=1)
            total = total + (log_pt.exp() * (log_pt - log_ps)).sum(dim=1).mean()
    return total / s.shape[0] ** 2


def peak_bytes(fn, batch: int, height: int, width: int, channels: int, device: str = "meta") -> int:
    """Peak bytes above the inputs of ``fn(student, teacher)`` + its backward (float32)."""
    student = torch.randn(batch, channels, height, width, device=device, requires_grad=True)
    teacher = torch.randn(batch, channels, height, width, device=device)
    with LiveBytes() as mode:
        fn(student, teacher).backward()
    return mode.peak


def chunked(student, teacher):
    return batch_relation_loss(student, teacher, student, teacher, 0.1)


def unchunked(student, teacher):
    return per_pair_loss(student, teacher, 0.1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="images per process")
    parser.add_argument("--height", type=int, default=64, help="the tap's height (512 x 1024 crop, stride 8: 64)")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--channels", type=int, default=256, help="embedding channels (CIRKD's ASPP output: 256)")
    parser.add_argument("--budget-gib", type=float, default=4.0)
    args = parser.parse_args(argv)
    shape = (args.batch, args.height, args.width, args.channels)
    got = peak_bytes(chunked, *shape)
    before = peak_bytes(unchunked, *shape)
    print(f"CIRKD batch term, batch {args.batch}, tap {args.height}x{args.width}, {args.channels} channels, float32:")
    print(f"  chunked + checkpointed: {got / GIB:.2f} GiB peak (budget {args.budget_gib} GiB)")
    print(f"  per pair, unchunked:    {before / GIB:.2f} GiB peak")
    ok = got <= args.budget_gib * GIB
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
