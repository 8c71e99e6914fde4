"""COCO-Stuff evaluation: the 171-class metrics plus things/stuff and hierarchy breakdowns.

:class:`CocoStuffEvaluator` is :class:`SemSegEvaluator` (171-class mIoU, fwIoU, mACC,
pACC, per-class IoU/ACC: the protocol of the COCO-Stuff-164k papers, mmsegmentation and
MaskFormer) with, for every prediction key scored in the dataset's own classes, these
extra keys (all in percent, all from the same pixel confusion matrix; see docs/datasets.md):

* ``mIoU-things`` / ``mIoU-stuff``, ``mACC-things`` / ``mACC-stuff``: the class IoUs/ACCs
  averaged over the 80 thing / 91 stuff classes (present in the ground truth);
* for each level of the official hierarchy (``kind``: things/stuff, ``scene``:
  indoor/outdoor things/stuff, ``super``: the 27 supercategories): the confusion matrix
  merged to that level and its ``mIoU-<level>``, ``fwIoU-<level>``, ``mACC-<level>``,
  ``pACC-<level>``, ``IoU-<level>-<group>``; and ``mIoU-in-<supercategory>``, the mean
  class IoU inside each supercategory;
* ``*-challenge``: the 2017 Stuff Challenge protocol (91 stuff classes + one "other" class
  for all thing pixels), and ``*-challenge-super`` its supercategory level (15 + other);
* ``mIoU-182``: the sum of the 171 class IoUs divided by 182, what codebases that count the
  11 unused COCO ids as classes with IoU 0 report.

Key names contain "-" so that detectron2's ``print_csv_format`` copypaste line keeps the
four headline numbers. The breakdown is also saved as ``breakdown_<key>.json``.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from detectron2.data import MetadataCatalog
from detectron2.utils import comm

from .metrics import metrics_from_confusion, per_class_iou
from .sem_seg import LabelSpace, SemSegEvaluator

__all__ = ["CocoStuffEvaluator", "merge_confusion", "coco_stuff_breakdown", "hierarchy_from_metadata"]


def merge_confusion(conf: np.ndarray, groups: Sequence[str]) -> Tuple[np.ndarray, List[str]]:
    """Sum the rows and columns of ``conf`` (classes x classes) by group; groups keep first-seen order."""
    names = list(OrderedDict.fromkeys(groups))
    index = np.array([names.index(g) for g in groups])
    onehot = np.zeros((len(groups), len(names)), np.float64)
    onehot[np.arange(len(groups)), index] = 1
    return onehot.T @ np.asarray(conf, np.float64) @ onehot, names


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> float:
    keep = mask & ~np.isnan(values)
    return 100 * float(values[keep].mean()) if keep.any() else float("nan")


def coco_stuff_breakdown(
    conf: np.ndarray,
    is_thing: Sequence[bool],
    levels: "Dict[str, Sequence[str]]",
) -> "OrderedDict[str, float]":
    """The extra keys of :class:`CocoStuffEvaluator` from a classes x classes confusion matrix."""
    conf = np.asarray(conf, np.float64)
    is_thing = np.asarray(is_thing, bool)
    gt = conf.sum(1)
    present = gt > 0
    iou = per_class_iou(conf)
    acc = np.full(len(gt), np.nan)
    acc[present] = np.diag(conf)[present] / gt[present]
    out: "OrderedDict[str, float]" = OrderedDict()
    for kind, mask in (("things", is_thing), ("stuff", ~is_thing)):
        out[f"mIoU-{kind}"] = _masked_mean(iou, mask)
        out[f"mACC-{kind}"] = _masked_mean(acc, mask)
    out["mIoU-182"] = 100 * float(np.nansum(iou)) / 182 if present.any() else float("nan")

    def level_metrics(suffix: str, groups: Sequence[str]) -> None:
        merged, names = merge_confusion(conf, groups)
        m = metrics_from_confusion(merged, names)
        for key in ("mIoU", "fwIoU", "mACC", "pACC"):
            out[f"{key}-{suffix}"] = m[key]
        for name in names:
            out[f"IoU-{suffix}-{name}"] = m[f"IoU-{name}"]

    for level, groups in levels.items():
        level_metrics(level, groups)
    if "super" in levels:
        supers = np.asarray(levels["super"])
        for name in OrderedDict.fromkeys(levels["super"]):
            out[f"mIoU-in-{name}"] = _masked_mean(iou, supers == name)
    # 2017 Stuff Segmentation Challenge: every stuff class + one "other" class for all things.
    challenge = [f"c{k}" if not t else "other" for k, t in enumerate(is_thing)]
    merged, _ = merge_confusion(conf, challenge)
    m = metrics_from_confusion(merged, [str(i) for i in range(len(merged))])
    for key in ("mIoU", "fwIoU", "mACC", "pACC"):
        out[f"{key}-challenge"] = m[key]
    if "super" in levels:
        groups = ["other" if t else s for t, s in zip(is_thing, levels["super"])]
        merged, names = merge_confusion(conf, groups)
        m = metrics_from_confusion(merged, names)
        for key in ("mIoU", "fwIoU", "mACC", "pACC"):
            out[f"{key}-challenge-super"] = m[key]
    return out


def hierarchy_from_metadata(dataset_name: str) -> Tuple[List[bool], "Dict[str, List[str]]"]:
    """(is_thing per class, {level: group per class}) from a COCO-Stuff dataset's metadata."""
    meta = MetadataCatalog.get(dataset_name)
    is_thing = meta.get("stuff_is_thing")
    levels = meta.get("stuff_hierarchy")
    if is_thing is None or levels is None:
        raise ValueError(
            f"Dataset '{dataset_name}' has evaluator_type 'coco_stuff_sem_seg' but no 'stuff_is_thing' / "
            "'stuff_hierarchy' metadata; register it like segdistill.data.datasets.coco_stuff does."
        )
    n = len(meta.stuff_classes)
    bad = [lvl for lvl, g in levels.items() if len(g) != n]
    if len(is_thing) != n or bad:
        raise ValueError(f"Dataset '{dataset_name}': hierarchy metadata does not cover its {n} classes ({bad}).")
    return list(is_thing), {k: list(v) for k, v in levels.items()}


