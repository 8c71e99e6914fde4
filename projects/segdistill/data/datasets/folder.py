"""Image/label folder pairs -> detectron2 dataset dicts, with errors that say what is wrong.

Every semantic-segmentation dataset of the project (the demo set, CamVid, COCO-Stuff) is a
folder of images and a folder of single-channel label PNGs with the same file stems. This
loader checks the layout when the dataset is loaded, not deep inside training.
"""
from __future__ import annotations

import os
from typing import Dict, List

__all__ = ["load_sem_seg_folder", "DatasetLayoutError"]


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder is missing or its images and labels do not pair up."""


def _list(folder: str, ext: str) -> Dict[str, str]:
    """stem (path relative to ``folder`` without the extension) -> full path."""
    out = {}
    for dirpath, _, files in os.walk(folder, followlinks=True):
        for f in files:
            if f.endswith(ext):
                rel = os.path.relpath(os.path.join(dirpath, f), folder)
                out[rel[: -len(ext)]] = os.path.join(dirpath, f)
    return out


def _names(stems, limit: int = 5) -> str:
    stems = sorted(stems)
    more = f" and {len(stems) - limit} more" if len(stems) > limit else ""
    return ", ".join(stems[:limit]) + more


def load_sem_seg_folder(
    image_dir: str,
    label_dir: str,
    *,
    dataset_name: str,
    layout_help: str,
    image_ext: str = ".png",
    label_ext: str = ".png",
    label_suffix: str = "",
    allow_unlabeled: bool = False,
) -> List[dict]:
    """Pair ``image_dir/<stem><image_ext>`` with ``label_dir/<stem><label_suffix><label_ext>``.

    ``layout_help`` is printed in every error: the directory tree the dataset expects and
    where (naming ``DETECTRON2_DATASETS``). Images without labels and labels without images
    are errors naming the files and counts (unless ``allow_unlabeled``: a test split).
    """
    for kind, folder in (("image", image_dir), ("label", label_dir)):
        if not os.path.isdir(folder):
            raise DatasetLayoutError(
                f"Dataset '{dataset_name}': {kind} folder {folder!r} does not exist.\n{layout_help}"
            )
    images = _list(image_dir, image_ext)
    labels = {
        stem[: len(stem) - len(label_suffix)]: path
        for stem, path in _list(label_dir, label_ext).items()
        if stem.endswith(label_suffix)
    }
    if not images:
        raise DatasetLayoutError(
            f"Dataset '{dataset_name}': no '*{image_ext}' image in {image_dir!r}.\n{layout_help}"
        )
    unlabeled = set(images) - set(labels)
    orphans = set(labels) - set(images)
    problems = []
    if unlabeled and not allow_unlabeled:
        problems.append(f"{len(unlabeled)} of {len(images)} images have no label in {label_dir!r}: {_names(unlabeled)}")
    if orphans:
        problems.append(f"{len(orphans)} labels have no image in {image_dir!r}: {_names(orphans)}")
    if problems:
        raise DatasetLayoutError(f"Dataset '{dataset_name}': " + "; ".join(problems) + f".\n{layout_help}")
    dicts = []
    for stem in sorted(images):
        d = {"file_name": images[stem], "image_id": stem}
        if stem in labels:
            d["sem_seg_file_name"] = labels[stem]
        dicts.append(d)
    return dicts
