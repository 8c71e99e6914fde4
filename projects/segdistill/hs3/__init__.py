"""HS3 (Hierarchically Supervised Semantic Segmentation), the offline Phase 1: the analysis
split, confusion matrices, spectral / k-means clustering, trade-off curves, the choice of
each exit's number of clusters, and readable outputs (the clusters file, curves, report).
See docs/hs3.md. The model side (the ``hs3`` exit mode, HS3-Fuse, reading the clusters file)
is :mod:`segdistill.modeling.exits.hs3`; the clusters file format is
:mod:`segdistill.modeling.exits.hs3_clusters` (re-exported here: Phase 1 writes it).

Modules: :mod:`.splits` (the analysis split and its catalog names), :mod:`.analysis`
(confusion matrices, clustering, trade-off curves), :mod:`.kmeans` (scikit-learn's k-means,
batched), :mod:`.choose` (each exit's K), :mod:`.report` (the whole analysis and its outputs).
"""
from ..modeling.exits.hs3_clusters import (
    ClustersFileError, ExitClusters, HS3Clusters, clusters_from_dict, ground_truth_lut, load_clusters, map_labels,
    save_clusters,
)
from .analysis import (
    TradeoffCurve, clustered_miou, kmeans_clusters, load_confusions, merge_confusion, spectral_clusters,
    tradeoff_curve,
)
from .choose import choose_k, choose_ks, constant_ratio_ks, reference_theta
from .kmeans import kmeans_like_sklearn
from .splits import (
    ANALYSIS_SUFFIX, REDUCED_SUFFIX, hs3_split_names, maybe_register_hs3_split, read_analysis_files,
    register_config_splits, register_hs3_split, split_records,
)

__all__ = [
    "ClustersFileError", "ExitClusters", "HS3Clusters", "load_clusters", "save_clusters", "clusters_from_dict",
    "ground_truth_lut", "map_labels", "split_records", "register_hs3_split", "maybe_register_hs3_split",
    "register_config_splits", "read_analysis_files", "hs3_split_names", "REDUCED_SUFFIX", "ANALYSIS_SUFFIX",
    "load_confusions", "merge_confusion", "clustered_miou", "spectral_clusters", "kmeans_clusters",
    "kmeans_like_sklearn", "tradeoff_curve", "TradeoffCurve", "choose_k", "choose_ks", "constant_ratio_ks",
    "reference_theta",
]
