"""A dataset of one's own, from an image folder and a label folder per split, by config keys alone.

``DATASETS.FOLDER.NAME my`` (with the folders, class names and optional maps of the section,
see :func:`add_folder_dataset_config`) registers ``my_train`` and ``my_val``; configs then
name them in ``DATASETS.TRAIN`` / ``DATASETS.TEST`` like a built-in dataset. Config keys
rather than a dataset file: every value is a ``KEY VALUE`` override of the command line, and
the run's ``config.yaml`` holds the whole description of the data it was trained on (a
separate file could change after the run).

:func:`register_config_datasets` registers them; ``train_net.py``'s ``setup()`` calls it in
every process that ``launch()`` starts (as it registers HS3's derived splits), and so do the
tools that read a YAML config's datasets. A lazy config registers its folders with
:func:`register_folder_dataset` at the top of the file (it is loaded in every process).

Labels are single-channel PNGs (``L``, or ``P``: a palette PNG's pixels are palette indices).
``VALUE_MAP`` maps raw values to training ids (a 0/255 mask: ``[[255, 1]]``; a raw ignore value:
``[[0, 255]]``); a raw value may also be a palette colour ``[r, g, b]`` of palette PNGs, resolved
to its index with the first label's palette, which every other label must share. Everything
the built-in folders get is checked when the dataset is loaded (:mod:`.folder`: unmatched
files, label values out of range after the map, unreadable files, cached decode).
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from detectron2.config import CfgNode as CN
from PIL import Image

from ...config import ConfigError, register_config_hook
from .folder import DatasetContentError, load_sem_seg_folder, verify_sem_seg_dicts
from .palette import spread_colors
from .registration import register_sem_seg

__all__ = ["add_folder_dataset_config", "register_folder_dataset", "register_config_datasets", "load_user_folder",
           "FOLDER_SPLITS"]

FOLDER_SPLITS = ("train", "val")
RawValue = Union[int, Sequence[int]]  # a label value, or a palette colour (r, g, b)


@register_config_hook
def add_folder_dataset_config(cfg) -> None:
    """``DATASETS.FOLDER``: a dataset of one's own from folders (this file; docs/datasets.md)."""
    if "FOLDER" in cfg.DATASETS:
        return
    cfg.DATASETS.FOLDER = CN()
    # "" = none. "my" registers my_train and my_val (name them in DATASETS.TRAIN / DATASETS.TEST).
    cfg.DATASETS.FOLDER.NAME = ""
    # Image and label folders of each split (sub-folders are searched; files pair by their stem).
    cfg.DATASETS.FOLDER.TRAIN_IMAGES = ""
    cfg.DATASETS.FOLDER.TRAIN_LABELS = ""
    cfg.DATASETS.FOLDER.VAL_IMAGES = ""
    cfg.DATASETS.FOLDER.VAL_LABELS = ""
    # Class names, in training-id order; their count must be MODEL.SEM_SEG_HEAD.NUM_CLASSES.
    # Pixels labelled MODEL.SEM_SEG_HEAD.IGNORE_VALUE (after VALUE_MAP) are ignored.
    cfg.DATASETS.FOLDER.CLASSES = []
    # Raw label value -> training id, as [[raw, id], ...] (e.g. [[255, 1]] for 0/255 masks);
    # raw may be a palette colour [r, g, b] of palette PNG labels. Values not listed stay as they are.
    cfg.DATASETS.FOLDER.VALUE_MAP = []
    # Colours of the classes in pictures, [[r, g, b], ...] (one per class); [] = distinct colours.
    cfg.DATASETS.FOLDER.PALETTE = []
    # File endings after the shared stem: "x.jpg" pairs with "x.png"; e.g. "_mask.png" for "x_mask.png".
    cfg.DATASETS.FOLDER.IMAGE_SUFFIX = ".jpg"
    cfg.DATASETS.FOLDER.LABEL_SUFFIX = ".png"


