"""The Phase-1 split of HS3 and its catalog names.

The training set is split into a *reduced training* set (Phase 1 trains a deep-supervision
model on it) and an *analysis* set (the model is evaluated there, and the confusion matrices
of that evaluation are clustered): :func:`split_records`. The two parts are registered as
``<name>_hs3_reduced`` / ``<name>_hs3_analysis`` (:func:`register_hs3_split`), so configs
and tools name them like any dataset; :func:`register_config_splits` registers the ones a
config names, from its ``HS3_ANALYSIS`` section (fraction, seed, optional list of analysis
images).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = [
    "split_records", "hs3_split_names", "register_hs3_split", "maybe_register_hs3_split", "register_config_splits",
    "read_analysis_files", "REDUCED_SUFFIX", "ANALYSIS_SUFFIX",
]

REDUCED_SUFFIX = "_hs3_reduced"
ANALYSIS_SUFFIX = "_hs3_analysis"


def split_records(
    records: Sequence[dict],
    analysis_fraction: float = 0.1,
    seed: int = 0,
    analysis_files: Optional[Sequence[str]] = None,
) -> Tuple[List[dict], List[dict]]:
    """Split dataset dicts into (reduced training, analysis) sets, disjoint and covering.

    Deterministic: the records are ordered by ``file_name`` before a seeded permutation,
    so the same files land in the same set whatever the input order or process.
    ``round(fraction * n)`` records (at least 1, at most n - 1) go to the analysis set.
    With ``analysis_files`` (full paths, or base names when unique) those records form the
    analysis set instead; a name that matches no record is an error. Each output keeps
    the input order.
    """
    n = len(records)
    names = [str(r["file_name"]) for r in records]
    if len(set(names)) != n:
        raise ValueError("Dataset records share file names; the HS3 split identifies records by file_name.")
    if analysis_files is not None:
        wanted = {str(f) for f in analysis_files}
        by_full = {nm: i for i, nm in enumerate(names)}
        by_base: Dict[str, List[int]] = {}
        for i, nm in enumerate(names):
            by_base.setdefault(os.path.basename(nm), []).append(i)
        chosen = set()
        unknown = []
        for f in sorted(wanted):
            candidates = [by_full[f]] if f in by_full else by_base.get(os.path.basename(f), [])
            if len(candidates) > 1:
                raise ValueError(f"Analysis file {f!r} matches several records by its base name; give its full path.")
            if candidates:
                chosen.add(candidates[0])
            else:
                unknown.append(f)
        if unknown:
            raise ValueError(f"Analysis files not in the dataset: {sorted(unknown)[:10]} ({len(unknown)} in all).")
        if not chosen or len(chosen) == n:
            raise ValueError(f"The analysis files select {len(chosen)} of {n} records; both sets must be non-empty.")
    else:
        if not 0.0 < analysis_fraction < 1.0:
            raise ValueError(f"analysis_fraction must be in (0, 1), got {analysis_fraction}.")
        if n < 2:
            raise ValueError(f"Cannot split {n} record(s) into a reduced training and an analysis set.")
        k = min(n - 1, max(1, int(round(analysis_fraction * n))))
        order = sorted(range(n), key=lambda i: names[i])
        perm = np.random.default_rng(seed).permutation(n)
        chosen = {order[i] for i in perm[:k]}
    reduced = [r for i, r in enumerate(records) if i not in chosen]
    analysis = [r for i, r in enumerate(records) if i in chosen]
    return reduced, analysis


def hs3_split_names(dataset_name: str) -> Tuple[str, str]:
    """Derived catalog names: (``<name>_hs3_reduced``, ``<name>_hs3_analysis``)."""
    return dataset_name + REDUCED_SUFFIX, dataset_name + ANALYSIS_SUFFIX


def register_hs3_split(
    dataset_name: str,
    analysis_fraction: float = 0.1,
    seed: int = 0,
    analysis_files: Optional[Sequence[str]] = None,
) -> Tuple[str, str]:
    """Register ``<name>_hs3_reduced`` and ``<name>_hs3_analysis`` in DatasetCatalog, with
    the parent's metadata copied; idempotent (already registered names are kept).

    The records are split lazily, when a subset is first asked for, so registering on
    import costs nothing. Returns the two names.
    """
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(f"Dataset {dataset_name!r} is not registered; cannot derive its HS3 split.")
    names = hs3_split_names(dataset_name)
    files = list(analysis_files) if analysis_files is not None else None
    meta = {k: v for k, v in MetadataCatalog.get(dataset_name).as_dict().items() if k != "name"}
    for which, name in enumerate(names):
        if name in DatasetCatalog.list():
            continue

        def load(which=which):
            parts = split_records(DatasetCatalog.get(dataset_name), analysis_fraction, seed, files)
            return parts[which]

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(**meta, hs3_parent=dataset_name, hs3_subset=("reduced", "analysis")[which])
    return names


def maybe_register_hs3_split(name: str, analysis_fraction: float = 0.1, seed: int = 0,
                             analysis_files: Optional[Sequence[str]] = None) -> bool:
    """Register the split behind a derived name (``X_hs3_reduced`` / ``X_hs3_analysis``) when
    X is registered; True if ``name`` is (now) registered. Lets configs name the subsets."""
    if name in DatasetCatalog.list():
        return True
    for suffix in (REDUCED_SUFFIX, ANALYSIS_SUFFIX):
        if name.endswith(suffix) and name[: -len(suffix)] in DatasetCatalog.list():
            register_hs3_split(name[: -len(suffix)], analysis_fraction, seed, analysis_files)
            return True
    return False


def read_analysis_files(path: str) -> Optional[List[str]]:
    """``HS3_ANALYSIS.FILES``: one image file name per line ("" = None, the seeded split)."""
    if not path:
        return None
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def register_config_splits(cfg) -> List[str]:
    """Register the HS3 split behind every ``<name>_hs3_reduced`` / ``<name>_hs3_analysis`` in
    ``DATASETS.TRAIN`` / ``DATASETS.TEST`` (``HS3_ANALYSIS.FRACTION``, ``SPLIT_SEED``, ``FILES``).

    ``train_net.py``'s ``setup()`` calls it, so the main process and every ``launch()``
    worker see the derived names. Returns the derived names registered (or already there)."""
    h = cfg.HS3_ANALYSIS
    files = read_analysis_files(h.FILES)
    done = []
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        if name.endswith((REDUCED_SUFFIX, ANALYSIS_SUFFIX)) and maybe_register_hs3_split(
                name, h.FRACTION, h.SPLIT_SEED, files):
            done.append(name)
    return done
