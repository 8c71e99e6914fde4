"""HS3 (Hierarchically Supervised Semantic Segmentation) without the model: the clusters
file, Phase-1 analysis (split, confusion matrices, spectral / k-means clustering,
trade-off curves), the choice of each exit's number of clusters, and readable outputs.
See docs/hs3.md. Importing it registers the evaluator's label spaces of ``hs3`` exits.
"""
from . import label_spaces  # noqa: F401  (label-space provider for MODEL.EXITS.MODE hs3)
from .analysis import (
    TradeoffCurve, load_confusions, merge_confusion, clustered_miou, register_hs3_split, maybe_register_hs3_split,
    spectral_clusters, kmeans_clusters, split_records, tradeoff_curve,
)
from .choose import choose_k, choose_ks, constant_ratio_ks, reference_theta
from .clusters import (
    ClustersFileError, ExitClusters, HS3Clusters, ground_truth_lut, load_clusters, map_labels, save_clusters,
)

__all__ = [
    "ClustersFileError", "ExitClusters", "HS3Clusters", "load_clusters", "save_clusters", "ground_truth_lut",
    "map_labels", "split_records", "register_hs3_split", "maybe_register_hs3_split", "load_confusions",
    "merge_confusion", "clustered_miou", "spectral_clusters", "kmeans_clusters", "tradeoff_curve", "TradeoffCurve",
    "choose_k", "choose_ks", "constant_ratio_ks", "reference_theta",
]
