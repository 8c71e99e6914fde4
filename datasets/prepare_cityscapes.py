#!/usr/bin/env python
"""Make Cityscapes' ``*_gtFine_labelTrainIds.png`` (19 train ids, 255 = ignore) with cityscapesscripts.

    python datasets/prepare_cityscapes.py                  # $DETECTRON2_DATASETS/cityscapes or ./datasets/cityscapes
    python datasets/prepare_cityscapes.py --root /data --workers 16

Checks the layout first (``cityscapes/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and
``cityscapes/gtFine/<split>/<city>/*_gtFine_polygons.json``, one polygon file per image),
then rasterises every polygon file with cityscapesscripts' own ``createLabelImage(...,
"trainIds")`` (the mapping of ``cityscapesscripts/helpers/labels.py``, as its
``createTrainIdLabelImgs`` does) in a pool of processes with a progress bar. Finished files
are skipped (outputs are written to a temporary file and renamed), so a second run does
nothing and an interrupted run resumes; ``--force`` redoes everything. Finally it loads each
split as training will, which checks every label's size and values once (remembered, so
the first training run does not repeat it).
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import sys
from typing import Dict, List

SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"
POLYGON_SUFFIX = "_gtFine_polygons.json"
OUT_SUFFIX = "_gtFine_labelTrainIds.png"

logger = logging.getLogger("prepare_cityscapes")


def _stems(folder: str, suffix: str) -> Dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f.endswith(suffix):
                rel = os.path.relpath(os.path.join(dirpath, f), folder)
                out[rel[: -len(suffix)]] = os.path.join(dirpath, f)
    return out


def _short(items, limit=5) -> str:
    items = sorted(items)
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_layout(base: str, splits: List[str]) -> Dict[str, Dict[str, str]]:
    """{split: {stem: polygon json}}; SystemExit with what is wrong and what was expected."""
    expected = (f"Expected (from leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip):\n"
                f"  {base}/leftImg8bit/{{train,val,test}}/<city>/*{IMAGE_SUFFIX}\n"
                f"  {base}/gtFine/{{train,val,test}}/<city>/*{POLYGON_SUFFIX}\n"
                "Set DETECTRON2_DATASETS (or --root) to the folder holding cityscapes/. See datasets/README.md.")
    if not os.path.isdir(base):
        raise SystemExit(f"error: {base!r} does not exist.\n{expected}")
    problems, jobs = [], {}
    for split in splits:
        img_dir, gt_dir = os.path.join(base, "leftImg8bit", split), os.path.join(base, "gtFine", split)
        missing = [d for d in (img_dir, gt_dir) if not os.path.isdir(d)]
        if missing:
            problems.append(f"{split}: missing folder(s) {', '.join(map(repr, missing))}")
            continue
        images = _stems(img_dir, IMAGE_SUFFIX)
        polygons = _stems(gt_dir, POLYGON_SUFFIX)
        if not images:
            problems.append(f"{split}: no *{IMAGE_SUFFIX} in {img_dir!r}")
        no_poly = set(images) - set(polygons)
        no_image = set(polygons) - set(images)
        if no_poly:
            problems.append(f"{split}: {len(no_poly)} of {len(images)} images have no *{POLYGON_SUFFIX}: {_short(no_poly)}")
        if no_image:
            problems.append(f"{split}: {len(no_image)} polygon files have no image: {_short(no_image)}")
        jobs[split] = polygons
    if problems:
        raise SystemExit("error: the Cityscapes layout is not as expected:\n  - " + "\n  - ".join(problems) + "\n" + expected)
    return jobs


def convert_one(job) -> tuple:
    """(polygon file, error or None): rasterise one file to train ids."""
    src, dst = job
    try:
        from cityscapesscripts.helpers.annotation import Annotation
        from cityscapesscripts.preparation.json2labelImg import createLabelImage

        annotation = Annotation()
        annotation.fromJsonFile(src)
        image = createLabelImage(annotation, "trainIds")
        tmp = f"{dst}.tmp{os.getpid()}.png"
        image.save(tmp)
        os.replace(tmp, dst)
        return src, None
    except (Exception, SystemExit) as e:  # cityscapesscripts exits on unknown labels
        return src, f"{type(e).__name__}: {e}"


def main(argv=None) -> int:
    default_root = os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=default_root, help="datasets root holding cityscapes/ (default: $DETECTRON2_DATASETS or ./datasets)")
    p.add_argument("--splits", nargs="+", default=None, choices=SPLITS,
                   help="default: train and val, and test when its folders are there")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--force", action="store_true", help="regenerate existing labelTrainIds files")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        import cityscapesscripts  # noqa: F401
    except ImportError:
        raise SystemExit("error: cityscapesscripts is not installed: pip install cityscapesscripts "
                         "(it is in requirements.txt).")
    base = os.path.join(args.root, "cityscapes")
    splits = args.splits or [s for s in SPLITS if s != "test" or os.path.isdir(os.path.join(base, "leftImg8bit", "test"))]
    polygons = check_layout(base, splits)
    todo = []
    total = 0
    for split in splits:
        for stem, src in sorted(polygons[split].items()):
            total += 1
            dst = src[: -len(POLYGON_SUFFIX)] + OUT_SUFFIX
            if args.force or not os.path.exists(dst):
                todo.append((src, dst))
    logger.info("Cityscapes %s: %d polygon files, %d done, %d to convert (%d workers).",
                "/".join(splits), total, total - len(todo), len(todo), args.workers)
    errors = []
    if todo:
        from tqdm import tqdm

        if args.workers > 1:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            with ctx.Pool(args.workers) as pool:
                results = list(tqdm(pool.imap_unordered(convert_one, todo, chunksize=8), total=len(todo),
                                    desc="labelTrainIds", unit="file"))
        else:
            results = [convert_one(j) for j in tqdm(todo, desc="labelTrainIds", unit="file")]
        errors = [(src, err) for src, err in results if err]
    if errors:
        logger.error("%d files failed: %s", len(errors), "; ".join(f"{s} ({e})" for s, e in errors[:5]))
        return 1
    logger.info("Done: *%s next to the polygon files under %s.", OUT_SUFFIX, os.path.join(base, "gtFine"))
    return check_loader(args.root, splits)


def check_loader(root: str, splits: List[str]) -> int:
    """Load each split as training will (layout, label sizes and values, checked once and remembered)."""
    try:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects"))
        from segdistill.data.datasets.cityscapes import load_cityscapes_sem_seg
    except ImportError as e:  # segdistill's own dependencies missing: the loader checks at training time
        logger.info("Skipping the loader check (%s).", e)
        return 0
    for split in splits:
        try:
            n = len(load_cityscapes_sem_seg(root, split))
        except (OSError, ValueError) as e:
            logger.error("%s", e)
            return 1
        logger.info("cityscapes_fine_sem_seg_%s: %d images, labels checked.", split, n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
