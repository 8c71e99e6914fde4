"""The k-means of HS3's spectral clustering: scikit-learn's ``k_means`` (greedy k-means++
initialisations, then Lloyd's iterations, the run of lowest inertia kept) reproduced label for
label, with the ``n_init`` runs advancing side by side in batched numpy operations.

Phase 1 clusters the classes for every K of a trade-off curve (up to 170 values at 171
classes); scikit-learn's per-call overhead, not the arithmetic, dominated those small
problems. :func:`kmeans_like_sklearn` draws the same random numbers in the same order and
computes every quantity a decision depends on with the same operations on arrays of the same
shapes, so it returns scikit-learn's labels (``tests/test_hs3_fast_analysis.py`` checks them).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["kmeans_like_sklearn"]


def kmeans_like_sklearn(x: np.ndarray, k: int, rng: np.random.RandomState, n_init: int = 10,
                        max_iter: int = 300, tol: float = 1e-4) -> np.ndarray:
    """Labels of ``sklearn.cluster.k_means(x, k, random_state=rng, n_init=n_init)`` (greedy
    k-means++ with ``2 + int(log k)`` local trials, then Lloyd; the run of lowest inertia),
    for small dense problems (classes x K), without scikit-learn's per-call overhead.

    The same random numbers are drawn in the same order, and every quantity a decision
    depends on is computed with the same operations on arrays of the same shapes, so the
    labels are the same; the ``n_init`` runs advance together (batched array operations),
    which is where the speed comes from. Inertias are summed in a different order, which
    matters only if two different clusterings tie to rounding error.
    """
    x = np.array(x, dtype=np.float64, order="C", copy=True)
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}].")
    tol = float(np.mean(np.var(x, axis=0)) * tol)  # scikit-learn's _tolerance, before centring
    x -= x.mean(axis=0)
    xsq = np.einsum("ij,ij->i", x, x)
    centers = _kmeans_plusplus_batched(x, xsq, k, rng, n_init)
    labels, inertia = _lloyd_batched(x, centers, max_iter, tol)
    best = 0
    for r in range(1, n_init):  # scikit-learn keeps a later run only if better and a different partition
        if inertia[r] < inertia[best] and not _same_partition(labels[r], labels[best], k):
            best = r
    return labels[best]


def _kmeans_plusplus_batched(x: np.ndarray, xsq: np.ndarray, k: int, rng: np.random.RandomState,
                             n_init: int) -> np.ndarray:
    """The ``n_init`` k-means++ initialisations scikit-learn makes one after another from
    ``rng`` (``_kmeans_plusplus`` with unit sample weights), made side by side: [n_init, k, d]."""
    n = len(x)
    trials = 2 + int(np.log(k))
    draws = rng.random_sample(n_init * (1 + (k - 1) * trials)).reshape(n_init, -1)
    cdf = (np.ones(n) / n).cumsum()  # RandomState.choice(n, p=uniform) on one draw
    cdf /= cdf[-1]
    first = cdf.searchsorted(draws[:, 0], side="right")
    steps = draws[:, 1:].reshape(n_init, k - 1, trials)
    # Squared distances from candidates to every sample, as scikit-learn computes them for a
    # (trials, d) block of candidates: -2 X_cand @ X.T + |x_cand|^2 + |x|^2. A row of such a
    # product depends on the row's position in the block (BLAS kernels treat the rows of a
    # panel differently), so the products are precomputed for every (sample, position):
    # block b holds sample (b + p) % n at position p.
    pos = np.arange(trials)
    held = (np.arange(n)[:, None] + pos[None, :]) % n  # [n, trials]: block b holds sample (b + p) % n at p
    table = -2 * (x[held] @ x.T)  # [n, trials, n]; [(i - p) % n, p]: sample i at position p
    table += xsq[held][:, :, None]
    table += xsq[None, None, :]
    np.maximum(table, 0, out=table)
    ones = np.ones(n)
    runs = np.arange(n_init)
    closest = np.empty((n_init, n))
    pot = np.empty(n_init)
    for r in range(n_init):  # the first centre's distances come from a (1, d) @ (d, n) product
        c0 = x[first[r]][None, :]
        row = -2 * (c0 @ x.T)
        row += np.einsum("ij,ij->i", c0, c0)[:, None]
        row += xsq[None, :]
        np.maximum(row, 0, out=row)
        closest[r] = row[0]
        pot[r] = (row @ ones)[0]
    index = np.empty((n_init, k), dtype=np.int64)
    index[:, 0] = first
    for c in range(1, k):
        targets = steps[:, c - 1, :] * pot[:, None]
        cums = np.cumsum(closest, axis=1)
        cand = (cums[:, None, :] < targets[:, :, None]).sum(-1)  # searchsorted(cums, targets), side left
        np.minimum(cand, n - 1, out=cand)
        dist = np.minimum(closest[:, None, :], table[(cand - pos) % n, pos])
        cand_pot = (dist @ ones[:, None])[:, :, 0]
        best = np.argmin(cand_pot, axis=1)
        pot = cand_pot[runs, best]
        closest = dist[runs, best]
        index[:, c] = cand[runs, best]
    return x[index]


def _lloyd_batched(x: np.ndarray, centers: np.ndarray, max_iter: int, tol: float) -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``_kmeans_single_lloyd`` for each run of ``centers`` [R, k, d]:
    labels [R, n] and inertias [R]."""
    runs, k, d = centers.shape
    n = len(x)
    centers = centers.copy()
    labels = np.zeros((runs, n), dtype=np.int64)
    labels_old = np.full((runs, n), -1, dtype=np.int64)
    active = np.ones(runs, dtype=bool)
    strict = np.zeros(runs, dtype=bool)
    for _ in range(max_iter):
        act = np.flatnonzero(active)
        if not len(act):
            break
        c_old = centers[act]
        lab = _assign(x, c_old)
        labels[act] = lab
        c_new, weight = _cluster_sums(x, lab, k)
        for i in np.flatnonzero((weight == 0).any(1)):
            _relocate_empty(x, c_old[i], c_new[i], weight[i], lab[i])
        _average(c_new, weight)
        shift = np.sqrt(_sq_norm_unrolled(c_new - c_old))
        centers[act] = c_new
        same = (lab == labels_old[act]).all(1)
        strict[act[same]] = True
        done = same | ((shift ** 2).sum(1) <= tol)
        active[act[done]] = False
        labels_old[act] = lab
    relabel = np.flatnonzero(~strict)  # the final E-step when not strictly converged
    if len(relabel):
        labels[relabel] = _assign(x, centers[relabel])
    inertia = _sq_norm_unrolled(x[None] - np.take_along_axis(centers, labels[:, :, None], axis=1)).sum(1)
    return labels, inertia


