#!/usr/bin/env python
"""Run a trained model on your own images or a video (detectron2's demo/demo.py, for segmentation).

    python tools/predict.py --config-file CFG.yaml --input img.png dir/ "shots/*.jpg" --output out/ \
        [--confidence] [--dataset NAME] MODEL.WEIGHTS model.pth [KEY VALUE ...]
    python tools/predict.py --config-file CFG.yaml --video-input clip.mp4 --output out/ MODEL.WEIGHTS model.pth
    python tools/predict.py --config-file CFG.py --input dir/ --output out/ train.init_checkpoint=model.pth [key=value ...]

For each image (``--input``: files, folders, globs), under ``--output``:

    overlay/<name>.png     the image blended with the prediction, a legend of the classes present
                           (an anytime model's overlay says which exit answered)
    labels/<name>.png      the predicted label map in the dataset's own ids (Cityscapes label ids,
                           COCO-Stuff ids: what their evaluation servers take; 16-bit above 255)
    confidence/<name>.png  with --confidence: the top class's probability, 0..255

``--output`` may name a file for one input image (the overlay; labels and confidence beside it as
``<stem>_labels.png`` / ``<stem>_confidence.png``). ``--video-input``: the overlay video, one frame
per input frame (OpenCV; ``--output`` a folder -> ``<folder>/<video name>.mp4``, or a file).

Class names, colours and ids come from ``--dataset`` (default: the config's first DATASETS.TEST).
The checkpoint (``MODEL.WEIGHTS``) is loaded as ``train_net.py --eval-only`` loads it: a plain or
deployed model, a multi-exit training checkpoint with its training config (the final head
answers), an AnytimeSegmentor (``MODEL.META_ARCHITECTURE AnytimeSegmentor``), or an undeployed
Distiller checkpoint with its training config (its student predicts; the log says so). Images
are used at their size (``INPUT.MIN_SIZE_TEST`` > 0 resizes them first, as the evaluation does);
``TEST.MODE slide`` (``TEST.SLIDE.CROP_SIZE`` / ``STRIDE``) runs large images in windows and
``TEST.AUG.ENABLED`` averages scales and flips (docs/datasets.md "Test-time modes");
``TEST.FOLD_BN True`` (lazy ``train.fold_bn=True``) predicts with the convolutions' BatchNorms
folded (docs/deploy.md).

A lazy (``.py``) config is read as ``train_net.py --eval-only`` reads it: the model of ``model``
with ``train.init_checkpoint`` (the backbones' ImageNet initialisation skipped, refused when
empty or not fitting unless ``train.allow_random_weights``), on ``train.device``, run as the
config's ``test_time`` asks; the images go through ``dataloader.test.mapper``'s augmentations
and ``image_format``, and the classes are ``dataloader.test.dataset.names``'s first dataset's
(``--dataset`` overrides).
"""
from __future__ import annotations

import glob
import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import tqdm  # noqa: E402
from PIL import Image  # noqa: E402

import segdistill  # noqa: E402,F401
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.data import detection_utils as utils  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.config import instantiate  # noqa: E402
from segdistill.config import ConfigError, config_tool_parser, load_lazy_config, load_yaml_config  # noqa: E402
from segdistill.convert import DEFAULT_MIN_MATCHED  # noqa: E402
from segdistill.convert.contracts import SegmentorWrapper  # noqa: E402
from segdistill.data import register_config_datasets  # noqa: E402
from segdistill.engine import (Trainer, check_lazy_config, fold_for_inference, load_evaluation_weights,  # noqa: E402
                               skip_backbone_init)
from segdistill.engine.lazy import build_lazy_model, lazy_fold_bn, lazy_test_time_model, resolve_class_weighting  # noqa: E402
from segdistill.modeling.meta_arch.anytime import AnytimeSegmentor  # noqa: E402
from segdistill.modeling.meta_arch.multi_exit import MultiExitSegmentor  # noqa: E402
from segdistill.modeling.test_time import build_test_time_model  # noqa: E402
from segdistill.utils.predictions import dataset_colors, submission_ids  # noqa: E402
from segdistill.utils.visualize import legend_strip, overlay_picture  # noqa: E402

logger = logging.getLogger("segdistill.predict")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def expand_inputs(patterns):
    """Files, folders (their images, sorted) and globs -> a list of image files; a pattern that
    names nothing is an error."""
    files = []
    for p in patterns:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTENSIONS))
        else:
            found = sorted(glob.glob(os.path.expanduser(p))) if glob.has_magic(p) else ([p] if os.path.isfile(p) else [])
        if not found:
            raise FileNotFoundError(f"--input {p!r}: no image file there (files, folders of {IMAGE_EXTENSIONS}, globs).")
        files += found
    return files


def predicting_model(model, weights: str):
    """The model that predicts: a Distiller's student (said in the log), any other model itself."""
    if isinstance(model, SegmentorWrapper):
        student, prefix = model.wrapped_segmentor()
        logger.info("%s is a %s checkpoint: predicting with its student (%s, the weights under %r); the teacher "
                    "is not run.", weights, type(model).__name__, type(student).__name__, prefix)
        return student
    if isinstance(model, MultiExitSegmentor):
        logger.info("%s is a multi-exit training checkpoint: the final head answers (its exits are not drawn).",
                    weights)
    elif isinstance(model, AnytimeSegmentor):
        logger.info("AnytimeSegmentor (policy %s): each overlay says which exit answered.", model.policy)
    return model


