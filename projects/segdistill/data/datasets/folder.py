"""Image/label folder pairs -> detectron2 dataset dicts, with errors that say what is wrong.

Every semantic-segmentation dataset of the project (the demo set, CamVid, COCO-Stuff,
Cityscapes) is a folder of images and a folder of single-channel label PNGs with matching
file stems. Problems are found when the dataset is loaded (``DatasetCatalog.get``), not
deep inside training, in two steps:

1. :func:`load_sem_seg_folder` (always, it only lists files): missing folders, images
   without labels, labels without images -> :class:`DatasetLayoutError`.
2. :func:`verify_sem_seg_dicts` (datasets that pass their label space): every labelled
   image and its label are decoded; the label's size against its image's, its mode
   (single channel) and its values (classes, the ignore value, after the dataset's
   raw-value map) -> :class:`DatasetContentError`. A file that cannot be decoded (a
   truncated or corrupt image or label) is not an error here: its record is flagged with
   ``record["unreadable"] = {"file": path, "error": "..."}`` and a warning names it; the
   training loader then stops or skips it (``DATALOADER.ON_UNREADABLE``), evaluation and
   the mapper refuse it (:class:`UnreadableFileError`). Decoding costs a few milliseconds
   per image (JPEGs are decoded at 1/8 scale, which still reads every byte), so a dataset
   that was checked is remembered: a marker named by a fingerprint of the files (paths,
   sizes, modification times) and of the label space is written under
   ``$SEGDISTILL_CACHE_DIR`` (default ``~/.cache/segdistill``) with the list of unreadable
   files, and later loads only ``stat`` the files. Changing, adding or removing a file
   re-checks. ``SEGDISTILL_DATASET_CHECK=layout`` skips step 2. The mapper and the
   evaluator check each label again when they read it.

Every record of :func:`load_sem_seg_folder` carries ``dataset_name``, so that errors raised
while reading it (in the mapper, possibly hours into training) name its dataset.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "load_sem_seg_folder", "verify_sem_seg_dicts", "DatasetLayoutError", "DatasetContentError",
    "dataset_check_cache_dir", "mark_verified", "CHECK_ENV", "UnreadableFileError", "unreadable_records",
]

logger = logging.getLogger(__name__)

#: Environment variable: "full" (default) or "layout" (skip the label size/value check).
CHECK_ENV = "SEGDISTILL_DATASET_CHECK"
_CHECK_VERSION = 2  # 2: images are decoded too, unreadable files are recorded
_LABEL_MODES = ("L", "P", "I", "I;16", "1")
_VERIFIED: Dict[str, Dict[str, str]] = {}  # fingerprints checked in this process -> {unreadable file: error}


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder is missing or its images and labels do not pair up."""


class DatasetContentError(ValueError):
    """Labels of the wrong size, mode or values, found when the dataset is loaded."""


class UnreadableFileError(OSError):
    """An image or label file that cannot be decoded; the message names the file and its dataset.

    Takes one message argument, so that PyTorch can re-raise it from a data-loader worker."""


def unreadable_records(dicts: Sequence[dict]) -> List[dict]:
    """The records flagged by :func:`verify_sem_seg_dicts` as holding a file that cannot be decoded."""
    return [d for d in dicts if "unreadable" in d]


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


def _strip(stems: Dict[str, str], suffix: str) -> Dict[str, str]:
    if not suffix:
        return stems
    return {s[: len(s) - len(suffix)]: p for s, p in stems.items() if s.endswith(suffix)}


