#!/usr/bin/env python
"""Convert the official COCO-Stuff-164k label maps to detectron2's contiguous labels.

    python datasets/prepare_coco_stuff_164k.py                   # $DETECTRON2_DATASETS or ./datasets
    python datasets/prepare_coco_stuff_164k.py --root /data --workers 16

Input: ``coco/stuffthingmaps/{train2017,val2017}/*.png`` (``stuffthingmaps_trainval2017.zip``
unzipped into ``coco/stuffthingmaps``; ``coco/stuffthingmaps_trainval2017`` is found too),
values = COCO category id - 1 (0..181), 255 = unlabeled.
Output: ``coco/stuffthingmaps_detectron2/{train2017,val2017}/*.png``, values 0..170 (the 171
used ids in increasing order), 255 = ignore (unlabeled and the 11 unused ids).

* parallel (a pool of ``--workers`` processes) with a progress bar;
* idempotent and resumable: each output is written to a temporary file and renamed, and a
  journal (``.<split>.journal.jsonl`` next to the outputs) records every finished file with
  its source's size and modification time (ns), so a second run skips what is done, an
  interrupted run continues where it stopped, and a source edited since is converted again;
* images whose labels are all ignore are kept (a label of 255 everywhere), counted and
  listed in ``<split>_report.json``, not dropped;
* raw values that are not official (182..254) are an error naming the files; unused ids
  (never present in the official maps) become 255 and are counted;
* each label's size is compared with its image's (header only) when the image is there.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META_PATH = os.path.join(REPO, "projects", "segdistill", "data", "datasets", "coco_stuff_meta.py")
SPLITS = ("train2017", "val2017")
RAW_DIRS = ("stuffthingmaps", "stuffthingmaps_trainval2017")
OUT_DIR = "stuffthingmaps_detectron2"

logger = logging.getLogger("prepare_coco_stuff_164k")


def load_meta():
    """The label-space module, loaded from its file (no torch/detectron2 import)."""
    spec = importlib.util.spec_from_file_location("coco_stuff_meta", META_PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_LUT: Optional[np.ndarray] = None


def _init_worker(lut: np.ndarray) -> None:
    global _LUT
    _LUT = lut


def source_stamp(path: str) -> List[int]:
    """[size, modification time in ns] of a source file: what the journal compares."""
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns)]


def _unchanged(rec: dict, src: str, dst: str) -> bool:
    """Whether the journal's record ``rec`` of ``src`` (converted into ``dst``) still holds."""
    if "error" in rec or "invalid_values" in rec or not os.path.exists(dst):
        return False
    if "source" in rec:
        return rec["source"] == source_stamp(src)
    # a journal written before sources were stamped: an output older than its source is stale
    return os.stat(dst).st_mtime_ns >= os.stat(src).st_mtime_ns


def convert_one(job) -> dict:
    """Convert one label file; returns its statistics (no output written for invalid values)."""
    src, dst, image = job
    name = os.path.basename(src)
    rec = {"name": name, "source": source_stamp(src)}  # stamped before reading: an edit during the run is seen
    try:
        with Image.open(src) as im:
            if im.mode not in ("L", "P"):
                return {**rec, "error": f"mode {im.mode} (expected an 8-bit single-channel PNG)"}
            raw = np.asarray(im)
    except Exception as e:  # noqa: BLE001
        return {**rec, "error": f"{type(e).__name__}: {e}"}
    counts = np.bincount(raw.ravel(), minlength=256)
    present = np.nonzero(counts)[0]
    invalid = [int(v) for v in present if 181 < v < 255]
    if invalid:
        return {**rec, "invalid_values": invalid}
    out = _LUT[raw]
    rec["size"] = [int(raw.shape[1]), int(raw.shape[0])]
    rec["all_ignore"] = bool((out == 255).all())
    unused = {int(v) + 1: int(counts[v]) for v in present if v < 255 and _LUT[v] == 255}
    if unused:
        rec["unused_id_pixels"] = unused
    if image is not None:
        try:
            with Image.open(image) as im:
                rec["image_size"] = list(im.size)
        except FileNotFoundError:
            rec["image_size"] = None
    tmp = f"{dst}.tmp{os.getpid()}.png"
    Image.fromarray(out).save(tmp)
    os.replace(tmp, dst)
    return rec


