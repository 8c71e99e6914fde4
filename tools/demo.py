#!/usr/bin/env python
"""The demo: train DeepLabV3 (ResNet-18) on the built-in demo dataset on CPU, evaluate it,
compare it with predicting the majority class, and write pictures and training curves.

    python tools/demo.py [--config-file configs/demo/deeplabv3_r18.yaml] [--output DIR] [KEY VALUE ...]

An interrupted demo resumes from its last checkpoint when run again.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))

import numpy as np  # noqa: E402
from tabulate import tabulate  # noqa: E402

import segdistill  # noqa: E402,F401
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from segdistill import add_segdistill_config  # noqa: E402
from segdistill.data import SemSegDatasetMapper, read_dataset_label  # noqa: E402
from segdistill.evaluation import metrics_from_confusion  # noqa: E402
from segdistill.utils.predictions import write_prediction_pictures  # noqa: E402


def say(msg):
    print(f"\n=== {msg}", flush=True)


def majority_class_confusion(train_name: str, conf: np.ndarray) -> tuple:
    """The training set's most frequent class, and the val confusion of predicting it everywhere."""
    k = conf.shape[0]
    counts = np.zeros(k, np.int64)
    ignore = MetadataCatalog.get(train_name).ignore_label
    for rec in DatasetCatalog.get(train_name):
        label = read_dataset_label(rec)
        counts += np.bincount(label[label != ignore].ravel(), minlength=k)[:k]
    major = int(counts.argmax())
    base = np.zeros_like(conf)
    base[:, major] = conf.sum(1)  # every ground-truth pixel predicted as `major`
    return major, base


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="configs/demo/deeplabv3_r18.yaml")
    p.add_argument("--output", default="output/demo/deeplabv3_r18")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = p.parse_args(argv)
    start = time.time()
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, args.config_file))
    cfg.merge_from_list(args.opts + ["OUTPUT_DIR", args.output])
    train_name, test_name = cfg.DATASETS.TRAIN[0], cfg.DATASETS.TEST[0]

    say(f"1/4 dataset: {train_name} / {test_name} (generated on first use)")
    print(f"{len(DatasetCatalog.get(train_name))} training and {len(DatasetCatalog.get(test_name))} validation images")

    say("2/4 training (resumes if interrupted): python train_net.py --config-file "
        f"{args.config_file} --resume OUTPUT_DIR {args.output} {' '.join(args.opts)}")
    cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", os.path.join(ROOT, args.config_file),
           "--resume", *args.opts, "OUTPUT_DIR", args.output]
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "projects") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)

    say("3/4 evaluation")
    conf_file = os.path.join(args.output, "inference", test_name, "confusion_sem_seg.json")
    saved = json.load(open(conf_file))
    conf = np.asarray(saved["matrix"])
    names = saved["classes"]
    model_m = metrics_from_confusion(conf, names)
    major, base_conf = majority_class_confusion(train_name, conf)
    base_m = metrics_from_confusion(base_conf, names)
    rows = [[n, f"{model_m[f'IoU-{n}']:.1f}", f"{base_m[f'IoU-{n}']:.1f}"] for n in names]
    rows.append(["mIoU", f"{model_m['mIoU']:.1f}", f"{base_m['mIoU']:.1f}"])
    rows.append(["pixel accuracy", f"{model_m['pACC']:.1f}", f"{base_m['pACC']:.1f}"])
    print(tabulate(rows, headers=["class (val IoU %)", "DeepLabV3-R18", f"majority class ('{names[major]}')"]))
    print(f"\nval mIoU {model_m['mIoU']:.1f} vs {base_m['mIoU']:.1f} for predicting the majority class "
          f"'{names[major]}' everywhere.")

    say("4/4 pictures")
    cfg.MODEL.WEIGHTS = os.path.join(args.output, "model_final.pth")
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    pics = os.path.join(args.output, "predictions", test_name)
    n = write_prediction_pictures(model, test_name, pics, mapper=SemSegDatasetMapper(cfg, False))
    print(f"{n} pictures (image | ground truth | prediction) in {pics}/")
    print(f"training curves in {os.path.join(args.output, 'training_curves.png')}")
    print(f"metrics and confusion matrix in {os.path.dirname(conf_file)}/")
    print(f"\ndemo finished in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
