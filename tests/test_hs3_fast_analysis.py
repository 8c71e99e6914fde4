"""HS3 Phase-1's fast spectral path (hs3/analysis.py) against scikit-learn: the embedding is
the one SpectralClustering computes, the batched k-means returns scikit-learn's labels on the
same input, the whole path gives the reference's clusters on a small case, and the trade-off
curve does not depend on the number of worker processes; the benchmark runs at toy size."""
import importlib.util
import os
import warnings

import numpy as np
import pytest

from conftest import REPO
from segdistill.hs3.analysis import (
    affinity_from_confusion, spectral_clusters, spectral_clusters_reference, spectral_embedding, tradeoff_curve,
)
from segdistill.hs3.kmeans import kmeans_like_sklearn


def load_benchmark():
    spec = importlib.util.spec_from_file_location("hs3_analysis_speed",
                                                  os.path.join(REPO, "benchmarks", "hs3_analysis_speed.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


BENCH = load_benchmark()


def grouped_confusion(n, seed):
    """Classes confused mostly inside random groups, unequal sizes (the benchmark's confusions)."""
    return BENCH.synthetic_confusion(BENCH.class_groups(n, seed), 0.5, 0.3, seed)


@pytest.mark.parametrize("n,d,k,seed", [(30, 3, 4, 0), (50, 8, 12, 1), (40, 39, 38, 2), (25, 2, 2, 3), (60, 20, 30, 4)])
def test_kmeans_returns_sklearns_labels(n, d, k, seed):
    from sklearn.cluster import k_means

    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(size=(n - 3, d)), np.zeros((3, d))])  # three duplicate points (ties)
    x[: n // 3] += 3.0
    _, want, _ = k_means(x, k, random_state=np.random.RandomState(seed), n_init=10)
    got = kmeans_like_sklearn(x, k, np.random.RandomState(seed))
    assert np.array_equal(got, want)


def test_embedding_is_sklearns():
    from sklearn.manifold import spectral_embedding as sk_embedding

    conf = grouped_confusion(24, 0)
    emb = spectral_embedding(conf)
    assert emb.shape == (24, 24)
    for k in (2, 5, 11):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = sk_embedding(affinity_from_confusion(conf), n_components=k, drop_first=False,
                                random_state=np.random.RandomState(0))
        np.testing.assert_allclose(emb[:, :k], want, atol=1e-8)


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_path_gives_the_reference_clusters(seed):
    """Every K of a 19-class case, two seeds: the same assignments as scikit-learn's
    SpectralClustering (what the analysis computed before the fast path)."""
    conf = grouped_confusion(19, 10 + seed)
    emb = spectral_embedding(conf)
    for k in range(1, 20):
        fast = spectral_clusters(conf, k, seed=seed, embedding=emb)
        assert np.array_equal(fast, spectral_clusters(conf, k, seed=seed)), k  # embedding shared or not
        assert np.array_equal(fast, spectral_clusters_reference(conf, k, seed=seed)), k


def test_curve_does_not_depend_on_workers():
    conf = grouped_confusion(50, 3)
    ks = [2, 3, 7, 19, 33, 49, 50]
    one = tradeoff_curve(conf, ks, workers=1)
    two = tradeoff_curve(conf, ks, workers=2)  # forked processes where the platform has fork
    assert one.ks == two.ks == ks and one.mious == two.mious and one.assignments == two.assignments
    assert one.assignments[-1] == list(range(50)) and one.mious[-1] == pytest.approx(
        tradeoff_curve(conf, [50], lambda k: np.arange(50)).mious[0])


def test_bad_embedding_shape():
    conf = grouped_confusion(10, 0)
    with pytest.raises(ValueError, match="embedding must be"):
        spectral_clusters(conf, 3, embedding=np.zeros((10, 4)))


def test_benchmark_toy_size(capsys):
    res = BENCH.main(["--classes", "16", "--exits", "1", "--reference-every", "3"])
    out = capsys.readouterr().out
    assert "fast path, every K" in out and "reference (scikit-learn SpectralClustering per K)" in out
    assert "noise floor" in out and "speed-up" in out
    assert res["total"] == 2 * 6 and res["same"] == res["total"]  # K = 2, 5, 8, 11, 14 and 16; final + 1 exit
    assert res["fast_s"] > 0 and res["reference_s"] > 0
