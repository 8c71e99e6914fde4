"""Label spaces of prediction keys that do not predict the dataset's own classes.

An HS3 exit predicts its own clustered class set; the evaluator scores it there, mapping
the ground truth through a lookup table. ``build_label_spaces(cfg, dataset_name)`` asks
every registered provider and merges their answers, so the trainer needs no knowledge of
the methods that use it. A provider is ``fn(cfg, dataset_name) -> {key: (lut, names)}``.
"""
from __future__ import annotations

from typing import Callable, Dict, List

from .sem_seg import LabelSpace

__all__ = ["build_label_spaces", "register_label_space_provider"]

_PROVIDERS: List[Callable[..., Dict[str, LabelSpace]]] = []


def register_label_space_provider(fn: Callable[..., Dict[str, LabelSpace]]):
    """Register ``fn(cfg, dataset_name) -> {prediction key: (lut, class names)}`` (decorator)."""
    if fn not in _PROVIDERS:
        _PROVIDERS.append(fn)
    return fn


def build_label_spaces(cfg, dataset_name: str) -> Dict[str, LabelSpace]:
    spaces: Dict[str, LabelSpace] = {}
    for fn in _PROVIDERS:
        for key, space in (fn(cfg, dataset_name) or {}).items():
            if key in spaces:
                raise ValueError(f"Two label-space providers claim the prediction key {key!r}.")
            spaces[key] = space
    return spaces
