"""PASCAL VOC and PASCAL-Context label spaces: pure data (no torch/detectron2 import), so the
preparation scripts and tests can use it cheaply."""
from __future__ import annotations

import numpy as np

__all__ = ["VOC_CLASSES", "PC59", "PC59_CLASSES", "PC59_IDS", "pc59_lut"]

#: PASCAL VOC's 21 labels: 0 = background, then the 20 object classes.
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
#: (id in PASCAL-Context's 459-class labels.txt, name) of the 59 classes, in label order.
PC59 = [
    (2, "aeroplane"), (9, "bag"), (18, "bed"), (19, "bedclothes"), (22, "bench"), (23, "bicycle"), (25, "bird"),
    (31, "boat"), (33, "book"), (34, "bottle"), (44, "building"), (45, "bus"), (46, "cabinet"), (59, "car"),
    (65, "cat"), (68, "ceiling"), (72, "chair"), (80, "cloth"), (85, "computer"), (98, "cow"), (104, "cup"),
    (105, "curtain"), (113, "dog"), (115, "door"), (144, "fence"), (158, "floor"), (159, "flower"), (162, "food"),
    (187, "grass"), (189, "ground"), (207, "horse"), (220, "keyboard"), (232, "light"), (258, "motorbike"),
    (259, "mountain"), (260, "mouse"), (284, "person"), (295, "plate"), (296, "platform"), (308, "pottedplant"),
    (324, "road"), (326, "rock"), (347, "sheep"), (349, "shelves"), (354, "sidewalk"), (355, "sign"), (360, "sky"),
    (366, "snow"), (368, "sofa"), (397, "table"), (415, "track"), (416, "train"), (420, "tree"), (424, "truck"),
    (427, "tvmonitor"), (440, "wall"), (445, "water"), (454, "window"), (458, "wood"),
]
PC59_CLASSES = [n for _, n in PC59]
PC59_IDS = [i for i, _ in PC59]

assert len(PC59) == 59 and PC59_IDS == sorted(PC59_IDS) and PC59_CLASSES == sorted(PC59_CLASSES)


def pc59_lut(max_id: int = 65535) -> np.ndarray:
    """uint8 lookup table: PASCAL-Context 459-class id -> 0..58 for the 59 classes, 255 otherwise."""
    lut = np.full(max_id + 1, 255, np.uint8)
    lut[PC59_IDS] = np.arange(59, dtype=np.uint8)
    return lut
