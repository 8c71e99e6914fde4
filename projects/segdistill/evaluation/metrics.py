"""Confusion matrices and the metrics derived from them (pure numpy).

Convention: ``conf[g, p]`` counts pixels of ground-truth class ``g`` predicted as ``p``
(rows = ground truth). Note that detectron2's own SemSegEvaluator stores the transpose.

mIoU and mACC average over the classes *present in the ground truth* of the evaluated set
(``conf.sum(1) > 0``), as detectron2's current evaluator does; its v0.6 release instead
averaged IoU over classes with a non-empty union (so a class that is only predicted
counted as 0), and mmsegmentation averages over all classes ignoring NaN.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Sequence

import numpy as np

__all__ = ["confusion_matrix", "metrics_from_confusion", "per_class_iou"]


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_value: int) -> np.ndarray:
    """KxK int64 counts over the pixels whose ground truth is not ``ignore_value``."""
    valid = gt != ignore_value
    idx = gt[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_iou(conf: np.ndarray) -> np.ndarray:
    """IoU per class, NaN for classes absent from the ground truth."""
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    gt = conf.sum(1)
    union = gt + conf.sum(0) - tp
    iou = np.full(len(tp), np.nan)
    present = gt > 0
    iou[present] = tp[present] / union[present]
    return iou


def metrics_from_confusion(conf: np.ndarray, class_names: Sequence[str]) -> Dict[str, float]:
    """mIoU, fwIoU, IoU-<class>, mACC, pACC, ACC-<class> in percent (detectron2's keys)."""
    conf = np.asarray(conf, dtype=np.float64)
    if conf.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix {conf.shape} does not match {len(class_names)} class names")
    tp = np.diag(conf)
    gt = conf.sum(1)
    present = gt > 0
    iou = per_class_iou(conf)
    acc = np.full(len(tp), np.nan)
    acc[present] = tp[present] / gt[present]
    total = gt.sum()
    res = OrderedDict()
    res["mIoU"] = 100 * float(np.mean(iou[present])) if present.any() else float("nan")
    res["fwIoU"] = 100 * float(np.sum(iou[present] * gt[present] / total)) if total else float("nan")
    for name, v in zip(class_names, iou):
        res[f"IoU-{name}"] = 100 * float(v)
    res["mACC"] = 100 * float(np.mean(acc[present])) if present.any() else float("nan")
    res["pACC"] = 100 * float(tp.sum() / total) if total else float("nan")
    for name, v in zip(class_names, acc):
        res[f"ACC-{name}"] = 100 * float(v)
    return res