def _assign(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Nearest centre (first on ties) per sample, from ``|c|^2 - 2 x.c`` as scikit-learn's
    Lloyd step computes it; centers [R, k, d] -> [R, n]."""
    dist = -2 * (x[None] @ centers.transpose(0, 2, 1))
    dist += np.einsum("rkd,rkd->rk", centers, centers)[:, None, :]
    return np.argmin(dist, axis=2)


def _cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per run and cluster, the sum of its samples added one by one in sample order (as
    scikit-learn's Lloyd step adds them), and the counts: [R, k, d], [R, k]."""
    runs, n = labels.shape
    keys = (labels + k * np.arange(runs)[:, None]).ravel()
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    rows = order % n
    sums = np.zeros((runs * k, x.shape[1]))
    if len(starts) <= 8 * int(sizes.max()):  # few large clusters: one reduction per cluster
        sums[sorted_keys[starts]] = np.add.reduceat(x[rows], starts, axis=0)
    else:  # many small clusters: add the r-th member of every cluster at once, r = 0, 1, ...
        rank = np.arange(len(keys)) - np.repeat(starts, sizes)
        first = rank == 0
        sums[sorted_keys[first]] = x[rows[first]]
        for r in range(1, int(sizes.max())):
            sel = rank == r
            sums[sorted_keys[sel]] += x[rows[sel]]
    weight = np.bincount(keys, minlength=runs * k).astype(np.float64)
    return sums.reshape(runs, k, -1), weight.reshape(runs, k)


def _relocate_empty(x, c_old, c_new, weight, labels) -> None:
    """scikit-learn's ``_relocate_empty_clusters_dense``: each empty cluster takes one of the
    samples farthest from their centres (in place)."""
    empty = np.flatnonzero(weight == 0)
    dist = ((x - c_old[labels]) ** 2).sum(axis=1)
    if np.max(dist) == 0:
        return
    far = np.argpartition(dist, -len(empty))[: -len(empty) - 1: -1]
    for e, f in zip(empty, far):
        old = labels[f]
        c_new[old] -= x[f]
        c_new[e] = x[f]
        weight[e] = 1.0
        weight[old] -= 1.0


def _average(sums: np.ndarray, weight: np.ndarray) -> None:
    """Sums -> means (times the reciprocal, as scikit-learn does) in place; sums [R, k, d],
    weight [R, k]. An empty cluster (left only when every sample sits on its centre) takes
    the heaviest cluster's centre as scikit-learn's loop leaves it: already averaged if the
    heaviest comes first, still a sum if it comes later."""
    empty_runs = np.flatnonzero((weight == 0).any(1))
    heaviest = {r: (int(np.argmax(weight[r])), sums[r, np.argmax(weight[r])].copy()) for r in empty_runs}
    reciprocal = np.divide(1.0, weight, out=np.zeros_like(weight), where=weight > 0)
    sums *= reciprocal[:, :, None]
    for r, (h, unscaled) in heaviest.items():
        for j in np.flatnonzero(weight[r] == 0):
            sums[r, j] = sums[r, h] if h < j else unscaled


def _sq_norm_unrolled(diff: np.ndarray) -> np.ndarray:
    """Squared norm over the last axis summed as scikit-learn's ``_euclidean_dense_dense``
    sums it (blocks of four, then the rest)."""
    sq = diff * diff
    d = sq.shape[-1]
    blocks = d // 4
    out = np.zeros(sq.shape[:-1])
    if blocks:
        q = sq[..., : 4 * blocks].reshape(sq.shape[:-1] + (blocks, 4))
        four = ((q[..., 0] + q[..., 1]) + q[..., 2]) + q[..., 3]
        for j in range(blocks):
            out += four[..., j]
    for j in range(4 * blocks, d):
        out += sq[..., j]
    return out


def _same_partition(a: np.ndarray, b: np.ndarray, k: int) -> bool:
    """Whether two labellings are the same partition (scikit-learn's _is_same_clustering)."""
    mapping = np.full(k, -1)
    for u, v in zip(a.tolist(), b.tolist()):
        if mapping[u] == -1:
            mapping[u] = v
        elif mapping[u] != v:
            return False
    return True
