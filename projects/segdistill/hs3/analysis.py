"""HS3 Phase 1 (paper section 3.1): confusion matrices, clustering, trade-off curves.

1. The training set is split into a *reduced training* set (train a deep-supervision
   model on it) and an *analysis* set (evaluate it there): :mod:`.splits`.
2. The evaluator saves one confusion matrix per output (``confusion_sem_seg.npy`` for the
   final output, ``confusion_sem_seg_<exit>.npy`` per exit): :func:`load_confusions`.
3. For every stage and every K, the classes are clustered (spectral clustering of the
   symmetric confusion ``A = (C + C^T) / 2``, whose k-means is :mod:`.kmeans`, or k-means
   of per-class features) and the clustered mIoU is computed from the same confusion matrix
   by merging its rows and columns (:func:`merge_confusion`): no second inference pass.
   This gives the performance-complexity curve of each stage (:func:`tradeoff_curve`).

Normalisation of the affinity. The paper writes ``A_i = (C_i + C_i^T)/2`` without saying
whether ``C_i`` holds pixel counts or rates. Counts make frequent classes (road, sky)
dominate every affinity and leave rare classes (pole, sign) to be clustered by their
size rather than by how they are confused, so the default is the *row-normalised*
confusion ``R[g, p] = C[g, p] / sum_p C[g, p]`` (the share of class g's pixels predicted
as p, the quantity that costs g its IoU), symmetrised: ``A = (R + R^T) / 2``.
``normalize="none"`` uses raw counts (scaled to a maximum of 1). The diagonal is set to 0
(it is not an affinity between two classes; the normalised Laplacian ignores it anyway),
and a tiny constant (1e-6 of the largest affinity) keeps the graph connected when some
classes are never confused (a class absent from the analysis set, or a perfect block).
"""
from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..evaluation.metrics import metrics_from_confusion
from ..modeling.exits.hs3_clusters import canonical_assignment
from .kmeans import kmeans_like_sklearn

__all__ = [
    "load_confusions", "StageConfusion", "FINAL_KEY",
    "affinity_from_confusion", "spectral_embedding", "spectral_clusters", "spectral_clusters_reference",
    "kmeans_clusters", "merge_confusion",
    "clustered_miou", "TradeoffCurve", "tradeoff_curve", "default_k_grid", "parse_k_grid",
]

logger = logging.getLogger(__name__)

FINAL_KEY = "sem_seg"  # the evaluator's key of the final output; exits are sem_seg_<exit>


# ----------------------------------------------------------------------------- confusion files


@dataclass
class StageConfusion:
    """One stage's confusion matrix (``conf[gt, pred]``) and where it came from."""

    key: str  # evaluator key: sem_seg or sem_seg_<exit>
    conf: np.ndarray
    class_names: List[str]
    path: str

    @property
    def stage(self) -> str:
        """'final' for the final output, else the exit name."""
        return "final" if self.key == FINAL_KEY else self.key[len(FINAL_KEY) + 1:]


def load_confusions(folder: str, class_names: Optional[Sequence[str]] = None) -> Dict[str, StageConfusion]:
    """The evaluator's ``confusion_<key>.npy`` (+ ``.json`` for class names) in ``folder``,
    keyed by stage ('final' and exit names), final first then exits in name order.

    Every matrix must be over the same full class set (Phase 1 needs a deep-supervision
    run, whose exits predict every class); anything else is an error naming the file.
    """
    paths = sorted(glob.glob(os.path.join(folder, "confusion_sem_seg*.npy")))
    jsons = sorted(glob.glob(os.path.join(folder, "confusion_sem_seg*.json")))
    keys = {os.path.basename(p)[len("confusion_"):-4]: p for p in paths}
    for j in jsons:  # a .json alone also holds the matrix
        keys.setdefault(os.path.basename(j)[len("confusion_"):-5], j)
    keys = {k: p for k, p in keys.items() if k == FINAL_KEY or k.startswith(FINAL_KEY + "_")}
    if FINAL_KEY not in keys:
        raise FileNotFoundError(
            f"No confusion_{FINAL_KEY}.npy in {folder!r}: give the folder where the evaluator of the "
            "Phase-1 (deep supervision) run wrote its confusion matrices (OUTPUT_DIR/inference)."
        )
    out: Dict[str, StageConfusion] = {}
    for key in sorted(keys, key=lambda k: (k != FINAL_KEY, k)):
        path = keys[key]
        meta_path = os.path.splitext(path)[0] + ".json"
        meta = {}
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
        conf = np.load(path) if path.endswith(".npy") else np.asarray(meta.get("matrix"))
        if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
            raise ValueError(f"{path!r}: a confusion matrix must be square, got shape {conf.shape}.")
        if (conf < 0).any():
            raise ValueError(f"{path!r}: a confusion matrix holds counts >= 0.")
        names = list(meta.get("classes") or class_names or [f"class_{i}" for i in range(len(conf))])
        if len(names) != len(conf):
            raise ValueError(f"{path!r}: {len(conf)}x{len(conf)} matrix but {len(names)} class names.")
        sc = StageConfusion(key=key, conf=np.asarray(conf, dtype=np.float64), class_names=names, path=path)
        out[sc.stage] = sc
    final = out["final"]
    for sc in out.values():
        if sc.conf.shape != final.conf.shape:
            raise ValueError(
                f"{sc.path!r} has {len(sc.conf)} classes but the final output {len(final.conf)}: Phase 1 needs "
                "every exit on the full class set (a deep-supervision run, MODEL.EXITS.MODE ds)."
            )
        if sc.class_names != final.class_names:
            raise ValueError(f"{sc.path!r} and {final.path!r} name their classes differently.")
    if class_names is not None and list(class_names) != final.class_names:
        raise ValueError(f"The confusion files' classes {final.class_names} are not the expected {list(class_names)}.")
    if len(out) == 1:
        logger.warning("Only the final output's confusion matrix is in %s: no exit to cluster.", folder)
    return out


