"""Config glue of the Phase-1 split: the ``<name>_hs3_reduced`` / ``<name>_hs3_analysis``
datasets a config names, registered from its ``HS3_ANALYSIS`` section (fraction, seed,
optional list of analysis images). The split itself is :func:`.analysis.split_records`.
"""
from __future__ import annotations

from typing import List, Optional

from .analysis import maybe_register_hs3_split

__all__ = ["register_config_splits", "read_analysis_files"]


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
        if name.endswith(("_hs3_reduced", "_hs3_analysis")) and maybe_register_hs3_split(
                name, h.FRACTION, h.SPLIT_SEED, files):
            done.append(name)
    return done