def _layout_help(name: str, folders: Mapping[str, Tuple[str, str]], image_suffix: str, label_suffix: str) -> str:
    lines = [f"Dataset '{name}' (DATASETS.FOLDER) pairs <stem>{image_suffix} in the image folder with "
             f"<stem>{label_suffix} in the label folder:"]
    for split, (images, labels) in folders.items():
        key = split.upper()
        lines.append(f"  {split}: DATASETS.FOLDER.{key}_IMAGES {images!r}, DATASETS.FOLDER.{key}_LABELS {labels!r}")
    lines.append("Other endings: DATASETS.FOLDER.IMAGE_SUFFIX / LABEL_SUFFIX (e.g. .png, _mask.png).")
    return "\n".join(lines)


def _colour(raw) -> Optional[Tuple[int, int, int]]:
    if isinstance(raw, (list, tuple)):
        if len(raw) != 3:
            raise ConfigError(f"DATASETS.FOLDER.VALUE_MAP: a colour must be [r, g, b], got {list(raw)}.")
        return tuple(int(c) for c in raw)
    return None


def _parse_value_map(value_map: Sequence) -> List[Tuple[RawValue, int]]:
    pairs = []
    for item in value_map:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ConfigError(
                f"DATASETS.FOLDER.VALUE_MAP: each entry is [raw, id] (raw: a value or a palette colour [r, g, b]), "
                f"got {item!r}; e.g. DATASETS.FOLDER.VALUE_MAP \"[[255, 1]]\".")
        pairs.append((item[0], int(item[1])))
    return pairs


def _palette_of(path: str) -> Optional[List[Tuple[int, int, int]]]:
    with Image.open(path) as im:  # the header only: no pixel is decoded
        if im.mode != "P":
            return None
        flat = im.getpalette() or []
    return [tuple(flat[i: i + 3]) for i in range(0, len(flat) - 2, 3)]


def _resolve_colours(dicts: List[dict], pairs: List[Tuple[RawValue, int]], dataset_name: str) -> Dict[int, int]:
    """The ``{raw value: id}`` map, colours turned into palette indices with the first label's
    palette; every label must be a palette PNG with the same index for each mapped colour."""
    colours = {c: new for c, new in ((_colour(raw), new) for raw, new in pairs) if c is not None}
    value_map = {int(raw): new for raw, new in pairs if _colour(raw) is None}
    if not colours:
        return value_map
    labels = [d["sem_seg_file_name"] for d in dicts if "sem_seg_file_name" in d]
    reference, index_of = None, {}
    for path in labels:
        palette = _palette_of(path)
        if palette is None:
            raise DatasetContentError(
                f"Dataset '{dataset_name}': DATASETS.FOLDER.VALUE_MAP maps colours, but label {path!r} is not a "
                "palette PNG; map its values instead ([[value, id], ...]).")
        if reference is None:
            reference = path
            missing = [list(c) for c in colours if c not in palette]
            if missing:
                raise DatasetContentError(
                    f"Dataset '{dataset_name}': DATASETS.FOLDER.VALUE_MAP colours {missing} are not in the palette "
                    f"of {path!r}.")
            index_of = {c: palette.index(c) for c in colours}
        elif any(i >= len(palette) or palette[i] != c for c, i in index_of.items()):
            raise DatasetContentError(
                f"Dataset '{dataset_name}': label {path!r} has another palette than {reference!r} for the colours "
                "of DATASETS.FOLDER.VALUE_MAP; give every label the same palette, or map values instead.")
    for c, new in colours.items():
        value_map[index_of[c]] = new
    return value_map


def load_user_folder(name: str, images: str, labels: str, *, num_classes: int, ignore_value: int,
                     value_map: Sequence, image_suffix: str, label_suffix: str, layout_help: str) -> List[dict]:
    """Dataset dicts of one split: paired, checked (:mod:`.folder`), with the raw-value map in each record."""
    dicts = load_sem_seg_folder(images, labels, dataset_name=name, layout_help=layout_help,
                                image_ext=image_suffix, label_ext=label_suffix)
    resolved = _resolve_colours(dicts, _parse_value_map(value_map), name)
    verify_sem_seg_dicts(dicts, dataset_name=name, num_classes=num_classes, ignore_value=ignore_value,
                         value_map=resolved, fix_help=layout_help + "\nMap raw values with DATASETS.FOLDER.VALUE_MAP.")
    if resolved:
        for d in dicts:
            d["sem_seg_value_map"] = resolved  # one shared dict (labels.read_dataset_label applies it)
    return dicts


