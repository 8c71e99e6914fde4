#!/usr/bin/env python
"""Convert ADE20K's official annotations to detectron2's (``ade20k_sem_seg_{train,val}``).

    python datasets/prepare_ade20k_sem_seg.py            # $DETECTRON2_DATASETS or ./datasets
    python datasets/prepare_ade20k_sem_seg.py --root /data --workers 8

Input: ``ADEChallengeData2016/annotations/{training,validation}/*.png`` (ADEChallengeData2016.zip),
values 0 = "other objects", 1..150 the classes. Output:
``ADEChallengeData2016/annotations_detectron2/{training,validation}/*.png``, values 0..149,
255 = ignore: the conversion of detectron2's and Mask2Former's ``prepare_ade20k_sem_seg.py``.
Resumable (an output is kept unless its source is newer; ``--force`` redoes them); values above 150 are an error
naming the files.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _label_jobs import base_parser, fail, run_jobs, save_png  # noqa: E402

SPLITS = ("training", "validation")


def convert(src: str, dst: str):
    with Image.open(src) as im:
        if im.mode not in ("L", "P"):
            return f"mode {im.mode} (expected a single-channel PNG of class indices)"
        raw = np.asarray(im)
    if raw.max() > 150:
        return f"values {sorted(int(v) for v in np.unique(raw) if v > 150)[:10]} above 150"
    save_png((raw.astype(np.int16) - 1).astype(np.uint8), dst)  # 0 -> 255 (ignore), k -> k - 1
    return None


def main(argv=None) -> int:
    p = base_parser(__doc__)
    args = p.parse_args(argv)
    base = os.path.join(args.root, "ADEChallengeData2016")
    for split in SPLITS:
        src_dir = os.path.join(base, "annotations", split)
        if not os.path.isdir(src_dir):
            fail(f"{src_dir!r} does not exist: unzip ADEChallengeData2016.zip into {args.root!r}.")
        names = sorted(f for f in os.listdir(src_dir) if f.endswith(".png"))
        if not names:
            fail(f"no *.png annotation in {src_dir!r}.")
        out = os.path.join(base, "annotations_detectron2", split)
        jobs = [(os.path.join(src_dir, n), os.path.join(out, n)) for n in names]
        done, kept = run_jobs(jobs, convert, workers=args.workers, force=args.force, desc=f"ADE20K {split}")
        print(f"{split}: {len(names)} labels in {out} ({done} converted, {kept} kept from an earlier run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
