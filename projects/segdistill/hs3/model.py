"""What the ``hs3`` exit mode of ``MultiExitSegmentor`` reads from the config: the clusters
file validated against the model and dataset, each exit's class count, label tables and gamma.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import torch

from .analysis import maybe_register_hs3_split
from .clusters import HS3Clusters, load_clusters

__all__ = ["model_class_names", "load_model_clusters", "hs3_exit_classes", "exit_gammas", "register_config_splits",
           "read_analysis_files"]


def model_class_names(cfg) -> Union[List[str], int]:
    """The training dataset's ``stuff_classes`` when registered and of the head's size, else
    ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` (the count is then all that is checked)."""
    n = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    train = list(cfg.DATASETS.TRAIN)
    if train:
        from detectron2.data import DatasetCatalog, MetadataCatalog

        h = cfg.MODEL.EXITS.HS3
        name = train[0]
        if name not in DatasetCatalog.list():
            maybe_register_hs3_split(name, h.ANALYSIS_FRACTION, h.SPLIT_SEED, read_analysis_files(h.ANALYSIS_FILES))
        if name in DatasetCatalog.list():
            names = MetadataCatalog.get(name).get("stuff_classes", None)
            if names and len(names) == n:
                return list(names)
    return n


def read_analysis_files(path: str):
    """``MODEL.EXITS.HS3.ANALYSIS_FILES``: one image file name per line ("" = None, the seeded split)."""
    if not path:
        return None
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def load_model_clusters(cfg, exit_names: Sequence[str]) -> HS3Clusters:
    """``MODEL.EXITS.HS3.CLUSTERS_FILE`` validated against the model's classes and exits
    (``ClustersFileError`` naming the file, the exit and the values otherwise)."""
    return load_clusters(cfg.MODEL.EXITS.HS3.CLUSTERS_FILE, model_class_names(cfg), list(exit_names))


def hs3_exit_classes(cfg, exit_names: Sequence[str]) -> Tuple[List[int], Dict[str, torch.Tensor]]:
    """(K_i per exit in ``exit_names`` order, {exit: LongTensor class -> cluster, ignore kept})."""
    clusters = load_model_clusters(cfg, exit_names)
    explicit = list(cfg.MODEL.EXITS.NUM_CLASSES)
    ks = [clusters.num_clusters(e) for e in exit_names]
    if explicit and explicit != ks:
        raise ValueError(
            f"MODEL.EXITS.NUM_CLASSES {explicit} contradicts the clusters file "
            f"{cfg.MODEL.EXITS.HS3.CLUSTERS_FILE!r} ({dict(zip(exit_names, ks))}); with MODE 'hs3' leave it empty."
        )
    ignore = int(cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
    luts = {e: torch.as_tensor(clusters.lut(e, ignore), dtype=torch.long) for e in exit_names}
    return ks, luts


def exit_gammas(gammas: Sequence[float], exit_names: Sequence[str]) -> Dict[str, float]:
    """``MODEL.EXITS.HS3.GAMMAS``: one value for all exits or one per exit."""
    gammas = [float(g) for g in gammas]
    names = list(exit_names)
    if len(gammas) == 1:
        return {n: gammas[0] for n in names}
    if len(gammas) != len(names):
        raise ValueError(
            f"MODEL.EXITS.HS3.GAMMAS has {len(gammas)} values for {len(names)} exits {names}; "
            "give one for all or one per exit."
        )
    return dict(zip(names, gammas))


def register_config_splits(cfg) -> List[str]:
    """Register the HS3 split behind every ``<name>_hs3_reduced`` / ``<name>_hs3_analysis`` in
    ``DATASETS.TRAIN`` / ``DATASETS.TEST`` (fraction, seed, files from ``MODEL.EXITS.HS3``).

    ``train_net.py``'s ``setup()`` calls it, so the main process and every ``launch()``
    worker see the derived names. Returns the derived names registered (or already there)."""
    h = cfg.MODEL.EXITS.HS3
    files = read_analysis_files(h.ANALYSIS_FILES)
    done = []
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        if name.endswith(("_hs3_reduced", "_hs3_analysis")) and maybe_register_hs3_split(
                name, h.ANALYSIS_FRACTION, h.SPLIT_SEED, files):
            done.append(name)
    return done


# ---- lazy configs (configs/demo/hs3/hs3_r18.py): the same reads as from_config, as callables
def clusters_num_classes(path: str, exit_names: Sequence[str], class_names) -> List[int]:
    """K_i per exit of a validated clusters file (``class_names``: names or count)."""
    c = load_clusters(path, class_names, list(exit_names))
    return [c.num_clusters(e) for e in exit_names]


def clusters_label_luts(path: str, exit_names: Sequence[str], class_names, ignore_value: int = 255):
    """{exit: LongTensor class -> cluster} of a validated clusters file."""
    c = load_clusters(path, class_names, list(exit_names))
    return {e: torch.as_tensor(c.lut(e, ignore_value), dtype=torch.long) for e in exit_names}


def clusters_label_spaces(path: str, exit_names: Sequence[str], dataset_name: str):
    """The evaluator's ``label_spaces`` for ``sem_seg_<exit>`` (lazy configs' SemSegEvaluator)."""
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(dataset_name)
    c = load_clusters(path, list(meta.stuff_classes), list(exit_names))
    ignore = meta.get("ignore_label", 255)
    return {f"sem_seg_{e}": (c.lut(e, ignore), c.cluster_names(e)) for e in exit_names}
