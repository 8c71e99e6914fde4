"""COCO-Stuff evaluation: the 171-class metrics plus things/stuff and hierarchy breakdowns.

:class:`CocoStuffEvaluator` is :class:`SemSegEvaluator` (171-class mIoU, fwIoU, mACC,
pACC, per-class IoU/ACC: the protocol of the COCO-Stuff-164k papers, mmsegmentation and
MaskFormer) with, for every prediction key scored in the dataset's own classes, these
extra keys (all in percent, all from the same pixel confusion matrix; see docs/datasets.md).

Headline numbers (:data:`HEADLINE_KEYS`; no "-" in their names, so detectron2's
``print_csv_format`` puts them on the ``copypaste`` lines next to mIoU, fwIoU, mACC, pACC):

* ``mIoU_things`` / ``mIoU_stuff``: the class IoUs averaged over the 80 thing / 91 stuff
  classes (present in the ground truth);
* ``mIoU_super``: mIoU of the matrix merged to the 27 supercategories;
* ``mIoU_challenge``: the 2017 Stuff Challenge protocol (91 stuff classes + one "other"
  class for all thing pixels);
* ``mIoU_182``: the sum of the 171 class IoUs divided by 182, what codebases that count the
  11 unused COCO ids as classes with IoU 0 report.

The rest of the breakdown (a "-" in every name, kept off the copypaste lines as detectron2
keeps per-category metrics off them): ``mACC-things`` / ``mACC-stuff``; for each level of
the official hierarchy (``kind``: things/stuff, ``scene``: indoor/outdoor things/stuff,
``super``: the 27 supercategories) ``fwIoU-<level>``, ``mACC-<level>``, ``pACC-<level>``,
``IoU-<level>-<group>`` and ``mIoU-<level>`` (except ``mIoU_super``, a headline number);
``mIoU-in-<supercategory>``, the mean class IoU inside each supercategory; the challenge's
``fwIoU/mACC/pACC-challenge`` and its supercategory level ``*-challenge-super`` (15 + other).

Every key is in the results dict, hence in ``metrics.json`` and TensorBoard; the evaluator
also logs the breakdown as two tables (per level; per supercategory) and saves it as
``breakdown_<key>.json``.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from detectron2.data import MetadataCatalog

from .metrics import metrics_from_confusion, per_class_iou
from .sem_seg import SemSegEvaluator

__all__ = ["CocoStuffEvaluator", "merge_confusion", "coco_stuff_breakdown", "hierarchy_from_metadata",
           "breakdown_tables", "HEADLINE_KEYS"]

#: The breakdown's headline numbers: on the copypaste lines (no "-" in the names).
HEADLINE_KEYS = ("mIoU_things", "mIoU_stuff", "mIoU_182", "mIoU_super", "mIoU_challenge")


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
        out[f"mIoU_{kind}"] = _masked_mean(iou, mask)
        out[f"mACC-{kind}"] = _masked_mean(acc, mask)
    out["mIoU_182"] = 100 * float(np.nansum(iou)) / 182 if present.any() else float("nan")

    def level_metrics(suffix: str, groups: Sequence[str]) -> None:
        merged, names = merge_confusion(conf, groups)
        m = metrics_from_confusion(merged, names)
        for key in ("mIoU", "fwIoU", "mACC", "pACC"):
            out[_level_key(key, suffix)] = m[key]
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
        out[_level_key(key, "challenge")] = m[key]
    if "super" in levels:
        groups = ["other" if t else s for t, s in zip(is_thing, levels["super"])]
        merged, names = merge_confusion(conf, groups)
        m = metrics_from_confusion(merged, names)
        for key in ("mIoU", "fwIoU", "mACC", "pACC"):
            out[f"{key}-challenge-super"] = m[key]
    return out


def _level_key(metric: str, level: str) -> str:
    """``mIoU_super`` and ``mIoU_challenge`` are headline numbers; every other level key has a "-"."""
    key = f"{metric}_{level}"
    return key if key in HEADLINE_KEYS else f"{metric}-{level}"


def breakdown_tables(metrics: Mapping[str, float], levels: Sequence[str] = ("kind", "scene", "super")) -> str:
    """The breakdown of one prediction key as two text tables: mIoU, fwIoU, mACC, pACC per
    level (classes, things, stuff, each hierarchy level, the challenge protocols); then per
    supercategory its merged IoU and the mean IoU of its classes."""
    from tabulate import tabulate

    def get(key):
        v = metrics.get(key, float("nan"))
        return "" if v != v else f"{v:.2f}"

    rows = [["classes (171)", get("mIoU"), get("fwIoU"), get("mACC"), get("pACC")],
            ["things (80 classes)", get("mIoU_things"), "", get("mACC-things"), ""],
            ["stuff (91 classes)", get("mIoU_stuff"), "", get("mACC-stuff"), ""],
            ["classes, sum / 182", get("mIoU_182"), "", "", ""]]
    names = {"kind": "things / stuff (2)", "scene": "indoor / outdoor (4)", "super": "supercategories (27)",
             "challenge": "2017 challenge (91 stuff + other)", "challenge-super": "challenge supercategories (15 + other)"}
    for level in list(levels) + ["challenge", "challenge-super"]:
        keys = [_level_key(m, level) for m in ("mIoU", "fwIoU", "mACC", "pACC")]
        if any(k in metrics for k in keys):
            rows.append([names.get(level, level)] + [get(k) for k in keys])
    out = tabulate(rows, headers=["level", "mIoU", "fwIoU", "mACC", "pACC"], tablefmt="pipe", disable_numparse=True)
    supers = [k[len("IoU-super-"):] for k in metrics if k.startswith("IoU-super-")]
    if supers:
        rows = [[s, get(f"IoU-super-{s}"), get(f"mIoU-in-{s}")] for s in supers]
        out += "\n\n" + tabulate(rows, headers=["supercategory", "IoU (merged)", "mIoU of its classes"],
                                  tablefmt="pipe", disable_numparse=True)
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

    def __init__(self, dataset_name: str, **kwargs):
        """``kwargs``: :class:`SemSegEvaluator`'s (``distributed``, ``output_dir``, ``label_spaces``)."""
        super().__init__(dataset_name, **kwargs)
        self._is_thing, self._levels = hierarchy_from_metadata(dataset_name)

    def _results(self, conf):
        results = super()._results(conf)  # the matrices gathered over processes: the breakdown sees them merged
        for key in list(results):
            if key in self._label_spaces:
                continue  # scored in another label space (e.g. an HS3 exit): no COCO hierarchy there
            extra = coco_stuff_breakdown(conf[key], self._is_thing, self._levels)
            results[key].update(extra)
            self._logger.info("COCO-Stuff breakdown of '%s' on %s (%%):\n%s", key, self._dataset_name,
                              breakdown_tables(results[key], list(self._levels)))
            if self._output_dir:
                with open(os.path.join(self._output_dir, f"breakdown_{key}.json"), "w") as f:
                    json.dump({"dataset": self._dataset_name, "prediction": key,
                               "levels": self._levels, "is_thing": self._is_thing,
                               "metrics": {k: (None if v != v else v) for k, v in extra.items()}}, f, indent=1)
        return results
