#!/usr/bin/env python
"""Convert PASCAL-Context's annotations to its 59-class labels (``pascal_context_59_sem_seg_{train,val}``).

    python datasets/prepare_pascal_context.py            # $DETECTRON2_DATASETS or ./datasets
    python datasets/prepare_pascal_context.py --context /data/trainval --workers 8

Input: ``VOCdevkit/VOC2010`` (VOCtrainval_03-May-2010.tar: ``JPEGImages``,
``ImageSets/Main/{train,val}.txt``, 4998 / 5105 images) and PASCAL-Context's ``trainval.tar.gz``
(``trainval/<id>.mat`` with the 459-class ``LabelMap``, and ``labels.txt``; default
``VOCdevkit/VOC2010/trainval``). Output: ``VOCdevkit/VOC2010/annotations_detectron2/pc59_{train,val}/<id>.png``:
the 59 most frequent classes as 0..58 (alphabetical), everything else 255 (ignored). The 59
classes' ids are checked against ``labels.txt`` when it is there. Resumable (``--force``).
"""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _label_jobs import base_parser, fail, read_ids, run_jobs, save_png  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META_PATH = os.path.join(REPO, "projects", "segdistill", "data", "datasets", "pascal_meta.py")


def load_meta():
    """The label-space module, loaded from its file (no torch/detectron2 import)."""
    spec = importlib.util.spec_from_file_location("pascal_meta", META_PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_LUT = load_meta().pc59_lut()


def convert(src: str, dst: str):
    from scipy.io import loadmat

    label_map = np.asarray(loadmat(src)["LabelMap"])
    if label_map.ndim != 2 or label_map.max() >= len(_LUT):
        return f"LabelMap of shape {label_map.shape}, values up to {label_map.max()}"
    save_png(_LUT[label_map.astype(np.int64)], dst)
    return None


def check_labels_txt(path: str, meta) -> None:
    """The 59 classes' ids and names against PASCAL-Context's labels.txt ("<id>: <name>")."""
    names = {}
    with open(path) as f:
        for line in f:
            if ":" in line:
                i, name = line.split(":", 1)
                names[int(i)] = name.strip()
    wrong = [(i, n, names.get(i)) for i, n in meta.PC59 if names.get(i) != n]
    if wrong:
        fail(f"{path!r} does not give the expected ids of the 59 classes (id, expected, found): {wrong[:5]}")


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--context", default="", help="PASCAL-Context's trainval/ folder (default: <root>/VOCdevkit/VOC2010/trainval)")
    args = p.parse_args(argv)
    voc = os.path.join(args.root, "VOCdevkit", "VOC2010")
    context = args.context or os.path.join(voc, "trainval")
    if not os.path.isdir(os.path.join(voc, "JPEGImages")):
        fail(f"{os.path.join(voc, 'JPEGImages')!r} does not exist: untar VOCtrainval_03-May-2010.tar into {args.root!r}.")
    if not os.path.isdir(context):
        fail(f"{context!r} does not exist: untar PASCAL-Context's trainval.tar.gz into {voc!r} (or pass --context).")
    labels_txt = os.path.join(os.path.dirname(context.rstrip(os.sep)), "labels.txt")
    for candidate in (os.path.join(context, "labels.txt"), labels_txt):
        if os.path.isfile(candidate):
            check_labels_txt(candidate, load_meta())
            break
    else:
        print(f"warning: no labels.txt next to {context!r}: the 59 classes' ids are not checked against it")
    for split in ("train", "val"):
        listing = os.path.join(voc, "ImageSets", "Main", f"{split}.txt")
        if not os.path.isfile(listing):
            fail(f"{listing!r} does not exist (VOC 2010's Main {split} set, which PASCAL-Context annotates).")
        ids = read_ids(listing)
        missing = [i for i in ids if not os.path.isfile(os.path.join(context, i + ".mat"))]
        if missing:
            fail(f"{len(missing)} of the {len(ids)} {split} images have no annotation in {context!r}: {', '.join(missing[:5])}")
        out = os.path.join(voc, "annotations_detectron2", f"pc59_{split}")
        jobs = [(os.path.join(context, i + ".mat"), os.path.join(out, i + ".png")) for i in ids]
        done, kept = run_jobs(jobs, convert, workers=args.workers, force=args.force, desc=f"PASCAL-Context {split}")
        print(f"pc59_{split}: {len(ids)} labels in {out} ({done} converted, {kept} kept from an earlier run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
