"""Online class-conditional covariance of features, as ISDA (Wang et al., NeurIPS 2019) estimates it.

Every training step, the features of the pixels of each class (labels nearest-resized to the
features' size, ignore pixels left out) update a running mean and covariance per class with
the exact pooled formulas (Chan et al.), so after any number of steps the buffers equal the
mean and the *population* covariance (divided by n) of all the pixels seen so far:

    n = n_old + n_b,  w = n_b / n,  d = mean_b - mean_old
    mean = mean_old + w d
    cov  = (1 - w) cov_old + w cov_b + w (1 - w) d d^T

``full=False`` (default) keeps only the diagonal (C x A), ``full=True`` the C x A x A
matrices. The buffers (``count``, ``mean``, ``cov``) are part of the model's state dict, so
checkpoints save them and a resumed run continues the estimate. With ``all_reduce`` the
batch statistics are summed over the processes first (two all-reduces per step), so every
process holds the same estimate, the one of the whole global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["ClassCovariance"]


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class ClassCovariance(nn.Module):
    """Running per-class mean and covariance (diagonal or full) of A-dimensional features."""

    def __init__(self, num_classes: int, feature_dim: int, *, full: bool = False, all_reduce: bool = True):
        super().__init__()
        if num_classes < 1 or feature_dim < 1:
            raise ValueError(f"ClassCovariance needs num_classes, feature_dim >= 1, got {num_classes}, {feature_dim}.")
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        self.full = bool(full)
        self.all_reduce = bool(all_reduce)
        shape = (num_classes, feature_dim, feature_dim) if full else (num_classes, feature_dim)
        # float64 count: exact up to 2**53 pixels (float32 would stop counting at 2**24).
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(num_classes, feature_dim))
        self.register_buffer("cov", torch.zeros(shape))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, "
                f"{'full' if self.full else 'diagonal'}, all_reduce={self.all_reduce}")

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.all_reduce and _world_size() > 1:
            dist.all_reduce(x)
        return x

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add the pixels of ``features`` (N x A x h x w) with their ``labels`` (N x h x w)."""
        n, a, h, w = features.shape
        if a != self.feature_dim:
            raise ValueError(f"ClassCovariance expects {self.feature_dim}-channel features, got {a}.")
        if labels.shape != (n, h, w):
            raise ValueError(f"Labels {tuple(labels.shape)} do not match features {(n, h, w)} (resize them first).")
        c = self.num_classes
        x = features.detach().float().permute(0, 2, 3, 1).reshape(-1, a)
        y = labels.reshape(-1).long()
        # Ignore pixels go to an extra class c, dropped after: no boolean selection and no
        # bincount, which read sizes on the host.
        y = torch.where((y >= 0) & (y < c), y, c)
        counts_all = torch.zeros(c + 1, device=x.device, dtype=self.count.dtype).index_add_(
            0, y, torch.ones_like(y, dtype=self.count.dtype))
        counts = self._sum(counts_all[:c].clone())
        sums = self._sum(torch.zeros(c + 1, a, device=x.device, dtype=x.dtype).index_add_(0, y, x)[:c].clone())
        mean_b = sums / counts.clamp(min=1).to(x.dtype)[:, None]
        d = x - torch.cat([mean_b, mean_b.new_zeros(1, a)])[y]
        if self.full:
            # pixels sorted by class, one A x A product per present class; the class sizes are
            # the one read of the device
            order = torch.argsort(y, stable=True)
            m2 = torch.zeros(c, a, a, device=x.device, dtype=x.dtype)
            for k, dk in enumerate(torch.split(d[order], counts_all.long().tolist())[:c]):
                if dk.shape[0]:
                    m2[k] = dk.T @ dk
        else:
            m2 = torch.zeros(c + 1, a, device=x.device, dtype=x.dtype).index_add_(0, y, d * d)[:c].clone()
        m2 = self._sum(m2)
        extra = (None,) * (m2.dim() - 1)
        cov_b = m2 / counts.clamp(min=1).to(x.dtype)[(slice(None),) + extra]

        total = self.count + counts
        wb = torch.where(total > 0, counts / total.clamp(min=1), torch.zeros_like(total)).to(x.dtype)
        delta = mean_b - self.mean
        wv = wb[(slice(None),) + extra]
        if self.full:
            spread = delta[:, :, None] * delta[:, None, :]
        else:
            spread = delta * delta
        self.cov.copy_((1 - wv) * self.cov + wv * cov_b + wv * (1 - wv) * spread)
        self.mean.add_(wb[:, None] * delta)
        self.count.copy_(total)

    def diagonal(self) -> torch.Tensor:
        """C x A per-class variances."""
        return self.cov.diagonal(dim1=1, dim2=2) if self.full else self.cov
