"""Run one model (or several, side by side) over a dataset and write one picture per image:
image | ground truth | prediction(s), with a legend of class names and colours."""
from __future__ import annotations

import logging
import os
from typing import Mapping, Optional, Union

import numpy as np
import torch
from cityscapesscripts.helpers.labels import trainId2label

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils

from ..data.labels import read_dataset_label
from .visualize import prediction_grid, save_picture

__all__ = ["write_prediction_pictures", "dataset_colors", "submission_ids"]

OVERVIEW = "overview.png"


def dataset_colors(meta) -> list:
    """The dataset's ``stuff_colors``, or fixed random colours when it has none."""
    colors = meta.get("stuff_colors", None)
    if colors:
        return [tuple(int(v) for v in c) for c in colors]
    rng = np.random.default_rng(0)
    return [tuple(int(v) for v in c) for c in rng.integers(0, 256, (len(meta.stuff_classes), 3))]


@torch.no_grad()
def write_prediction_pictures(models: Union[torch.nn.Module, Mapping[str, torch.nn.Module]], dataset_name: str,
                              out_dir: str, *, image_format: str = "RGB", max_images: Optional[int] = None,
                              mapper=None, scale: int = 1, overview: int = 0) -> int:
    """Write ``out_dir/<image id>.png`` for the first ``max_images`` images; returns the count.

    ``models``: a model, or ``{caption: model}`` whose predictions go side by side in that
    order (e.g. ``{"baseline": a, "method": b}``). ``mapper`` turns a dataset dict into the
    models' input (default: the image as is). ``scale`` enlarges every tile (nearest
    neighbour) for small images. With ``overview`` > 0, the first ``overview`` images are also
    stacked into ``out_dir/overview.png`` with one legend.
    """
    models = {"prediction": models} if isinstance(models, torch.nn.Module) else dict(models)
    meta = MetadataCatalog.get(dataset_name)
    colors = dataset_colors(meta)
    names = list(meta.stuff_classes)
    ignore = meta.get("ignore_label", 255)
    records = DatasetCatalog.get(dataset_name)[: max_images or None]
    was_training = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    rows = []
    try:
        for rec in records:
            if mapper is not None:
                inp = mapper(rec)
            else:
                img = utils.read_image(rec["file_name"], format=image_format)
                inp = {"image": torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1))),
                       "height": img.shape[0], "width": img.shape[1]}
            preds = {k: m([inp])[0]["sem_seg"].argmax(0).cpu().numpy() for k, m in models.items()}
            image = utils.read_image(rec["file_name"], format="RGB")
            gt = read_dataset_label(rec) if "sem_seg_file_name" in rec else None
            name = os.path.splitext(os.path.basename(rec["file_name"]))[0]
            save_picture(os.path.join(out_dir, f"{name}.png"),
                         prediction_grid([(image, gt, preds)], colors, ignore, class_names=names, scale=scale))
            if len(rows) < overview:
                rows.append((image, gt, preds, name))
    finally:
        for k, m in models.items():
            m.train(was_training[k])
    if rows:
        save_picture(os.path.join(out_dir, OVERVIEW), prediction_grid(rows, colors, ignore, class_names=names,
                                                                      scale=scale))
    logging.getLogger(__name__).info("Wrote %d prediction pictures to %s", len(records), out_dir)
    return len(records)


def submission_ids(meta) -> Optional[np.ndarray]:
    """A lookup table from the model's contiguous class index to the dataset's own label id,
    as its evaluation server wants label files (None: the indices are the ids).

    COCO-Stuff (and any dataset whose metadata has ``stuff_dataset_id_to_contiguous_id``): the
    inverse of that map (171 classes -> ids 0..181 with gaps); Cityscapes
    (``evaluator_type`` ``cityscapes_sem_seg``): the train id's label id in cityscapesscripts'
    table (0 road -> 7, ..., 18 bicycle -> 33)."""
    to_contiguous = meta.get("stuff_dataset_id_to_contiguous_id", None)
    if to_contiguous:
        pairs = {int(c): int(raw) for raw, c in to_contiguous.items()}
    elif meta.get("evaluator_type", None) == "cityscapes_sem_seg":
        pairs = {t: label.id for t, label in trainId2label.items() if 0 <= t < 255}
    else:
        return None
    lut = np.arange(max(256, max(pairs) + 1), dtype=np.int64)
    for c, raw in pairs.items():
        lut[c] = raw
    return lut
