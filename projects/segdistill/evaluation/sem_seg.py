"""Semantic-segmentation evaluator: mIoU, fwIoU, mACC, pACC and per-class IoU/ACC.

One confusion matrix per prediction key (``sem_seg`` and, for multi-exit models, each
``sem_seg_<exit>``), gathered across processes, saved to ``OUTPUT_DIR/inference/`` as
``confusion_<key>.npy`` and a readable ``confusion_<key>.json`` (HS3 reads them). Ground
truth is the dataset's label at the original resolution: decoded and checked by the test
mapper in the loader's workers (``EVAL_LABEL`` of :class:`~segdistill.data.SemSegDatasetMapper`),
else read here from the label file; values outside the classes (other than the ignore value)
raise an error naming the file.

The matrices are counted where the predictions are (:func:`device_confusion_matrix`, a
``bincount`` on the model's device) and stay there until :meth:`SemSegEvaluator.evaluate`,
which copies them to the host once: no per-image copy of a prediction (16 MiB of int64 for a
1024x2048 image) and no numpy pass over it in the evaluating process.

A distiller's frozen teacher (``MODEL.DISTILL.EVAL_TEACHER``, prediction ``sem_seg_teacher``)
is scored once per run and dataset: given the model as ``teacher`` (:class:`TeacherScoring`),
the evaluator keeps the teacher's matrix in a run-wide cache keyed by the dataset and
``teacher.teacher_identity()``; a later evaluation of that dataset switches
``teacher.eval_teacher`` off while the model runs (:meth:`reset` to :meth:`evaluate`) and
reports the cached matrix's metrics.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from typing import Dict, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ..data.labels import check_label_values, read_dataset_label
from ..data.mapper import EVAL_LABEL
from ..modeling.exits.hs3_clusters import map_labels
from .metrics import metrics_from_confusion

__all__ = ["SemSegEvaluator", "LabelSpace", "device_confusion_matrix", "TeacherScoring", "TEACHER_PREDICTION",
           "clear_teacher_scores"]

#: The prediction key of a distiller's teacher.
TEACHER_PREDICTION = "sem_seg_teacher"


class TeacherScoring(Protocol):
    """A model that adds its frozen teacher's prediction (``TEACHER_PREDICTION``) while
    ``eval_teacher`` is on (:class:`~segdistill.modeling.meta_arch.distill.Distiller`)."""

    eval_teacher: bool

    def teacher_identity(self) -> str:
        """What the teacher's predictions depend on (config, weights)."""


# (dataset, teacher identity) -> the teacher's gathered matrix (main process) or _SCORED (others)
_TEACHER_SCORES: Dict[Tuple[str, str], object] = {}
_SCORED = "scored"


def clear_teacher_scores() -> None:
    """Forget the cached teacher scores (a new run in the same process)."""
    _TEACHER_SCORES.clear()

# A prediction key evaluated in another label space: (lut from dataset class -> class of
# that space, with ignore kept, and the names of that space's classes). HS3 exits use this.
LabelSpace = Tuple[np.ndarray, Sequence[str]]


def device_confusion_matrix(gt: torch.Tensor, pred: torch.Tensor, num_classes: int,
                            ignore_value: int) -> torch.Tensor:
    """KxK int64 counts (rows = ground truth) over the pixels whose ground truth is not
    ``ignore_value``, on ``pred``'s device: :func:`~.metrics.confusion_matrix`'s values.
    ``gt`` (any integer dtype, any device) holds classes or the ignore value."""
    gt = gt.to(pred.device, non_blocking=True).long()
    k2 = num_classes * num_classes
    # ignored pixels go to one extra bin, dropped after: a boolean selection would wait for the device
    idx = torch.where(gt != ignore_value, gt * num_classes + pred.long(), k2)
    return torch.bincount(idx.flatten(), minlength=k2 + 1)[:k2].reshape(num_classes, num_classes)


