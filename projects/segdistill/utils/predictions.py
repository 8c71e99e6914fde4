"""Run a model over a dataset and write one picture per image (image | ground truth | prediction)."""
from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils

from ..data.labels import read_dataset_label
from .visualize import save_prediction_panel

__all__ = ["write_prediction_pictures"]


@torch.no_grad()
def write_prediction_pictures(model, dataset_name: str, out_dir: str, *, image_format: str = "RGB",
                              max_images: Optional[int] = None, mapper=None) -> int:
    """Write ``out_dir/<image id>.png`` for the first ``max_images`` images; returns the count.

    ``mapper`` turns a dataset dict into the model's input (default: the image as is).
    """
    meta = MetadataCatalog.get(dataset_name)
    colors = meta.get("stuff_colors", None) or _default_colors(len(meta.stuff_classes))
    ignore = meta.get("ignore_label", 255)
    records = DatasetCatalog.get(dataset_name)[: max_images or None]
    was_training = model.training
    model.eval()
    for i, rec in enumerate(records):
        if mapper is not None:
            inp = mapper(rec)
        else:
            img = utils.read_image(rec["file_name"], format=image_format)
            inp = {"image": torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1))),
                   "height": img.shape[0], "width": img.shape[1]}
        pred = model([inp])[0]["sem_seg"].argmax(0).cpu().numpy()
        image = utils.read_image(rec["file_name"], format="RGB")
        gt = read_dataset_label(rec) if "sem_seg_file_name" in rec else None
        name = os.path.splitext(os.path.basename(rec["file_name"]))[0]
        save_prediction_panel(os.path.join(out_dir, f"{name}.png"), image, gt, pred, colors, ignore)
    model.train(was_training)
    logging.getLogger(__name__).info("Wrote %d prediction pictures to %s", len(records), out_dir)
    return len(records)


def _default_colors(n: int):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 3)).tolist()
