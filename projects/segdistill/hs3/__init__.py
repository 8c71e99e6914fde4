"""HS3 (Hierarchically Supervised Semantic Segmentation), the offline Phase 1: the analysis
split, confusion matrices, spectral / k-means clustering, trade-off curves, the choice of
each exit's number of clusters, and readable outputs (the clusters file, curves, report).
See docs/hs3.md. The model side (the ``hs3`` exit mode, HS3-Fuse, reading the clusters file)
is :mod:`segdistill.modeling.exits.hs3`; the clusters file format is
:mod:`segdistill.modeling.exits.hs3_clusters` (re-exported here: Phase 1 writes it).
"""
from ..modeling.exits.hs3_clusters import (
    ClustersFileError, ExitClusters, HS3Clusters, clusters_from_dict, ground_truth_lut, load_clusters, map_labels,
    save_clusters,
)
from .analysis import (
    ANALYSIS_SUFFIX, REDUCED_SUFFIX, TradeoffCurve, load_confusions, merge_confusion, clustered_miou, register_hs3_split, maybe_register_hs3_split,
    spectral_clusters, kmeans_clusters, split_records, tradeoff_curve,
)
from .choose import choose_k, choose_ks, constant_ratio_ks, reference_theta
from .splits import read_analysis_files, register_config_splits

__all__ = [
    "ClustersFileError", "ExitClusters", "HS3Clusters", "load_clusters", "save_clusters", "clusters_from_dict",
    "ground_truth_lut", "map_labels", "split_records", "ANALYSIS_SUFFIX", "REDUCED_SUFFIX", "read_analysis_files", "register_hs3_split", "maybe_register_hs3_split",
    "register_config_splits", "load_confusions", "merge_confusion", "clustered_miou", "spectral_clusters",
    "kmeans_clusters", "tradeoff_curve", "TradeoffCurve", "choose_k", "choose_ks", "constant_ratio_ks",
    "reference_theta",
]
