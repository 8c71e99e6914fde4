"""Reading label maps and checking their values, where they are read."""
from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["read_label", "read_dataset_label", "check_label_values", "LabelValueError"]


class LabelValueError(ValueError):
    """A label map holds values that are neither a class index nor the ignore value."""


def read_label(path: str) -> np.ndarray:
    """A single-channel label PNG as an HxW integer array (no copy-avoidance tricks: numpy 2)."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16", "1"):
            raise LabelValueError(
                f"Label file {path!r} has image mode {im.mode!r}: expected a single-channel "
                "PNG of class indices (RGB colour labels must be converted first; see datasets/README.md)."
            )
        return np.asarray(im).astype(np.int64, copy=False)


def read_dataset_label(record: dict) -> np.ndarray:
    """The label of a dataset dict, with the dataset's raw-value map applied.

    A dataset whose files hold raw values (CamVid's void = 11) puts the same
    ``{raw: label}`` dict in every record as ``sem_seg_value_map``; values not in it stay.
    """
    label = read_label(record["sem_seg_file_name"])
    value_map = record.get("sem_seg_value_map")
    if value_map:
        lut = np.arange(max(256, int(label.max()) + 1), dtype=np.int64)
        for raw, new in value_map.items():
            lut[raw] = new
        label = lut[label]
    return label


def check_label_values(label: np.ndarray, num_classes: int, ignore_value: int, source: str) -> None:
    """Raise LabelValueError naming ``source`` and the bad values if any pixel is outside
    ``[0, num_classes)`` and is not ``ignore_value``."""
    bad = (label < 0) | (label >= num_classes)
    if ignore_value is not None:
        bad &= label != ignore_value
    if bad.any():
        values = np.unique(label[bad])
        shown = ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
        raise LabelValueError(
            f"Label {source!r} has {int(bad.sum())} pixels with values [{shown}] outside the "
            f"{num_classes} classes [0, {num_classes - 1}] and the ignore value {ignore_value}. "
            "Raw dataset ids (e.g. COCO-Stuff before datasets/prepare_coco_stuff_164k.py) or a "
            "wrong NUM_CLASSES give this."
        )
