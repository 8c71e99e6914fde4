"""Pictures of predictions: image | ground truth | prediction(s), in the dataset's colours,
with a legend of the class names and colours that appear in the picture.

One row per image; several models' predictions side by side (``preds`` as a mapping from a
caption to a label map); several rows stacked into one picture share one legend
(:func:`prediction_grid`). Every picture the project writes goes through here, so every one
has its legend.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["colorize", "legend_strip", "overlay_picture", "prediction_panel", "prediction_grid", "save_prediction_panel",
           "save_picture", "IGNORE_COLOR"]

IGNORE_COLOR = (0, 0, 0)
_CAPTION = 14  # caption band height (px), PIL's default font
_SWATCH = 12
_PAD = 4

Preds = Union[np.ndarray, Mapping[str, np.ndarray]]


def colorize(label: np.ndarray, colors: Sequence[Sequence[int]], ignore_value: int = 255) -> np.ndarray:
    """HxW class indices -> HxWx3 uint8 RGB; ignore (and any unknown value) is black."""
    palette = np.zeros((max(256, int(label.max()) + 1), 3), np.uint8)
    palette[: len(colors)] = np.asarray(colors, np.uint8)
    palette[ignore_value] = IGNORE_COLOR
    return palette[label]


def _as_mapping(preds: Preds) -> Mapping[str, np.ndarray]:
    return {"prediction": preds} if isinstance(preds, np.ndarray) else dict(preds)


def _classes_in(maps: Sequence[np.ndarray], num_classes: int, ignore_value: int):
    present, ignore = set(), False
    for m in maps:
        values = np.unique(m)
        ignore |= bool((values == ignore_value).any())
        present.update(int(v) for v in values if 0 <= v < num_classes)
    return sorted(present), ignore


def legend_strip(classes: Sequence[int], class_names: Sequence[str], colors, width: int,
                 ignore: bool = False) -> np.ndarray:
    """A white band ``width`` pixels wide: a colour swatch and the name of each class in
    ``classes`` (and 'ignore' in black when ``ignore``), wrapped onto as many lines as needed."""
    items = [(class_names[c] if c < len(class_names) else f"class {c}", tuple(int(v) for v in colors[c]))
             for c in classes]
    if ignore:
        items.append(("ignore / unlabeled", IGNORE_COLOR))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, line, x = [], [], _PAD
    for name, color in items:
        w = _SWATCH + 3 + int(probe.textlength(name)) + 2 * _PAD
        if line and x + w > width:
            lines.append(line)
            line, x = [], _PAD
        line.append((name, color, x))
        x += w
    if line:
        lines.append(line)
    row_h = _SWATCH + 4
    canvas = Image.new("RGB", (width, max(1, len(lines)) * row_h + 2 * _PAD), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, items_of_line in enumerate(lines):
        y = _PAD + i * row_h
        for name, color, x in items_of_line:
            draw.rectangle([x, y, x + _SWATCH - 1, y + _SWATCH - 1], fill=color, outline=(60, 60, 60))
            draw.text((x + _SWATCH + 3, y), name, fill=(0, 0, 0))
    return np.asarray(canvas)


def _row(image_rgb: np.ndarray, gt: Optional[np.ndarray], preds: Mapping[str, np.ndarray], colors,
         ignore_value: int, title: str, scale: int) -> np.ndarray:
    tiles = [image_rgb] + ([colorize(gt, colors, ignore_value)] if gt is not None else [])
    tiles += [colorize(p, colors, ignore_value) for p in preds.values()]
    captions = ["image"] + (["ground truth"] if gt is not None else []) + list(preds)
    if title:
        captions[0] = f"{captions[0]} {title}"
    if scale > 1:
        tiles = [t.repeat(scale, 0).repeat(scale, 1) for t in tiles]
    row = np.concatenate(tiles, axis=1)
    tile_w = tiles[0].shape[1]
    canvas = Image.new("RGB", (row.shape[1], row.shape[0] + _CAPTION), (255, 255, 255))
    canvas.paste(Image.fromarray(row), (0, _CAPTION))
    draw = ImageDraw.Draw(canvas)
    for i, caption in enumerate(captions):
        draw.text((i * tile_w + 3, 1), caption, fill=(0, 0, 0))
    return np.asarray(canvas)


def prediction_panel(image_rgb: np.ndarray, gt: Optional[np.ndarray], preds: Preds, colors,
                     ignore_value: int = 255, title: str = "", *, class_names: Sequence[str],
                     scale: int = 1) -> np.ndarray:
    """One row: the image, its ground truth (if any) and the prediction(s) (an HxW label map, or
    ``{caption: label map}`` for several models side by side), with captions, and below it the
    legend of the classes that appear in the ground truth or a prediction."""
    return prediction_grid([(image_rgb, gt, preds, title)], colors, ignore_value, class_names=class_names,
                           scale=scale)


def prediction_grid(rows, colors, ignore_value: int = 255, *, class_names: Sequence[str],
                    scale: int = 1) -> np.ndarray:
    """Several panels stacked (``rows``: ``(image, gt, preds[, title])`` each, the same columns),
    with one legend of every class that appears in any of them."""
    rendered, maps = [], []
    for row in rows:
        image, gt, preds = row[:3]
        title = row[3] if len(row) > 3 else ""
        preds = _as_mapping(preds)
        rendered.append(_row(image, gt, preds, colors, ignore_value, title, scale))
        maps += ([gt] if gt is not None else []) + list(preds.values())
    width = max(r.shape[1] for r in rendered)
    classes, ignore = _classes_in(maps, len(colors), ignore_value)
    legend = legend_strip(classes, class_names, colors, width, ignore)
    padded = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rendered]
    return np.concatenate(padded + [legend], axis=0)


def save_picture(path: str, picture: np.ndarray) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(picture).save(path)
    return path


def save_prediction_panel(path: str, *args, **kwargs) -> str:
    """:func:`prediction_panel` written to ``path`` (PNG)."""
    return save_picture(path, prediction_panel(*args, **kwargs))


def overlay_picture(image_rgb: np.ndarray, pred: np.ndarray, colors, *, class_names: Sequence[str],
                    ignore_value: int = 255, alpha: float = 0.5, caption: str = "",
                    legend_classes: Optional[Sequence[int]] = None, min_legend_height: int = 0) -> np.ndarray:
    """The image blended with its prediction's colours (``alpha`` of the colour), a ``caption``
    drawn on a white band at its top left (e.g. which exit answered), and below it the legend
    of the classes present (or ``legend_classes``), padded to ``min_legend_height`` so that
    the frames of a video keep one size."""
    pred = np.asarray(pred)
    blended = image_rgb.astype(np.float32) * (1 - alpha) + colorize(pred, colors, ignore_value) * alpha
    blended = np.where((pred == ignore_value)[..., None], image_rgb, blended).round().astype(np.uint8)
    if caption:
        canvas = Image.fromarray(blended)
        draw = ImageDraw.Draw(canvas)
        draw.rectangle([0, 0, int(draw.textlength(caption)) + 6, _CAPTION], fill=(255, 255, 255))
        draw.text((3, 1), caption, fill=(0, 0, 0))
        blended = np.asarray(canvas)
    if legend_classes is None:
        legend_classes, _ = _classes_in([pred], len(colors), ignore_value)
    legend = legend_strip(legend_classes, class_names, colors, blended.shape[1])
    if legend.shape[0] < min_legend_height:
        legend = np.pad(legend, ((0, min_legend_height - legend.shape[0]), (0, 0), (0, 0)), constant_values=255)
    return np.concatenate([blended, legend], axis=0)
