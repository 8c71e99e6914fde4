#!/usr/bin/env python
"""Build PASCAL VOC 2012's augmented training set with SBD (``voc_2012_sem_seg_train_aug``).

    python datasets/prepare_voc_sbd.py                   # $DETECTRON2_DATASETS or ./datasets
    python datasets/prepare_voc_sbd.py --sbd /data/benchmark_RELEASE/dataset --workers 8

Input: ``VOCdevkit/VOC2012`` (VOCtrainval_11-May-2012.tar: ``JPEGImages``, ``SegmentationClass``
palette PNGs, ``ImageSets/Segmentation/{train,val}.txt``) and SBD (benchmark.tgz:
``benchmark_RELEASE/dataset/{cls/*.mat,train.txt,val.txt}``; default
``VOCdevkit/VOCaug/dataset``, mmsegmentation's place for it).
Output: ``VOCdevkit/VOC2012/SegmentationClassAug/<id>.png`` (class indices 0..20, 255 = void)
for every id of ``ImageSets/Segmentation/train_aug.txt`` = (VOC train + SBD train + SBD val)
minus VOC val: 10582 images with the official files. A VOC label is used where VOC has one
(SBD's ``GTcls.Segmentation`` otherwise). Resumable (``--force`` redoes it).
"""
from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _label_jobs import base_parser, fail, read_ids, run_jobs, save_png  # noqa: E402


def _check(label: np.ndarray, src: str):
    bad = sorted(int(v) for v in np.unique(label) if v > 20 and v != 255)
    return f"values {bad[:10]} are neither a class (0..20) nor 255" if bad else None


def convert(src: str, dst: str):
    if src.endswith(".mat"):
        from scipy.io import loadmat

        label = np.asarray(loadmat(src, squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation, np.uint8)
    else:
        with Image.open(src) as im:  # VOC's palette PNG: the pixel values are the class indices
            if im.mode not in ("P", "L"):
                return f"mode {im.mode} (expected VOC's palette PNG)"
            label = np.asarray(im)
    problem = _check(label, src)
    if problem:
        return problem
    save_png(label, dst)
    return None


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--sbd", default="", help="SBD's dataset/ folder (default: <root>/VOCdevkit/VOCaug/dataset)")
    args = p.parse_args(argv)
    voc = os.path.join(args.root, "VOCdevkit", "VOC2012")
    sbd = args.sbd or os.path.join(args.root, "VOCdevkit", "VOCaug", "dataset")
    seg_sets = os.path.join(voc, "ImageSets", "Segmentation")
    for path in (os.path.join(voc, "JPEGImages"), os.path.join(voc, "SegmentationClass"),
                 os.path.join(seg_sets, "train.txt"), os.path.join(seg_sets, "val.txt")):
        if not os.path.exists(path):
            fail(f"{path!r} does not exist: untar VOCtrainval_11-May-2012.tar into {args.root!r} (VOCdevkit/VOC2012).")
    for path in (os.path.join(sbd, "cls"), os.path.join(sbd, "train.txt"), os.path.join(sbd, "val.txt")):
        if not os.path.exists(path):
            fail(f"{path!r} does not exist: untar SBD's benchmark.tgz and move benchmark_RELEASE/dataset to {sbd!r} "
                 "(or pass --sbd).")
    voc_train, voc_val = read_ids(os.path.join(seg_sets, "train.txt")), set(read_ids(os.path.join(seg_sets, "val.txt")))
    sbd_ids = read_ids(os.path.join(sbd, "train.txt")) + read_ids(os.path.join(sbd, "val.txt"))
    train_aug = sorted((set(voc_train) | set(sbd_ids)) - voc_val)
    voc_labels = os.path.join(voc, "SegmentationClass")
    out = os.path.join(voc, "SegmentationClassAug")
    jobs, missing = [], []
    for i in train_aug:
        src = os.path.join(voc_labels, i + ".png")
        if not os.path.isfile(src):
            src = os.path.join(sbd, "cls", i + ".mat")
        if not os.path.isfile(src):
            missing.append(i)
            continue
        jobs.append((src, os.path.join(out, i + ".png")))
    if missing:
        fail(f"{len(missing)} ids of the augmented set have no label in {voc_labels!r} nor in {os.path.join(sbd, 'cls')!r}: "
             f"{', '.join(missing[:5])}")
    images = os.path.join(voc, "JPEGImages")
    no_image = [i for i in train_aug if not os.path.isfile(os.path.join(images, i + ".jpg"))]
    if no_image:
        fail(f"{len(no_image)} ids of the augmented set have no image in {images!r}: {', '.join(no_image[:5])}")
    done, kept = run_jobs(jobs, convert, workers=args.workers, force=args.force, desc="VOC + SBD")
    listing = os.path.join(seg_sets, "train_aug.txt")
    tmp = listing + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(train_aug) + "\n")
    os.replace(tmp, listing)
    print(f"train_aug: {len(train_aug)} images ({sum(s.startswith(voc_labels) for s, _ in jobs)} labels from VOC, "
          f"the others from SBD) in {out} ({done} converted, {kept} kept); list {listing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