def load_model(cfg):
    """The model of ``cfg`` with ``MODEL.WEIGHTS`` (as ``--eval-only`` loads it), the model that
    predicts (a Distiller's student), in the test-time mode of ``cfg``."""
    model = predicting_model(Trainer.build_evaluation_model(cfg, cfg.MODEL.WEIGHTS), cfg.MODEL.WEIGHTS)
    return build_test_time_model(cfg, fold_for_inference(model, cfg.TEST.FOLD_BN)).eval()


def load_lazy_model(cfg):
    """The model of a lazy config with ``train.init_checkpoint``, as ``train_net.py --eval-only``
    builds and loads it (``segdistill.engine.lazy_evaluate``), the model that predicts, run as the
    config's ``test_time`` asks."""
    weights = cfg.train.init_checkpoint
    if weights:  # the checkpoint gives every weight: no ImageNet initialisation to read (or download)
        skip_backbone_init(cfg.model)
    resolve_class_weighting(cfg, training=False)  # class weights weigh the training loss only
    model = build_lazy_model(cfg)
    load_evaluation_weights(
        model, weights, key="train.init_checkpoint", allow_random=bool(cfg.train.get("allow_random_weights", False)),
        allow_key="train.allow_random_weights",
        min_matched=float(cfg.train.get("min_matched_weights", DEFAULT_MIN_MATCHED)))
    return lazy_test_time_model(cfg, fold_for_inference(predicting_model(model, weights), lazy_fold_bn(cfg))).eval()


def _test_mapper(cfg):
    """A lazy config's ``dataloader.test.mapper`` (what the evaluation feeds the model)."""
    mapper = cfg.dataloader.get("test", {}).get("mapper", None)
    if mapper is None or "image_format" not in mapper:
        raise ConfigError("dataloader.test.mapper.image_format is not set: tools/predict.py reads images as the "
                          "evaluation does; set it (e.g. dataloader.test.mapper.image_format=RGB).")
    return mapper


def lazy_settings(cfg, dataset: str = ""):
    """(dataset, image format, test-time augmentations, ignore value) of a lazy config."""
    mapper = _test_mapper(cfg)
    if not dataset:
        names = cfg.dataloader.test.get("dataset", {}).get("names", None)
        if not names:
            raise ConfigError("dataloader.test.dataset.names is not set: give --dataset NAME (whose classes, "
                              "colours and ids the outputs use).")
        dataset = names if isinstance(names, str) else names[0]
    augmentations = instantiate(mapper.augmentations) if "augmentations" in mapper else []
    return dataset, mapper.image_format, list(augmentations), mapper.get("ignore_value", None)