def _read_journal(path: str) -> Dict[str, dict]:
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by an interruption
                done[rec["name"]] = rec
    return done


def convert_split(coco: str, raw_root: str, split: str, workers: int, force: bool, lut: np.ndarray) -> dict:
    src_dir = os.path.join(raw_root, split)
    out_dir = os.path.join(coco, OUT_DIR, split)
    img_dir = os.path.join(coco, split)
    if not os.path.isdir(src_dir):
        raise SystemExit(f"error: {src_dir!r} does not exist: unzip stuffthingmaps_trainval2017.zip into "
                         f"{raw_root!r} (it holds train2017/ and val2017/). See datasets/README.md.")
    os.makedirs(out_dir, exist_ok=True)
    journal_path = os.path.join(coco, OUT_DIR, f".{split}.journal.jsonl")
    if force and os.path.exists(journal_path):
        os.remove(journal_path)
    done = _read_journal(journal_path)
    names = sorted(f for f in os.listdir(src_dir) if f.endswith(".png"))
    if not names:
        raise SystemExit(f"error: no *.png label in {src_dir!r}.")
    has_images = os.path.isdir(img_dir)
    todo = []
    for n in names:
        dst = os.path.join(out_dir, n)
        if not force and n in done and _unchanged(done[n], os.path.join(src_dir, n), dst):
            continue
        image = os.path.join(img_dir, n[:-4] + ".jpg") if has_images else None
        todo.append((os.path.join(src_dir, n), dst, image))
    logger.info("%s: %d labels, %d already converted (sources unchanged), %d to convert (%d workers)",
                split, len(names), len(names) - len(todo), len(todo), workers)
    start = time.perf_counter()
    if todo:
        from tqdm import tqdm

        with open(journal_path, "a") as journal:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            with ctx.Pool(workers, initializer=_init_worker, initargs=(lut,)) if workers > 1 else _Serial(lut) as pool:
                for rec in tqdm(pool.imap_unordered(convert_one, todo, chunksize=16), total=len(todo),
                                desc=f"COCO-Stuff {split}", unit="label"):
                    journal.write(json.dumps(rec) + "\n")
                    journal.flush()
                    done[rec["name"]] = rec
    report = _report(split, names, done, has_images, len(todo), time.perf_counter() - start)
    with open(os.path.join(coco, OUT_DIR, f"{split}_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


class _Serial:
    """Pool stand-in for --workers 1 (and tests): same interface, this process."""

    def __init__(self, lut):
        _init_worker(lut)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap_unordered(fn, jobs, chunksize=1):
        return map(fn, jobs)


def _report(split: str, names: List[str], done: Dict[str, dict], has_images: bool, converted: int, seconds: float) -> dict:
    recs = [done[n] for n in names if n in done]
    unused: Dict[int, int] = {}
    for r in recs:
        for k, v in r.get("unused_id_pixels", {}).items():
            unused[int(k)] = unused.get(int(k), 0) + v
    return {
        "split": split,
        "labels": len(names),
        "converted_this_run": converted,
        "seconds_this_run": round(seconds, 1),
        "all_ignore": sorted(r["name"] for r in recs if r.get("all_ignore")),
        "unused_id_pixels": {str(k): v for k, v in sorted(unused.items())},
        "invalid_values": {r["name"]: r["invalid_values"] for r in recs if "invalid_values" in r},
        "unreadable": {r["name"]: r["error"] for r in recs if "error" in r},
        "missing_images": sorted(r["name"] for r in recs if has_images and r.get("image_size", 0) is None),
        "size_mismatch": {r["name"]: {"label": r["size"], "image": r["image_size"]} for r in recs
                          if r.get("image_size") and r["image_size"] != r["size"]},
        "images_checked": has_images,
    }


def _summary(report: dict) -> List[str]:
    lines = [f"{report['split']}: {report['labels']} labels ({report['converted_this_run']} converted in this run, "
             f"{report['seconds_this_run']} s)."]
    if report["all_ignore"]:
        n = len(report["all_ignore"])
        lines.append(f"  {n} labels are all ignore (kept; listed in {report['split']}_report.json): "
                     + ", ".join(report["all_ignore"][:5]) + (" ..." if n > 5 else ""))
    if report["unused_id_pixels"]:
        lines.append(f"  pixels of unused COCO ids (mapped to 255): {report['unused_id_pixels']}")
    for key, what in (("invalid_values", "hold values that are not official ids - 1 (0..181) or 255"),
                      ("unreadable", "cannot be read"), ("size_mismatch", "differ in size from their image")):
        if report[key]:
            items = list(report[key].items())
            lines.append(f"  ERROR: {len(items)} labels {what}: " + "; ".join(f"{k} {v}" for k, v in items[:5])
                         + (" ..." if len(items) > 5 else ""))
    if report["missing_images"]:
        n = len(report["missing_images"])
        lines.append(f"  WARNING: {n} labels have no image in coco/{report['split']}/: "
                     + ", ".join(report["missing_images"][:5]) + (" ..." if n > 5 else ""))
    if not report["images_checked"]:
        lines.append(f"  note: coco/{report['split']}/ is absent; label sizes were not compared with the images.")
    return lines


def _mark_checked(root: str, split: str) -> None:
    """Tell the dataset loader these labels are checked, so its first load only stats files."""
    try:
        sys.path.insert(0, os.path.join(REPO, "projects"))
        from segdistill.data.datasets.coco_stuff import load_coco_stuff_sem_seg
        from segdistill.data.datasets.folder import mark_verified

        dicts = load_coco_stuff_sem_seg(root, split, check="layout")
        mark_verified(dicts, num_classes=171, dataset_name=f"coco_2017_{split[:-4]}_stuff_sem_seg")
    except Exception as e:  # noqa: BLE001  (the loader checks by itself then)
        logger.info("Labels not marked as checked (%s: %s); the first load checks them.", type(e).__name__, e)


def main(argv=None) -> int:
    default_root = os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=default_root, help="datasets root holding coco/ (default: $DETECTRON2_DATASETS or ./datasets)")
    p.add_argument("--input", default=None, help="folder holding the official train2017/ val2017/ maps "
                   "(default: coco/stuffthingmaps or coco/stuffthingmaps_trainval2017)")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--force", action="store_true", help="convert again, ignoring finished files")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    coco = os.path.join(args.root, "coco")
    raw_root = args.input or next((os.path.join(coco, d) for d in RAW_DIRS if os.path.isdir(os.path.join(coco, d))), None)
    if raw_root is None:
        raise SystemExit(
            f"error: no official label maps under {coco!r} (looked for {' or '.join(RAW_DIRS)}). Download "
            "stuffthingmaps_trainval2017.zip (COCO-Stuff repository) and unzip it into "
            f"{os.path.join(coco, 'stuffthingmaps')}; set DETECTRON2_DATASETS or --root for another place. "
            "See datasets/README.md."
        )
    lut = load_meta().raw_to_contiguous_lut()
    failed = False
    for split in args.splits:
        report = convert_split(coco, raw_root, split, max(1, args.workers), args.force, lut)
        for line in _summary(report):
            logger.info(line)
        bad = report["invalid_values"] or report["unreadable"] or report["size_mismatch"]
        failed |= bool(bad)
        if not bad and report["images_checked"] and not report["missing_images"]:
            _mark_checked(args.root, split)
    if failed:
        logger.error("Some labels could not be converted (see above); fix or remove them and run again.")
        return 1
    logger.info("Done: %s", os.path.join(coco, OUT_DIR))
    return 0


if __name__ == "__main__":
    sys.exit(main())