# ----------------------------------------------------------------------------- clustering


def affinity_from_confusion(conf: np.ndarray, normalize: str = "row") -> np.ndarray:
    """Symmetric affinity ``(R + R^T) / 2`` of a confusion matrix (see the module doc)."""
    c = np.asarray(conf, dtype=np.float64)
    if normalize == "row":
        rows = c.sum(1, keepdims=True)
        r = np.divide(c, rows, out=np.zeros_like(c), where=rows > 0)
    elif normalize == "none":
        r = c / c.max() if c.max() > 0 else c.copy()
    else:
        raise ValueError(f"normalize must be 'row' or 'none', got {normalize!r}.")
    a = (r + r.T) / 2
    np.fill_diagonal(a, 0.0)
    eps = 1e-6 * (a.max() if a.max() > 0 else 1.0)
    a = a + eps
    np.fill_diagonal(a, 0.0)
    return a


def spectral_embedding(conf: np.ndarray, normalize: str = "row") -> np.ndarray:
    """The spectral embedding of the classes, for every K at once: ``[n, n]``, row = class,
    column j = the eigenvector of the j-th smallest eigenvalue of the normalised graph
    Laplacian of :func:`affinity_from_confusion`, divided by the square root of the degree
    and signed so that its largest-magnitude entry is positive.

    Its first K columns are the embedding that scikit-learn's ``SpectralClustering(
    n_clusters=K, affinity="precomputed")`` clusters (``spectral_embedding`` with
    ``n_components=K``, ``drop_first=False``): one dense eigendecomposition replaces one
    shift-invert ARPACK solve per K. The embedding does not depend on K or on the seed.
    """
    from scipy.linalg import eigh
    from scipy.sparse.csgraph import laplacian as graph_laplacian

    lap, dd = graph_laplacian(affinity_from_confusion(conf, normalize), normed=True, return_diag=True)
    np.fill_diagonal(lap, 1.0)
    _, vectors = eigh(lap, check_finite=False)  # ascending eigenvalues
    emb = vectors.T / dd
    flip = np.sign(emb[np.arange(len(emb)), np.argmax(np.abs(emb), axis=1)])
    return np.ascontiguousarray((emb * flip[:, None]).T)


def spectral_clusters(conf: np.ndarray, k: int, seed: int = 0, normalize: str = "row", *,
                      embedding: Optional[np.ndarray] = None) -> np.ndarray:
    """Cluster index per class: spectral clustering of the confusion's symmetric affinity,
    the clusters of scikit-learn's ``SpectralClustering(n_clusters=k, affinity="precomputed",
    random_state=seed, n_init=10, assign_labels="kmeans")`` (:func:`spectral_clusters_reference`)
    computed fast: k-means on the first k columns of :func:`spectral_embedding` (pass it as
    ``embedding`` to share it across K) with the same random stream and arithmetic as
    scikit-learn's (:func:`kmeans_like_sklearn`). Canonical numbering (cluster 0 holds class 0).

    The result equals the reference's unless two choices inside k-means tie to rounding
    error (the embedding comes from a dense eigensolver instead of ARPACK, equal to about
    1e-12); ``benchmarks/hs3_analysis_speed.py`` counts the agreement.
    """
    n = len(conf)
    trivial = _trivial_clusters(k, n)
    if trivial is not None:
        return trivial
    emb = spectral_embedding(conf, normalize) if embedding is None else np.asarray(embedding)
    if emb.shape != (n, n):
        raise ValueError(f"embedding must be [{n}, {n}] (spectral_embedding of the confusion), got {emb.shape}.")
    rng = np.random.RandomState(seed)
    rng.random_sample(n)  # the ARPACK start vector scikit-learn draws from the same stream first
    labels = kmeans_like_sklearn(emb[:, :k], k, rng)
    return _full_k(canonical_assignment(labels), k, conf)