def yaml_settings(cfg, dataset: str = ""):
    """(dataset, image format, test-time augmentations, ignore value) of a YAML config."""
    register_config_datasets(cfg)  # DATASETS.FOLDER
    resize = ([T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
              if cfg.INPUT.MIN_SIZE_TEST > 0 else [])
    return dataset or cfg.DATASETS.TEST[0], cfg.INPUT.FORMAT, resize, cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE


class Predictor:
    """One image (HxWx3 in the config's image format) -> (label map, confidence map, caption);
    ``augmentations``: the evaluation's test-time ones (a resize), applied first."""

    def __init__(self, model, augmentations=()):
        self.model = model
        self.augmentations = T.AugmentationList(list(augmentations))

    @torch.no_grad()
    def __call__(self, image: np.ndarray):
        h, w = image.shape[:2]
        aug = T.AugInput(image)
        self.augmentations(aug)
        x = aug.image
        out = self.model([{"image": torch.as_tensor(np.ascontiguousarray(x.transpose(2, 0, 1))), "height": h,
                           "width": w}])[0]
        probs = out["sem_seg"].float().softmax(0)
        confidence, pred = probs.max(0)
        caption = f"exit: {out['sem_seg_exit']}" if "sem_seg_exit" in out else ""
        return pred.cpu().numpy(), confidence.cpu().numpy(), caption


class Writer:
    """Overlays, label maps and confidence maps in the dataset's classes, colours and ids."""

    def __init__(self, meta, ignore_value: int):
        self.names = list(meta.stuff_classes)
        self.colors = dataset_colors(meta)
        self.ignore = ignore_value
        self.ids = submission_ids(meta)

    def overlay(self, image_rgb, pred, caption="", **kwargs):
        return overlay_picture(image_rgb, pred, self.colors, class_names=self.names, ignore_value=self.ignore,
                               caption=caption, **kwargs)

    def label_image(self, pred: np.ndarray) -> Image.Image:
        ids = self.ids[pred] if self.ids is not None else pred
        return Image.fromarray(ids.astype(np.uint8 if ids.max() <= 255 else np.uint16))


def _paths(output: str, image_file: str, single: bool, confidence: bool):
    stem = os.path.splitext(os.path.basename(image_file))[0]
    if single and output.lower().endswith(IMAGE_EXTENSIONS):
        base = os.path.splitext(output)[0]
        paths = {"overlay": output, "labels": f"{base}_labels.png", "confidence": f"{base}_confidence.png"}
    else:
        paths = {k: os.path.join(output, k, f"{stem}.png") for k in ("overlay", "labels", "confidence")}
    if not confidence:
        paths.pop("confidence")
    for p in paths.values():
        os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
    return paths


def predict_images(files, predictor, writer, output, image_format, confidence=False):
    start = time.perf_counter()
    for f in tqdm.tqdm(files, unit="img", disable=len(files) < 2):
        image = utils.read_image(f, format=image_format)
        rgb = utils.convert_image_to_rgb(image, image_format)
        pred, conf, caption = predictor(image)
        paths = _paths(output, f, len(files) == 1, confidence)
        Image.fromarray(writer.overlay(rgb, pred, caption)).save(paths["overlay"])
        writer.label_image(pred).save(paths["labels"])
        if confidence:
            Image.fromarray((conf * 255).round().astype(np.uint8)).save(paths["confidence"])
        logger.info("%s: %s%s", f, paths["overlay"], f" ({caption})" if caption else "")
    seconds = time.perf_counter() - start
    logger.info("%d images in %.1f s (%.2f images/s)", len(files), seconds, len(files) / max(seconds, 1e-9))


def predict_video(path, predictor, writer, output, image_format):
    video = cv2.VideoCapture(path)
    if not video.isOpened():
        raise FileNotFoundError(f"--video-input {path!r}: OpenCV cannot open it.")
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(video.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    width = int(video.get(cv2.CAP_PROP_FRAME_WIDTH))
    # one frame size for the whole video: the legend of every class, so that any frame's fits
    legend_height = legend_strip(range(len(writer.names)), writer.names, writer.colors, width).shape[0]
    out_file = output if os.path.splitext(output)[1] else os.path.join(
        output, os.path.splitext(os.path.basename(path))[0] + ".mp4")
    os.makedirs(os.path.dirname(out_file) or ".", exist_ok=True)
    writer_cv, frames, start = None, 0, time.perf_counter()
    try:
        with tqdm.tqdm(total=total, unit="frame") as bar:
            while True:
                ok, bgr = video.read()
                if not ok:
                    break
                image = bgr if image_format == "BGR" else bgr[:, :, ::-1]
                pred, _, caption = predictor(np.ascontiguousarray(image))
                frame = writer.overlay(bgr[:, :, ::-1], pred, caption, min_legend_height=legend_height)
                if writer_cv is None:
                    writer_cv = cv2.VideoWriter(out_file, cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                                (frame.shape[1], frame.shape[0]))
                writer_cv.write(np.ascontiguousarray(frame[:, :, ::-1]))
                frames += 1
                bar.update(1)
    finally:
        video.release()
        if writer_cv is not None:
            writer_cv.release()
    seconds = time.perf_counter() - start
    logger.info("%s: %d frames -> %s in %.1f s (%.2f frames/s)", path, frames, out_file, seconds,
                frames / max(seconds, 1e-9))
    return out_file


def main(argv=None):
    p = config_tool_parser(__doc__, "the config of the model, YAML or lazy .py (the training config for multi-exit, "
                           "Distiller and anytime checkpoints)",
                           "overrides: YAML KEY VALUE (MODEL.WEIGHTS: the checkpoint); lazy key=value "
                           "(train.init_checkpoint=: the checkpoint)")
    p.add_argument("--input", nargs="+", help="image files, folders or globs")
    p.add_argument("--video-input", help="a video file (OpenCV)")
    p.add_argument("--output", required=True, help="a folder (or a file for one image / the video)")
    p.add_argument("--confidence", action="store_true", help="also write the top class's probability map")
    p.add_argument("--dataset", help="whose classes, colours and ids (default: the config's first DATASETS.TEST)")
    args = p.parse_args(argv)
    if bool(args.input) == bool(args.video_input):
        p.error("give --input (images) or --video-input (a video), one of them")
    setup_logger(name="segdistill")
    files = expand_inputs(args.input) if args.input else []
    if args.config_file.endswith(".py"):
        cfg = load_lazy_config(args.config_file, args.opts)  # the file's keys and the overrides, checked
        check_lazy_config(cfg)
        dataset, image_format, augmentations, ignore = lazy_settings(cfg, args.dataset)
        model = load_lazy_model(cfg)
    else:
        cfg = load_yaml_config(args.config_file, args.opts)
        dataset, image_format, augmentations, ignore = yaml_settings(cfg, args.dataset)
        model = load_model(cfg)
    meta = MetadataCatalog.get(dataset)
    predictor = Predictor(model, augmentations)
    writer = Writer(meta, meta.get("ignore_label", ignore))
    if args.video_input:
        return predict_video(args.video_input, predictor, writer, args.output, image_format)
    predict_images(files, predictor, writer, args.output, image_format, confidence=args.confidence)
    return args.output


if __name__ == "__main__":
    main()
