"""Class weights of the pixel cross-entropy (``MODEL.SEM_SEG_HEAD.CLASS_WEIGHTS`` / ``CLASS_WEIGHTING``).

Given in the config (one weight per class), or computed from the training labels' pixel
counts (labels after the dataset's raw-value map; ignore pixels and unreadable files left
out), with ``n_c`` the pixels of class ``c``:

* ``median_frequency`` (SegNet, Eigen & Fergus): ``f_c = n_c / N_c``, ``N_c`` the labelled
  pixels of the images where ``c`` occurs; ``w_c = median(f) / f_c``, the median over the
  classes that occur. A class that never occurs gets 0 (it has no pixel to weigh).
* ``enet`` (ENet, Paszke et al.): ``p_c = n_c / sum_k n_k``; ``w_c = 1 / ln(1.02 + p_c)``.

Counting reads every training label once; the weights are kept in the dataset cache
(``$SEGDISTILL_CACHE_DIR/class_weights/``, default ``~/.cache/segdistill``), named by a
fingerprint of the label files (paths, sizes, modification times), the formula and the
label space, so later runs, every launched process and every model built from the config
read them back. They are logged when a model is built.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from detectron2.data import DatasetCatalog

from ..config import ConfigError
from .datasets.folder import dataset_check_cache_dir
from .labels import read_dataset_label

__all__ = ["CLASS_WEIGHTINGS", "ENET_C", "label_pixel_counts", "median_frequency_weights", "enet_weights",
           "dataset_class_weights", "config_class_weights"]

logger = logging.getLogger(__name__)

CLASS_WEIGHTINGS = ("none", "median_frequency", "enet")
ENET_C = 1.02
_MEMO: Dict[str, List[float]] = {}


def label_pixel_counts(dicts: Sequence[dict], num_classes: int, ignore_value: int) -> Tuple[np.ndarray, np.ndarray]:
    """(``n_c``: pixels of each class, ``N_c``: labelled pixels of the images where ``c`` occurs)."""
    pixels = np.zeros(num_classes, dtype=np.int64)
    image_pixels = np.zeros(num_classes, dtype=np.int64)
    for d in dicts:
        if "sem_seg_file_name" not in d or "unreadable" in d:
            continue
        label = read_dataset_label(d).ravel()
        label = label[(label != ignore_value) & (label >= 0) & (label < num_classes)]
        counts = np.bincount(label, minlength=num_classes)[:num_classes]
        pixels += counts
        image_pixels[counts > 0] += int(counts.sum())
    return pixels, image_pixels


def median_frequency_weights(pixels: np.ndarray, image_pixels: np.ndarray) -> np.ndarray:
    """``median(f) / f_c`` with ``f_c = n_c / N_c``; 0 for classes that never occur."""
    present = pixels > 0
    if not present.any():
        raise ValueError("No labelled pixel of any class: class weights cannot be computed.")
    freq = np.zeros(len(pixels), dtype=np.float64)
    freq[present] = pixels[present] / image_pixels[present]
    weights = np.zeros(len(pixels), dtype=np.float64)
    weights[present] = np.median(freq[present]) / freq[present]
    return weights


def enet_weights(pixels: np.ndarray, c: float = ENET_C) -> np.ndarray:
    """``1 / ln(c + p_c)`` with ``p_c = n_c / sum_k n_k``."""
    total = pixels.sum()
    if total == 0:
        raise ValueError("No labelled pixel of any class: class weights cannot be computed.")
    return 1.0 / np.log(c + pixels / total)


def _fingerprint(dicts: Sequence[dict], params: dict) -> str:
    h = hashlib.sha1(json.dumps(params, sort_keys=True).encode())
    for d in dicts:
        path = d.get("sem_seg_file_name")
        if path:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{sorted((d.get('sem_seg_value_map') or {}).items())}\n"
                     .encode())
    return h.hexdigest()


def dataset_class_weights(names: Sequence[str], method: str, num_classes: int, ignore_value: int) -> List[float]:
    """The ``method`` weights of the training sets ``names`` (cached, see the module docstring)."""
    if method not in CLASS_WEIGHTINGS[1:]:
        raise ConfigError(f"MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING {method!r}: choose from {CLASS_WEIGHTINGS}.")
    dicts = [d for name in names for d in DatasetCatalog.get(name)]
    params = {"method": method, "classes": num_classes, "ignore": ignore_value, "c": ENET_C, "v": 1}
    key = _fingerprint(dicts, params)
    if key in _MEMO:
        return list(_MEMO[key])
    path = os.path.join(os.path.dirname(dataset_check_cache_dir()), "class_weights", key + ".json")
    try:
        with open(path) as f:
            weights = [float(w) for w in json.load(f)["weights"]]
    except (OSError, ValueError, KeyError, TypeError):
        weights = None
    if weights is None or len(weights) != num_classes:
        pixels, image_pixels = label_pixel_counts(dicts, num_classes, ignore_value)
        w = median_frequency_weights(pixels, image_pixels) if method == "median_frequency" else enet_weights(pixels)
        weights = [float(x) for x in w]
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"datasets": list(names), **params, "pixels": pixels.tolist(), "weights": weights}, f)
            os.replace(tmp, path)
        except OSError as e:  # a read-only cache only costs counting again next time
            logger.debug("Cannot write the class weights %s: %s", path, e)
    logger.info("Class weights (%s of %s): %s", method, ", ".join(names), [round(w, 4) for w in weights])
    _MEMO[key] = list(weights)
    return weights


def config_class_weights(cfg) -> Optional[List[float]]:
    """The class weights of the pixel cross-entropy (heads and exits), or None for none."""
    head = cfg.MODEL.SEM_SEG_HEAD
    given = [float(w) for w in head.CLASS_WEIGHTS]
    method = head.CLASS_WEIGHTING
    if method not in CLASS_WEIGHTINGS:
        raise ConfigError(f"MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING {method!r}: choose from {CLASS_WEIGHTINGS}.")
    if given and method != "none":
        raise ConfigError(f"MODEL.SEM_SEG_HEAD.CLASS_WEIGHTS is given and CLASS_WEIGHTING is {method!r}: set one "
                          "(CLASS_WEIGHTING none to use the given weights, or CLASS_WEIGHTS [] to compute them).")
    if given:
        if len(given) != head.NUM_CLASSES or min(given) < 0:
            raise ConfigError(f"MODEL.SEM_SEG_HEAD.CLASS_WEIGHTS has {len(given)} weights {given} for "
                              f"MODEL.SEM_SEG_HEAD.NUM_CLASSES {head.NUM_CLASSES}; give one weight >= 0 per class.")
        return given
    if method == "none":
        return None
    if not cfg.DATASETS.TRAIN:
        raise ConfigError(f"MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING {method!r} counts the labels of DATASETS.TRAIN, "
                          "which is empty; give the weights (CLASS_WEIGHTS) or a training set.")
    return dataset_class_weights(list(cfg.DATASETS.TRAIN), method, head.NUM_CLASSES, head.IGNORE_VALUE)