class SemSegEvaluator(DatasetEvaluator):
    """Scores every ``sem_seg*`` output of the model against the dataset's labels."""

    def __init__(
        self,
        dataset_name: str,
        *,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        label_spaces: Optional[Dict[str, LabelSpace]] = None,
        teacher: Optional[TeacherScoring] = None,
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
        self._luts: Dict[tuple, torch.Tensor] = {}  # label-space tables on the predictions' device
        self._teacher = teacher
        self._teacher_cached = False
        self._logger = logging.getLogger(__name__)
        self.reset()

    def reset(self):
        # per prediction key, on the predictions' device until evaluate()
        self._conf: Dict[str, torch.Tensor] = {}
        if self._teacher is not None:
            # the teacher is frozen: once scored on this dataset, the model runs without it
            self._teacher_cached = self._teacher_key() in _TEACHER_SCORES
            self._teacher.eval_teacher = not self._teacher_cached

    def _teacher_key(self) -> Tuple[str, str]:
        return self._dataset_name, self._teacher.teacher_identity()

    def _space(self, key: str) -> Tuple[Optional[np.ndarray], Sequence[str]]:
        if key in self._label_spaces:
            lut, names = self._label_spaces[key]
            return np.asarray(lut), list(names)
        return None, self._class_names

    def _ground_truth(self, inp: dict) -> Tuple[torch.Tensor, str]:
        """(the checked label of a mapped input, its file): the test mapper's ``EVAL_LABEL``,
        decoded in the loader's workers, else the dataset's label file read here."""
        record = self._records.get(inp["file_name"], inp)
        if "sem_seg_file_name" not in record:
            raise ValueError(f"{inp['file_name']!r} has no label in dataset '{self._dataset_name}'.")
        if EVAL_LABEL in inp:
            gt = inp[EVAL_LABEL]
        else:
            gt = torch.from_numpy(np.ascontiguousarray(read_dataset_label(record)))
        check_label_values(gt.numpy(), self._num_classes, self._ignore, record["sem_seg_file_name"])
        return gt, record["sem_seg_file_name"]

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            gt, gt_file = self._ground_truth(inp)
            on_device = {}  # the label copied once per device
            # A prediction is a sem_seg* score tensor; other sem_seg* entries are not scored
            # (e.g. sem_seg_exit, the name of the exit an AnytimeSegmentor answered from).
            for key in sorted(k for k in out if k.startswith("sem_seg") and isinstance(out[k], torch.Tensor)):
                lut, names = self._space(key)
                pred = out[key].argmax(dim=0)
                if out[key].shape[0] != len(names):
                    raise ValueError(
                        f"Output '{key}' has {out[key].shape[0]} channels but '{self._dataset_name}' "
                        f"is scored with {len(names)} classes there (MODEL.SEM_SEG_HEAD.NUM_CLASSES?)."
                    )
                if pred.shape != gt.shape:
                    raise ValueError(
                        f"Output '{key}' is {tuple(pred.shape)} but the label {gt_file!r} is "
                        f"{tuple(gt.shape)}: the model must return predictions at the input's height/width."
                    )
                if pred.device not in on_device:
                    on_device[pred.device] = gt.to(pred.device, non_blocking=True)
                g = on_device[pred.device]
                if lut is not None:
                    g = map_labels(g, self._device_lut(key, lut, pred.device), self._ignore)
                conf = device_confusion_matrix(g, pred, len(names), self._ignore)
                if key in self._conf:
                    self._conf[key] += conf.to(self._conf[key].device)
                else:
                    self._conf[key] = conf

    def _device_lut(self, key: str, lut: np.ndarray, device: torch.device) -> torch.Tensor:
        if (key, device) not in self._luts:
            self._luts[(key, device)] = torch.as_tensor(lut, dtype=torch.int64, device=device)
        return self._luts[(key, device)]

    def _host_confusions(self) -> Dict[str, np.ndarray]:
        """This process's matrices on the host: one copy for all the prediction keys."""
        if not self._conf:
            return {}
        keys = list(self._conf)
        device = self._conf[keys[0]].device
        flat = torch.cat([self._conf[k].to(device).flatten() for k in keys]).cpu().numpy()
        out, start = {}, 0
        for k in keys:
            n = self._conf[k].numel()
            out[k] = flat[start:start + n].reshape(self._conf[k].shape)
            start += n
        return out

    def _gathered_confusions(self) -> Optional[Dict[str, np.ndarray]]:
        """Every process's confusion matrices summed per prediction key; None on the processes
        other than the main one."""
        own = self._host_confusions()
        if not self._distributed:
            return own
        comm.synchronize()
        parts = comm.all_gather(own)
        if not comm.is_main_process():
            return None
        conf = {}
        for part in parts:
            for k, v in part.items():
                conf[k] = conf.get(k, 0) + v
        return conf

    def evaluate(self):
        if self._teacher is not None:
            self._teacher.eval_teacher = True
        conf = self._gathered_confusions()
        if self._teacher is not None:
            key = self._teacher_key()
            if self._teacher_cached and conf is not None and isinstance(_TEACHER_SCORES[key], np.ndarray):
                conf[TEACHER_PREDICTION] = _TEACHER_SCORES[key]
            elif not self._teacher_cached:
                _TEACHER_SCORES[key] = _SCORED if conf is None else conf.get(TEACHER_PREDICTION, _SCORED)
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