def spectral_clusters_reference(conf: np.ndarray, k: int, seed: int = 0, normalize: str = "row") -> np.ndarray:
    """:func:`spectral_clusters` through scikit-learn's ``SpectralClustering`` itself (one
    ARPACK eigensolve and one ``k_means`` per K): the reference the fast path is checked
    against (tests, ``benchmarks/hs3_analysis_speed.py``); slow (~0.6 s per K at 171 classes)."""
    n = len(conf)
    trivial = _trivial_clusters(k, n)
    if trivial is not None:
        return trivial
    import warnings

    from sklearn.cluster import SpectralClustering

    model = SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed, n_init=10, assign_labels="kmeans")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "graph not fully connected" on near-block matrices
        labels = model.fit_predict(affinity_from_confusion(conf, normalize))
    return _full_k(canonical_assignment(labels), k, conf)


def kmeans_clusters(features: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Cluster index per class from per-class mean features ``[num_classes, D]`` of an exit
    (paper 3.1.3: k-means on class embeddings, e.g. OCR object representations)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"per-class features must be [num_classes, D], got shape {x.shape}.")
    bad = np.flatnonzero(~np.isfinite(x).all(1))
    if len(bad):
        raise ValueError(f"per-class features of classes {bad.tolist()} are not finite (a class absent from the "
                         "analysis set has no mean feature; drop or fill it first).")
    n = len(x)
    _check_k(k, n)
    if k == n:
        return np.arange(n)
    from sklearn.cluster import KMeans

    labels = KMeans(n_clusters=k, random_state=seed, n_init=10).fit_predict(x)
    return _full_k(canonical_assignment(labels), k, None)


def _trivial_clusters(k: int, n: int) -> Optional[np.ndarray]:
    """K = N (every class alone) and K = 1 (one cluster) need no clustering; None otherwise."""
    _check_k(k, n)
    if k == n:
        return np.arange(n)
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    return None


def _check_k(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"number of clusters K={k} must be in [1, {n}].")


def _full_k(a: np.ndarray, k: int, conf: Optional[np.ndarray]) -> np.ndarray:
    """Clusterers may return fewer than K distinct clusters on degenerate inputs: split the
    largest clusters (their last class alone) until there are K, deterministically."""
    a = a.copy()
    while a.max() + 1 < k:
        sizes = np.bincount(a)
        big = int(np.argmax(sizes))
        a[np.flatnonzero(a == big)[-1]] = a.max() + 1
    return canonical_assignment(a)


def merge_confusion(conf: np.ndarray, assignment: Sequence[int], k: Optional[int] = None) -> np.ndarray:
    """KxK confusion of the clustered label space: ``M[I, J] = sum C[g, p]`` over g in
    cluster I and p in cluster J (ground truth and prediction both mapped to clusters)."""
    a = np.asarray(assignment, dtype=np.int64)
    c = np.asarray(conf)
    if c.shape != (len(a), len(a)):
        raise ValueError(f"confusion {c.shape} does not match an assignment of {len(a)} classes.")
    k = int(a.max()) + 1 if k is None else int(k)
    # Integer counts are summed in float64 (BLAS; numpy's integer matmul has none and took a
    # fifth of the trade-off curve's time at 171 classes): exact while every partial sum is
    # below 2**53, which size * largest |entry| bounds.
    exact_in_float = (np.issubdtype(c.dtype, np.integer) and c.size > 0
                      and max(abs(int(c.max())), abs(int(c.min()))) * c.size < 2**53)
    work = c.astype(np.float64) if exact_in_float else c
    onehot = np.zeros((len(a), k), dtype=work.dtype)
    onehot[np.arange(len(a)), a] = 1
    merged = onehot.T @ work @ onehot
    return np.rint(merged).astype(c.dtype) if exact_in_float else merged


def clustered_miou(conf: np.ndarray, assignment: Sequence[int], k: Optional[int] = None) -> float:
    """mIoU (%, classes present in the ground truth) of the clustered label space."""
    merged = merge_confusion(conf, assignment, k)
    return metrics_from_confusion(merged, [str(i) for i in range(len(merged))])["mIoU"]


def default_k_grid(num_classes: int) -> List[int]:
    """Every K from 2 to num_classes - 1 (the paper), plus num_classes (no clustering)."""
    return list(range(2, num_classes)) + [num_classes]


