"""Semantic-segmentation dataset mapper: read, check, augment, and convert to tensors.

Training: random resize by a ratio (``INPUT.RESIZE_RATIO_RANGE``, of the image's own size
or of ``INPUT.RESIZE_BASE_SIZE``), a fixed-size crop of ``INPUT.CROP.SIZE`` padded with the
ignore value where the image is smaller, a random flip, optional brightness/contrast
jitter. Test: the image as is (or resized by ``INPUT.MIN_SIZE_TEST``); the label, when the
record has one, is decoded here at the original resolution and handed to the evaluator as
``EVAL_LABEL`` (the loader's workers decode it, not the evaluating process; the evaluator
checks its values against the dataset's classes), never as ``sem_seg`` (the model does not
see it).

Training labels stay in the smallest dtype that holds the classes and the ignore value
(:func:`label_dtype`: uint8 for every built-in dataset, 255 = ignore) until the model moves
them to its device, where they become int64 (the cross-entropy's index type): the loader
and the host-to-device copy move an eighth of the bytes of int64 labels.

A file that cannot be decoded (flagged by the dataset's load-time check, or failing now)
raises :class:`UnreadableFileError` naming the file and the record's dataset; the training
loader (:mod:`segdistill.data.build`) stops or skips on it (``DATALOADER.ON_UNREADABLE``).
The mapper itself draws its random augmentations from numpy's global generator, which the
training loader seeds per sample (exact resume).
"""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .datasets.folder import UnreadableFileError
from .labels import LabelValueError, check_label_values, read_dataset_label

__all__ = ["SemSegDatasetMapper", "RandomResizeRatio", "build_sem_seg_train_augmentations", "label_dtype",
           "EVAL_LABEL"]

#: Key of the test-time ground truth (HxW at the original resolution, :func:`label_dtype`, checked)
#: in a mapped dict: what :class:`~segdistill.evaluation.SemSegEvaluator` scores against.
EVAL_LABEL = "sem_seg_eval_label"


class RandomResizeRatio(T.Augmentation):
    """Resize by a ratio drawn uniformly from ``ratio_range``.

    Without ``base_size`` the ratio scales the image itself. With ``base_size=(h, w)`` the
    image is rescaled, keeping its aspect ratio, to fit ``ratio * base_size`` (the long side
    to the long side), as mmsegmentation's ``Resize(img_scale, ratio_range)`` does.
    """

    def __init__(self, ratio_range: Sequence[float], base_size: Optional[Sequence[int]] = None,
                 interp=Image.BILINEAR):
        super().__init__()
        if len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"INPUT.RESIZE_RATIO_RANGE must be (min, max) with 0 < min <= max, got {ratio_range}")
        base_size = tuple(base_size) if base_size and min(base_size) > 0 else None
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        h, w = image.shape[:2]
        ratio = np.random.uniform(*self.ratio_range)
        if self.base_size is None:
            scale = ratio
        else:
            long_, short = max(self.base_size), min(self.base_size)
            scale = ratio * min(long_ / max(h, w), short / min(h, w))
        nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        return T.ResizeTransform(h, w, nh, nw, self.interp)


def build_sem_seg_train_augmentations(cfg) -> List[T.Augmentation]:
    augs: List[T.Augmentation] = [RandomResizeRatio(cfg.INPUT.RESIZE_RATIO_RANGE, cfg.INPUT.RESIZE_BASE_SIZE)]
    if cfg.INPUT.CROP.ENABLED:
        if cfg.INPUT.CROP.TYPE != "absolute":
            raise ValueError(f"INPUT.CROP.TYPE must be 'absolute' for semantic segmentation, got {cfg.INPUT.CROP.TYPE!r}")
        augs.append(T.FixedSizeCrop(tuple(cfg.INPUT.CROP.SIZE), pad=True, pad_value=128.0,
                                    seg_pad_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE))
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                                 vertical=cfg.INPUT.RANDOM_FLIP == "vertical"))
    if cfg.INPUT.COLOR_JITTER > 0:
        j = cfg.INPUT.COLOR_JITTER
        augs += [T.RandomBrightness(1 - j, 1 + j), T.RandomContrast(1 - j, 1 + j)]
    return augs