def load_sem_seg_folder(
    image_dir: str,
    label_dir: str,
    *,
    dataset_name: str,
    layout_help: str,
    image_ext: str = ".png",
    label_ext: str = ".png",
    image_suffix: str = "",
    label_suffix: str = "",
    allow_unlabeled: bool = False,
) -> List[dict]:
    """Pair ``image_dir/<stem><image_suffix><image_ext>`` with ``label_dir/<stem><label_suffix><label_ext>``.

    Stems may contain sub-folders (Cityscapes' cities). ``layout_help`` is printed in every
    error: the directory tree the dataset expects and where (naming ``DETECTRON2_DATASETS``).
    Images without labels and labels without images are errors naming the files and counts
    (unless ``allow_unlabeled``: a test split).
    """
    for kind, folder in (("image", image_dir), ("label", label_dir)):
        if not os.path.isdir(folder):
            raise DatasetLayoutError(
                f"Dataset '{dataset_name}': {kind} folder {folder!r} does not exist.\n{layout_help}"
            )
    images = _strip(_list(image_dir, image_ext), image_suffix)
    labels = _strip(_list(label_dir, label_ext), label_suffix)
    if not images:
        raise DatasetLayoutError(
            f"Dataset '{dataset_name}': no '*{image_suffix}{image_ext}' image in {image_dir!r}.\n{layout_help}"
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
        d = {"file_name": images[stem], "image_id": stem, "dataset_name": dataset_name}
        if stem in labels:
            d["sem_seg_file_name"] = labels[stem]
        dicts.append(d)
    return dicts


# ----------------------------------------------------------------------------- content check
def dataset_check_cache_dir() -> str:
    """Where markers of datasets that passed :func:`verify_sem_seg_dicts` are kept."""
    base = os.environ.get("SEGDISTILL_CACHE_DIR")
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "segdistill")
    return os.path.join(base, "dataset_checks")


def _fingerprint(dicts: Sequence[dict], params: dict) -> str:
    h = hashlib.sha1(json.dumps(params, sort_keys=True).encode())
    for d in dicts:
        for key in ("file_name", "sem_seg_file_name"):
            path = d.get(key)
            if path:
                try:
                    st = os.stat(path)
                    h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
                except OSError:
                    h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()


