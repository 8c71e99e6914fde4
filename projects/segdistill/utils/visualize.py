"""Pictures of predictions: image | ground truth | prediction, in the dataset's colours."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["colorize", "prediction_panel", "save_prediction_panel"]

IGNORE_COLOR = (0, 0, 0)


def colorize(label: np.ndarray, colors: Sequence[Sequence[int]], ignore_value: int = 255) -> np.ndarray:
    """HxW class indices -> HxWx3 uint8 RGB; ignore (and any unknown value) is black."""
    palette = np.zeros((max(256, int(label.max()) + 1), 3), np.uint8)
    palette[: len(colors)] = np.asarray(colors, np.uint8)
    palette[ignore_value] = IGNORE_COLOR
    return palette[label]


def prediction_panel(image_rgb: np.ndarray, gt: Optional[np.ndarray], pred: np.ndarray,
                     colors, ignore_value: int = 255, title: str = "") -> np.ndarray:
    """One row: the image, its ground truth (if any) and the prediction, with a caption."""
    tiles = [image_rgb] + ([colorize(gt, colors, ignore_value)] if gt is not None else []) + [colorize(pred, colors, ignore_value)]
    row = np.concatenate(tiles, axis=1)
    canvas = Image.new("RGB", (row.shape[1], row.shape[0] + 14), (255, 255, 255))
    canvas.paste(Image.fromarray(row), (0, 14))
    names = ["image", "ground truth", "prediction"] if gt is not None else ["image", "prediction"]
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(names):
        draw.text((i * image_rgb.shape[1] + 3, 1), name if i or not title else f"{name} {title}", fill=(0, 0, 0))
    return np.asarray(canvas)


def save_prediction_panel(path: str, *args, **kwargs) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(prediction_panel(*args, **kwargs)).save(path)
    return path