def label_dtype(num_classes: int, ignore_value: int) -> np.dtype:
    """The smallest dtype of a training label holding the classes ``0..num_classes-1`` and
    ``ignore_value``: uint8 when they fit (every built-in dataset: at most 171 classes and 255),
    else int32 (what detectron2's resize transform interpolates besides uint8)."""
    lo, hi = min(0, ignore_value), max(num_classes - 1, ignore_value)
    return np.dtype(np.uint8) if lo >= 0 and hi <= 255 else np.dtype(np.int32)


class SemSegDatasetMapper:
    """Dataset dict -> model input: ``image`` (CxHxW uint8), ``sem_seg`` (HxW, training; in
    :func:`label_dtype`, uint8 for the built-in datasets: the model makes it int64 on its device),
    ``height``/``width`` (the original size, for the output); at test time, with
    ``eval_labels`` (the default), ``EVAL_LABEL`` for records with a label."""

    @configurable
    def __init__(self, is_train: bool, *, augmentations: List[T.Augmentation], image_format: str,
                 num_classes: int, ignore_value: int, eval_labels: bool = True):
        self.is_train = is_train
        self.eval_labels = eval_labels
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.num_classes = num_classes
        self.ignore_value = ignore_value

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        if is_train:
            augs = build_sem_seg_train_augmentations(cfg)
        elif cfg.INPUT.MIN_SIZE_TEST > 0:
            augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
        else:
            augs = []
        return dict(
            is_train=is_train, augmentations=augs, image_format=cfg.INPUT.FORMAT,
            num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, ignore_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        )

    def __call__(self, dataset_dict: dict) -> dict:
        d = copy.copy(dataset_dict)
        if "unreadable" in d:
            bad = d["unreadable"]
            raise UnreadableFileError(_unreadable_message(d, bad["file"], bad["error"], at_load=True))
        image = _decode(d, d["file_name"], lambda: utils.read_image(d["file_name"], format=self.image_format))
        d.setdefault("height", image.shape[0])
        d.setdefault("width", image.shape[1])
        sem_seg = None
        if self.is_train:
            if "sem_seg_file_name" not in d:
                raise ValueError(f"Training image {d['file_name']!r} has no label (sem_seg_file_name).")
            sem_seg = _decode(d, d["sem_seg_file_name"], lambda: read_dataset_label(d))
            if sem_seg.shape != image.shape[:2]:
                raise ValueError(
                    f"Label {d['sem_seg_file_name']!r} is {sem_seg.shape[1]}x{sem_seg.shape[0]} but its image "
                    f"{d['file_name']!r} is {image.shape[1]}x{image.shape[0]} (width x height)."
                )
            check_label_values(sem_seg, self.num_classes, self.ignore_value, d["sem_seg_file_name"])
            sem_seg = sem_seg.astype(label_dtype(self.num_classes, self.ignore_value))
        aug = T.AugInput(image, sem_seg=sem_seg)
        self.augmentations(aug)
        d["image"] = torch.as_tensor(np.ascontiguousarray(aug.image.transpose(2, 0, 1)))
        if sem_seg is not None:
            d["sem_seg"] = torch.as_tensor(np.ascontiguousarray(aug.sem_seg))
        elif self.eval_labels and "sem_seg_file_name" in d:
            d[EVAL_LABEL] = torch.as_tensor(self._eval_label(d))
        return d

    @staticmethod
    def _eval_label(d: dict) -> np.ndarray:
        # not checked against NUM_CLASSES here: the evaluator checks against the dataset's classes
        label = _decode(d, d["sem_seg_file_name"], lambda: read_dataset_label(d))
        if label.dtype != np.uint8 and label.size and 0 <= label.min() and label.max() <= 255:
            label = label.astype(np.uint8)  # a dataset's value map gives int64
        return np.ascontiguousarray(label)


def _unreadable_message(record: dict, path: str, error: str, at_load: bool = False) -> str:
    dataset = record.get("dataset_name")
    where = f"Dataset '{dataset}'" if dataset else "A dataset record"
    when = "found by the load-time check" if at_load else "while reading it"
    return f"{where}: cannot decode {path!r} ({error}; {when})."


def _decode(record: dict, path: str, read):
    """``read()``, with any decoder error turned into an :class:`UnreadableFileError` naming
    ``path`` and the record's dataset (label value/mode errors pass through unchanged)."""
    try:
        return read()
    except LabelValueError:
        raise
    except Exception as e:  # noqa: BLE001  (PIL raises OSError, SyntaxError, ValueError, ...)
        raise UnreadableFileError(_unreadable_message(record, path, f"{type(e).__name__}: {e}")) from e
