"""Semantic-segmentation evaluator: mIoU, fwIoU, mACC, pACC and per-class IoU/ACC.

One confusion matrix per prediction key (``sem_seg`` and, for multi-exit models, each
``sem_seg_<exit>``), gathered across processes, saved to ``OUTPUT_DIR/inference/`` as
``confusion_<key>.npy`` and a readable ``confusion_<key>.json`` (HS3 reads them). Ground
truth is read from the dataset's label files at the original resolution, and values
outside the classes (other than the ignore value) raise an error naming the file.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ..data.labels import check_label_values, read_dataset_label
from ..modeling.exits.hs3_clusters import map_labels
from .metrics import confusion_matrix, metrics_from_confusion

__all__ = ["SemSegEvaluator", "LabelSpace"]

# A prediction key evaluated in another label space: (lut from dataset class -> class of
# that space, with ignore kept, and the names of that space's classes). HS3 exits use this.
LabelSpace = Tuple[np.ndarray, Sequence[str]]


class SemSegEvaluator(DatasetEvaluator):
    """Scores every ``sem_seg*`` output of the model against the dataset's labels."""

    def __init__(
        self,
        dataset_name: str,
        *,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        label_spaces: Optional[Dict[str, LabelSpace]] = None,
    ):
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        meta = MetadataCatalog.get(dataset_name)
        self._class_names = list(meta.stuff_classes)
        self._num_classes = len(self._class_names)
        self._ignore = meta.get("ignore_label", 255)
        self._records = {d["file_name"]: d for d in DatasetCatalog.get(dataset_name)}
        self._label_spaces = dict(label_spaces or {})
        self._logger = logging.getLogger(__name__)
        self.reset()

    def reset(self):
        self._conf: Dict[str, np.ndarray] = {}

    def _space(self, key: str) -> Tuple[Optional[np.ndarray], Sequence[str]]:
        if key in self._label_spaces:
            lut, names = self._label_spaces[key]
            return np.asarray(lut), list(names)
        return None, self._class_names

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            record = self._records.get(inp["file_name"], inp)
            if "sem_seg_file_name" not in record:
                raise ValueError(f"{inp['file_name']!r} has no label in dataset '{self._dataset_name}'.")
            gt = read_dataset_label(record)
            check_label_values(gt, self._num_classes, self._ignore, record["sem_seg_file_name"])
            # A prediction is a sem_seg* score tensor; other sem_seg* entries are not scored
            # (e.g. sem_seg_exit, the name of the exit an AnytimeSegmentor answered from).
            for key in sorted(k for k in out if k.startswith("sem_seg") and isinstance(out[k], torch.Tensor)):
                lut, names = self._space(key)
                pred = out[key].argmax(dim=0).cpu().numpy()
                if out[key].shape[0] != len(names):
                    raise ValueError(
                        f"Output '{key}' has {out[key].shape[0]} channels but '{self._dataset_name}' "
                        f"is scored with {len(names)} classes there (MODEL.SEM_SEG_HEAD.NUM_CLASSES?)."
                    )
                if pred.shape != gt.shape:
                    raise ValueError(
                        f"Output '{key}' is {pred.shape} but the label {record['sem_seg_file_name']!r} is "
                        f"{gt.shape}: the model must return predictions at the input's height/width."
                    )
                g = gt if lut is None else map_labels(gt, lut, self._ignore)
                conf = confusion_matrix(g, pred, len(names), self._ignore)
                self._conf[key] = self._conf.get(key, 0) + conf

    def _gathered_confusions(self) -> Optional[Dict[str, np.ndarray]]:
        """Every process's confusion matrices summed per prediction key; None on the processes
        other than the main one."""
        if not self._distributed:
            return self._conf
        comm.synchronize()
        parts = comm.all_gather(self._conf)
        if not comm.is_main_process():
            return None
        conf = {}
        for part in parts:
            for k, v in part.items():
                conf[k] = conf.get(k, 0) + v
        return conf

    def evaluate(self):
        conf = self._gathered_confusions()
        if conf is None:
            return None
        if not conf:
            self._logger.warning("SemSegEvaluator on '%s' received no prediction.", self._dataset_name)
            return OrderedDict()
        return self._results(conf)

    def _results(self, conf: Dict[str, np.ndarray]) -> "OrderedDict[str, dict]":
        """The metrics of every prediction key from the gathered confusion matrices (saved to
        ``output_dir`` when given); ``sem_seg`` first."""
        results = OrderedDict()
        for key in sorted(conf, key=lambda k: (k != "sem_seg", k)):
            _, names = self._space(key)
            metrics = metrics_from_confusion(conf[key], names)
            results[key] = metrics
            if self._output_dir:
                self._save(key, conf[key], names, metrics)
        return results

    def _save(self, key: str, conf: np.ndarray, names: Sequence[str], metrics: dict) -> None:
        os.makedirs(self._output_dir, exist_ok=True)
        np.save(os.path.join(self._output_dir, f"confusion_{key}.npy"), conf)
        with open(os.path.join(self._output_dir, f"confusion_{key}.json"), "w") as f:
            json.dump(
                {
                    "dataset": self._dataset_name,
                    "prediction": key,
                    "rows": "ground truth",
                    "columns": "prediction",
                    "classes": list(names),
                    "matrix": np.asarray(conf).tolist(),
                    "metrics": {k: (None if v != v else v) for k, v in metrics.items()},  # NaN -> null
                },
                f,
                indent=1,
            )