def parse_k_grid(spec: str, num_classes: int) -> List[int]:
    """'2-18', '2,4,8,16', '2-170:4' (start-stop:step) or '' (default); num_classes is added."""
    if not spec:
        return default_k_grid(num_classes)
    ks = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        step = 1
        if ":" in part:
            part, s = part.split(":")
            step = int(s)
        if "-" in part:
            lo, hi = (int(v) for v in part.split("-"))
            ks.update(range(lo, hi + 1, step))
        else:
            ks.add(int(part))
    bad = sorted(k for k in ks if not 1 <= k <= num_classes)
    if bad:
        raise ValueError(f"K grid {spec!r} has values {bad} outside [1, {num_classes}].")
    ks.add(num_classes)
    return sorted(ks)


@dataclass
class TradeoffCurve:
    """A stage's performance-complexity trade-off: mIoU of the clustered task for every K."""

    stage: str
    ks: List[int]
    mious: List[float]
    assignments: List[List[int]] = field(default_factory=list)

    def assignment(self, k: int) -> np.ndarray:
        return np.asarray(self.assignments[self.ks.index(k)], dtype=np.int64)

    def miou(self, k: int) -> float:
        return self.mious[self.ks.index(k)]

    def to_dict(self) -> dict:
        return {"ks": list(self.ks), "mIoU": [float(m) for m in self.mious], "assignments": [list(map(int, a)) for a in self.assignments]}

    @classmethod
    def from_dict(cls, stage: str, d: dict) -> "TradeoffCurve":
        return cls(stage, [int(k) for k in d["ks"]], [float(m) for m in d["mIoU"]], [list(a) for a in d["assignments"]])


def tradeoff_curve(
    conf: np.ndarray,
    ks: Sequence[int],
    cluster_fn: Optional[Callable[[int], np.ndarray]] = None,
    *,
    stage: str = "",
    seed: int = 0,
    normalize: str = "row",
    log_every: int = 0,
    workers: int = 0,
) -> TradeoffCurve:
    """mIoU of each K-clustering of ``conf`` (spectral by default, or ``cluster_fn(k)``,
    e.g. k-means on features), scored on ``conf`` merged by that clustering.

    The spectral default computes the embedding once and clusters the K values in
    ``workers`` processes (0: one per available CPU when there are 48 classes or more,
    else 1; 1: in this process); the result does not depend on ``workers``.
    """
    n = len(conf)
    ks = sorted(set(int(k) for k in ks))
    if cluster_fn is None:
        embedding = spectral_embedding(conf, normalize)  # one eigendecomposition for every K
        found = _spectral_assignments(conf, [k for k in ks if k < n], seed, embedding, workers)

        def cluster_fn(k):
            return found[k]
    mious, assignments = [], []
    for i, k in enumerate(ks):
        a = np.arange(n) if k == n else np.asarray(cluster_fn(k))
        mious.append(clustered_miou(conf, a, k))
        assignments.append([int(v) for v in a])
        if log_every and ((i + 1) % log_every == 0 or i + 1 == len(ks)):
            logger.info("HS3 trade-off %s: %d/%d K values (K=%d: mIoU %.2f)", stage, i + 1, len(ks), k, mious[-1])
    return TradeoffCurve(stage, list(ks), mious, assignments)


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _spectral_chunk(conf: np.ndarray, ks: Sequence[int], seed: int, embedding: np.ndarray,
                    one_thread: bool = False) -> List[np.ndarray]:
    from contextlib import nullcontext

    from threadpoolctl import threadpool_limits

    # a worker process: the CPUs are shared out between processes already
    with threadpool_limits(1) if one_thread else nullcontext():
        return [spectral_clusters(conf, k, seed=seed, embedding=embedding) for k in ks]


def _spectral_assignments(conf: np.ndarray, ks: Sequence[int], seed: int, embedding: np.ndarray,
                          workers: int) -> Dict[int, np.ndarray]:
    """{K: spectral_clusters(conf, K)} for every K in ``ks``, in ``workers`` forked processes
    (each takes every workers-th K, so the large K are shared out evenly)."""
    import multiprocessing

    if workers <= 0:
        workers = _available_cpus() if len(conf) >= 48 else 1
    workers = min(workers, len(ks))
    if workers > 1 and "fork" not in multiprocessing.get_all_start_methods():
        workers = 1  # only fork starts a worker without importing the package again (seconds)
    if workers <= 1:
        return dict(zip(ks, _spectral_chunk(conf, ks, seed, embedding)))
    from concurrent.futures import ProcessPoolExecutor

    chunks = [list(ks[i::workers]) for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(_spectral_chunk, [conf] * workers, chunks, [seed] * workers,
                                [embedding] * workers, [True] * workers))
    return {k: a for chunk, res in zip(chunks, results) for k, a in zip(chunk, res)}