@contextlib.contextmanager
def _lock(path: str):
    """An exclusive file lock (processes started together check once); no-op if unwritable."""
    try:
        import fcntl

        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(path, "w")
    except (OSError, ImportError):
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _present_values(label: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(values present, their pixel counts)."""
    if label.dtype == np.uint8:
        counts = np.bincount(label.ravel(), minlength=256)
        values = np.nonzero(counts)[0]
        return values, counts[values]
    return np.unique(label, return_counts=True)


def _check_record(d: dict, num_classes: int, ignore_value: int, value_map: Mapping[int, int]) -> List[tuple]:
    """Problems of one record: ("size"|"mode"|"values"|"unreadable", ...)."""
    from PIL import Image

    issues = []
    try:
        with Image.open(d["file_name"]) as im:
            image_size = im.size
            if im.format == "JPEG":  # DCT scaling: every byte is still read and entropy-decoded
                im.draft(im.mode, (max(1, image_size[0] // 8), max(1, image_size[1] // 8)))
            im.load()
    except Exception as e:  # noqa: BLE001  (any decoder error names the file)
        return [("unreadable", d["file_name"], f"{type(e).__name__}: {e}")]
    label_path = d["sem_seg_file_name"]
    try:
        with Image.open(label_path) as im:
            if im.mode not in _LABEL_MODES:
                return [("mode", label_path, im.mode)]
            label_size = im.size
            label = np.asarray(im)
    except Exception as e:  # noqa: BLE001
        return [("unreadable", label_path, f"{type(e).__name__}: {e}")]
    if label_size != image_size:
        issues.append(("size", label_path, label_size, d["file_name"], image_size))
    values, counts = _present_values(label)
    bad, pixels = [], 0
    for v, c in zip(values.tolist(), counts.tolist()):
        m = value_map.get(v, v)
        if not (0 <= m < num_classes or m == ignore_value):
            bad.append(v)
            pixels += c
    if bad:
        issues.append(("values", label_path, bad, pixels))
    return issues


def _wh(size) -> str:
    return f"{size[0]}x{size[1]}"


def _format_issues(issues: List[tuple], total: int, num_classes: int, ignore_value: int,
                   value_map: Mapping[int, int], limit: int = 5) -> List[str]:
    by_kind: Dict[str, List[tuple]] = {}
    for it in issues:
        by_kind.setdefault(it[0], []).append(it)
    lines = []
    if "unreadable" in by_kind:
        items = sorted(by_kind["unreadable"], key=lambda t: t[1])
        shown = "; ".join(f"{p!r} ({err})" for _, p, err in items[:limit])
        lines.append(f"{len(items)} files cannot be read: {shown}" + (" ..." if len(items) > limit else ""))
    if "mode" in by_kind:
        items = sorted(by_kind["mode"], key=lambda t: t[1])
        shown = "; ".join(f"{p!r} (mode {m})" for _, p, m in items[:limit])
        lines.append(
            f"{len(items)} of {total} labels are not single-channel PNGs of class indices "
            f"(colour labels must be converted first): {shown}" + (" ..." if len(items) > limit else "")
        )
    if "size" in by_kind:
        items = sorted(by_kind["size"], key=lambda t: t[1])
        shown = "; ".join(f"{lp!r} is {_wh(ls)} but its image {ip!r} is {_wh(isz)}" for _, lp, ls, ip, isz in items[:limit])
        lines.append(
            f"{len(items)} of {total} labels do not have their image's size (width x height): {shown}"
            + (" ..." if len(items) > limit else "")
        )
    if "values" in by_kind:
        items = sorted(by_kind["values"], key=lambda t: t[1])
        all_bad = sorted({v for it in items for v in it[2]})
        shown = "; ".join(f"{p!r} {vals} ({px} pixels)" for _, p, vals, px in items[:limit])
        mapped = f" after mapping raw values {dict(value_map)}" if value_map else ""
        lines.append(
            f"{len(items)} of {total} labels hold values {all_bad[:20]}{' ...' if len(all_bad) > 20 else ''} that are "
            f"neither a class (0..{num_classes - 1}) nor the ignore value {ignore_value}{mapped}: {shown}"
            + (" ..." if len(items) > limit else "")
        )
    return lines


def verify_sem_seg_dicts(
    dicts: Sequence[dict],
    *,
    dataset_name: str,
    num_classes: int,
    ignore_value: int = 255,
    value_map: Optional[Mapping[int, int]] = None,
    fix_help: str = "",
    mode: Optional[str] = None,
) -> None:
    """Decode every labelled record's image and label and check the label's size, mode and
    values (see the module docstring). Records with a file that cannot be decoded are
    flagged (``record["unreadable"]``), in place.

    Raises :class:`DatasetContentError` naming the files, their counts and ``fix_help``.
    ``mode`` overrides ``$SEGDISTILL_DATASET_CHECK`` ("full" or "layout").
    """
    mode = (mode or os.environ.get(CHECK_ENV) or "full").lower()
    if mode in ("layout", "off", "none", "0"):
        return
    if mode != "full":
        raise ValueError(f"{CHECK_ENV} must be 'full' or 'layout', got {mode!r}")
    value_map = {int(k): int(v) for k, v in (value_map or {}).items()}
    labeled = [d for d in dicts if "sem_seg_file_name" in d]
    if not labeled:
        return
    params = {"v": _CHECK_VERSION, "classes": num_classes, "ignore": ignore_value, "map": sorted(value_map.items())}
    fp = _fingerprint(labeled, params)
    if fp not in _VERIFIED:
        _VERIFIED[fp] = _checked(labeled, fp, params, dataset_name, num_classes, ignore_value, value_map, fix_help)
    unreadable = _VERIFIED[fp]
    if unreadable:
        _flag_unreadable(labeled, unreadable, dataset_name)


def _checked(labeled, fp, params, dataset_name, num_classes, ignore_value, value_map, fix_help) -> Dict[str, str]:
    """{unreadable file: error} of a dataset that passed (from its marker, or checked now)."""
    marker = os.path.join(dataset_check_cache_dir(), fp + ".json")
    cached = _read_marker(marker)
    if cached is not None:
        return cached
    with _lock(os.path.join(dataset_check_cache_dir(), ".lock")):
        cached = _read_marker(marker)
        if cached is not None:
            return cached
        start = time.perf_counter()
        issues = _scan(labeled, dataset_name, num_classes, ignore_value, value_map)
        unreadable = {it[1]: it[2] for it in issues if it[0] == "unreadable"}
        if len(unreadable) < len(issues):
            lines = _format_issues(issues, len(labeled), num_classes, ignore_value, value_map)
            raise DatasetContentError(
                f"Dataset '{dataset_name}' failed its load-time check ({len(labeled)} labelled images):\n  - "
                + "\n  - ".join(lines) + (f"\n{fix_help}" if fix_help else "")
            )
        _write_marker(marker, {"dataset": dataset_name, "labels": len(labeled), "checked": time.time(), **params,
                               "unreadable": unreadable})
        logger.info("Dataset '%s': %d images and labels decoded and checked in %.1fs (cached in %s).", dataset_name,
                    len(labeled), time.perf_counter() - start, os.path.dirname(marker))
    return unreadable


def _read_marker(path: str) -> Optional[Dict[str, str]]:
    """The unreadable files of a marker; None when there is no (valid) marker."""
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, ValueError):
        return None
    unreadable = content.get("unreadable", {}) if isinstance(content, dict) else None
    return dict(unreadable) if isinstance(unreadable, dict) else None


def _flag_unreadable(labeled: Sequence[dict], unreadable: Mapping[str, str], dataset_name: str) -> None:
    flagged = []
    for d in labeled:
        for key in ("file_name", "sem_seg_file_name"):
            if d[key] in unreadable:
                d["unreadable"] = {"file": d[key], "error": unreadable[d[key]]}
                flagged.append(d)
                break
    shown = "; ".join(f"{d['unreadable']['file']!r} ({d['unreadable']['error']})" for d in flagged[:5])
    logger.warning(
        "Dataset '%s': %d of %d labelled images have a file that cannot be decoded: %s%s. Training stops on them "
        "unless DATALOADER.ON_UNREADABLE is 'skip' (lazy configs: dataloader.train.on_unreadable='skip'); "
        "evaluation always stops. Replace or remove these files.", dataset_name, len(flagged), len(labeled), shown,
        " ..." if len(flagged) > 5 else "")


def _scan(labeled, dataset_name, num_classes, ignore_value, value_map) -> List[tuple]:
    def one(d):
        return _check_record(d, num_classes, ignore_value, value_map)

    workers = min(8, os.cpu_count() or 1) if len(labeled) > 64 else 1
    issues: List[tuple] = []
    with ThreadPoolExecutor(workers) as pool:
        results: Iterable = pool.map(one, labeled)
        if len(labeled) > 2000:
            from tqdm import tqdm

            logger.info("Dataset '%s': checking %d images and labels once (decoding, sizes, values) ...",
                        dataset_name, len(labeled))
            results = tqdm(results, total=len(labeled), desc=f"checking {dataset_name}", unit="image")
        for r in results:
            issues.extend(r)
    return issues


def _write_marker(path: str, content: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(content, f)
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache only costs a re-check next time
        logger.debug("Cannot write the dataset check marker %s: %s", path, e)


def mark_verified(dicts: Sequence[dict], *, num_classes: int, ignore_value: int = 255,
                  value_map: Optional[Mapping[int, int]] = None, dataset_name: str = "",
                  images_checked: bool = False) -> None:
    """Record ``dicts`` as checked, for tools that decoded every image and checked every label
    themselves (``images_checked=True``). A tool that checked the labels only (a label
    converter) leaves no marker: the first load decodes the images, once."""
    if not images_checked:
        logger.info("Dataset '%s': labels checked; its images are decoded once, on its first load.", dataset_name)
        return
    value_map = {int(k): int(v) for k, v in (value_map or {}).items()}
    labeled = [d for d in dicts if "sem_seg_file_name" in d]
    params = {"v": _CHECK_VERSION, "classes": num_classes, "ignore": ignore_value, "map": sorted(value_map.items())}
    fp = _fingerprint(labeled, params)
    _write_marker(os.path.join(dataset_check_cache_dir(), fp + ".json"),
                  {"dataset": dataset_name, "labels": len(labeled), "checked": time.time(), **params, "unreadable": {}})
