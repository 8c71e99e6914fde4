"""The evaluator's label spaces of HS3 exits: ``sem_seg_<exit>`` scored on its clusters.

Registered with :func:`segdistill.evaluation.register_label_space_provider` on import;
active only when ``cfg.MODEL.EXITS.MODE == "hs3"``. The ground truth of each exit is
mapped class -> cluster through the clusters file's lookup table (ignore stays ignore).
"""
from __future__ import annotations

from typing import Dict

from ..evaluation import LabelSpace, register_label_space_provider
from .clusters import load_clusters

__all__ = ["hs3_label_spaces", "hs3_clusters_file"]


def hs3_clusters_file(cfg) -> str:
    """The clusters file of an ``hs3`` config, or "" when the config is not in HS3 mode."""
    exits = cfg.MODEL.get("EXITS")
    if not exits or exits.get("MODE") != "hs3":
        return ""
    hs3 = exits.get("HS3")
    path = hs3.get("CLUSTERS_FILE", "") if hs3 is not None else ""
    if not path:
        raise ValueError("MODEL.EXITS.MODE is 'hs3' but MODEL.EXITS.HS3.CLUSTERS_FILE is empty: make the "
                         "clusters file with tools/hs3_analyze.py (docs/hs3.md).")
    return path


@register_label_space_provider
def hs3_label_spaces(cfg, dataset_name: str) -> Dict[str, LabelSpace]:
    """``{"sem_seg_<exit>": (lut, cluster names)}`` for every exit of the clusters file,
    validated against the dataset's classes and ``MODEL.EXITS.IN_FEATURES``; ``{}`` when
    the config is not HS3."""
    path = hs3_clusters_file(cfg)
    if not path:
        return {}
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(dataset_name)
    names = meta.get("stuff_classes", None)
    ignore = meta.get("ignore_label", 255)
    exits = cfg.MODEL.EXITS.get("IN_FEATURES", None)  # the model's exit names, when the config has them
    clusters = load_clusters(path, class_names=list(names) if names else None, exit_names=list(exits) if exits else None)
    return {f"sem_seg_{e}": (clusters.lut(e, ignore), clusters.cluster_names(e)) for e in clusters.exits}