def register_folder_dataset(name: str, *, train_images: str, train_labels: str, val_images: str, val_labels: str,
                            classes: Sequence[str], ignore_value: int = 255, value_map: Sequence = (),
                            palette: Sequence[Sequence[int]] = (), image_suffix: str = ".jpg",
                            label_suffix: str = ".png") -> List[str]:
    """Register ``<name>_train`` and ``<name>_val`` (the arguments are ``DATASETS.FOLDER``'s keys);
    returns the two names. Nothing is read until the trainer asks for a split."""
    if not name:
        raise ConfigError("DATASETS.FOLDER.NAME is empty; give the dataset a name, e.g. DATASETS.FOLDER.NAME my.")
    classes = [str(c) for c in classes]
    if not classes:
        raise ConfigError(f"DATASETS.FOLDER.CLASSES is empty for dataset '{name}'; list the class names in "
                          "training-id order, e.g. DATASETS.FOLDER.CLASSES \"['background', 'object']\".")
    if palette and len(palette) != len(classes):
        raise ConfigError(f"DATASETS.FOLDER.PALETTE has {len(palette)} colours for {len(classes)} classes "
                          f"{classes}; give one [r, g, b] per class, or [] for distinct colours.")
    pairs = _parse_value_map(value_map)
    bad = [(raw, new) for raw, new in pairs if not (0 <= new < len(classes) or new == ignore_value)]
    if bad:
        raise ConfigError(f"DATASETS.FOLDER.VALUE_MAP maps to ids {[new for _, new in bad]} outside the "
                          f"{len(classes)} classes [0, {len(classes) - 1}] and the ignore value {ignore_value}.")
    for raw, _ in pairs:
        _colour(raw)
    folders = {"train": (train_images, train_labels), "val": (val_images, val_labels)}
    for split, pair in folders.items():
        for kind, path in zip(("IMAGES", "LABELS"), pair):
            if not path:
                raise ConfigError(f"DATASETS.FOLDER.{split.upper()}_{kind} is empty for dataset '{name}'; "
                                  "give its folder.")
    layout = _layout_help(name, folders, image_suffix, label_suffix)
    colours = [list(c) for c in palette] or spread_colors(len(classes))
    names = []
    for split, (images, labels) in folders.items():
        full = f"{name}_{split}"
        images, labels = os.path.abspath(os.path.expanduser(images)), os.path.abspath(os.path.expanduser(labels))
        register_sem_seg(
            full,
            lambda n=full, i=images, lb=labels: load_user_folder(
                n, i, lb, num_classes=len(classes), ignore_value=ignore_value, value_map=pairs,
                image_suffix=image_suffix, label_suffix=label_suffix, layout_help=layout),
            stuff_classes=list(classes), stuff_colors=colours, ignore_label=ignore_value,
            image_root=images, sem_seg_root=labels,
        )
        names.append(full)
    return names


def register_config_datasets(cfg) -> List[str]:
    """Register the dataset of ``DATASETS.FOLDER`` (nothing when its NAME is empty); returns its names.

    Its class count must be ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``; its ignore value is
    ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``."""
    f = cfg.DATASETS.FOLDER
    if not f.NAME:
        return []
    head = cfg.MODEL.SEM_SEG_HEAD
    if len(f.CLASSES) != head.NUM_CLASSES:
        raise ConfigError(
            f"DATASETS.FOLDER.CLASSES names {len(f.CLASSES)} classes {list(f.CLASSES)} but "
            f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {head.NUM_CLASSES}; write MODEL.SEM_SEG_HEAD.NUM_CLASSES "
            f"{len(f.CLASSES)} (or list every class).")
    return register_folder_dataset(
        f.NAME, train_images=f.TRAIN_IMAGES, train_labels=f.TRAIN_LABELS, val_images=f.VAL_IMAGES,
        val_labels=f.VAL_LABELS, classes=f.CLASSES, ignore_value=head.IGNORE_VALUE, value_map=f.VALUE_MAP,
        palette=f.PALETTE, image_suffix=f.IMAGE_SUFFIX, label_suffix=f.LABEL_SUFFIX)