class CocoStuffEvaluator(SemSegEvaluator):
    """SemSegEvaluator + the COCO-Stuff breakdown (module docstring) for ``coco_stuff_sem_seg`` datasets."""

    def __init__(
        self,
        dataset_name: str,
        *,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        label_spaces: Optional[Dict[str, LabelSpace]] = None,
    ):
        super().__init__(dataset_name, distributed=distributed, output_dir=output_dir, label_spaces=label_spaces)
        self._is_thing, self._levels = hierarchy_from_metadata(dataset_name)

    def evaluate(self):
        conf = self._conf
        if self._distributed:  # gather here so the breakdown sees the merged matrices
            comm.synchronize()
            parts = comm.all_gather(conf)
            if not comm.is_main_process():
                return None
            conf = {}
            for part in parts:
                for k, v in part.items():
                    conf[k] = conf.get(k, 0) + v
        saved = self._conf, self._distributed
        self._conf, self._distributed = conf, False
        try:
            results = super().evaluate()
        finally:
            self._conf, self._distributed = saved
        for key in list(results):
            if key in self._label_spaces:
                continue  # scored in another label space (e.g. an HS3 exit): no COCO hierarchy there
            extra = coco_stuff_breakdown(conf[key], self._is_thing, self._levels)
            results[key].update(extra)
            if self._output_dir:
                with open(os.path.join(self._output_dir, f"breakdown_{key}.json"), "w") as f:
                    json.dump({"dataset": self._dataset_name, "prediction": key,
                               "levels": self._levels, "is_thing": self._is_thing,
                               "metrics": {k: (None if v != v else v) for k, v in extra.items()}}, f, indent=1)
        return results
