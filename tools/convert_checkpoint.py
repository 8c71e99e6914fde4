#!/usr/bin/env python
"""Convert a foreign checkpoint into this project's format, checked against a config's model.

    # a whole model (mmsegmentation model zoo, CIRKD): a detectron2 checkpoint for MODEL.WEIGHTS
    python tools/convert_checkpoint.py --config-file configs/reproduce/fakd/teacher_pspnet_r101.yaml \\
        pspnet_r101-d8_512x1024_80k_cityscapes_20200606_112211-e1e1100f.pth output/teachers/pspnet_r101.pth

    # ImageNet weights of a backbone (timm, torchvision, OpenMMLab, HRNet, CIRKD): a timm state
    # dict for MODEL.TIMM.CHECKPOINT
    python tools/convert_checkpoint.py --backbone --config-file configs/reproduce/fakd/student_pspnet_r18.yaml \\
        resnet18_v1c-b5776b93.pth output/imagenet/resnet18_v1c_timm.pth

    # the input by URL (https://, http://, detectron2://): downloaded once into the weights cache
    # ($SEGDISTILL_CACHE, else torch.hub's checkpoints folder) and checked against the hash in its
    # name, as MODEL.WEIGHTS URLs are (segdistill/convert/fetch.py)
    python tools/convert_checkpoint.py --backbone --config-file configs/reproduce/fakd/pspnet_r18_student.yaml \\
        https://download.openmmlab.com/pretrain/third_party/resnet18_v1c-b5776b93.pth output/imagenet/r18_v1c_timm.pth

The model is built from the config (YAML or lazy ``.py``, with ``KEY VALUE`` / ``key=value``
overrides after the paths), with random weights; the file's format is detected from its
keys unless ``--format`` names it. It prints what was mapped (``--verbose``: every tensor)
and what was dropped on purpose, and fails, writing nothing, with the unmatched keys and a
hint when the file does not fit. Converting is optional: ``MODEL.WEIGHTS``,
``MODEL.DISTILL.TEACHER.WEIGHTS`` and ``MODEL.TIMM.CHECKPOINT`` convert foreign files when
they load; a converted file loads faster and is checked once.

Files from outside are untrusted: they are read with ``weights_only=True``; a file that
needs full unpickling (e.g. a resumable training checkpoint with mmengine objects) is
refused unless ``--unsafe-unpickle`` is given, which you should only do for a file you trust.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects"))

import torch  # noqa: E402

import segdistill  # noqa: E402,F401  (registers the heads and backbones)
from segdistill.convert import (  # noqa: E402
    BACKBONE_FORMATS, MODEL_FORMATS, CheckpointMismatchError, CheckpointReadError, ConvertibleBackbone,
    convert_backbone_state, convert_model_state, file_meta, load_checked_weights, load_checkpoint_file,
    resolve_weights, segmentor_of, unwrap_state_dict,
)
from segdistill.engine import skip_backbone_init  # noqa: E402


def build_model(config_file: str, opts):
    """The model of a YAML or lazy config, on CPU, with random weights and no checkpoint loaded."""
    if config_file.endswith(".py"):
        from detectron2.config import LazyConfig, instantiate

        cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), list(opts))
        if "train" in cfg:
            cfg.train.device = "cpu"
        skip_backbone_init(cfg.model)  # the file is checked against the model, not added to ImageNet weights
        model = instantiate(cfg.model)
        return model
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model as d2_build

    from segdistill import add_segdistill_config

    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.TIMM.CHECKPOINT = ""  # the file is checked against the model: no ImageNet start, no download
    cfg.MODEL.TIMM.PRETRAINED = ""
    if cfg.MODEL.META_ARCHITECTURE == "Distiller":  # the student is converted; the teacher is not needed
        cfg.MODEL.DISTILL.TEACHER.WEIGHTS = ""
        cfg.MODEL.DISTILL.TEACHER.ALLOW_RANDOM = True
    return d2_build(cfg)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the config whose model the file must fit")
    parser.add_argument("input", help="the foreign checkpoint (.pth, .pt, .bin, .safetensors), a path or a URL")
    parser.add_argument("output", help="where to write the converted checkpoint")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ... or key=value ...)")
    parser.add_argument("--backbone", action="store_true",
                        help="ImageNet weights of the backbone only (written for MODEL.TIMM.CHECKPOINT)")
    parser.add_argument("--format", default="auto",
                        help=f"source format: whole model {list(MODEL_FORMATS)}, backbone {list(BACKBONE_FORMATS)}")
    parser.add_argument("--unsafe-unpickle", action="store_true",
                        help="unpickle arbitrary objects (ONLY for a file you trust; prints a warning)")
    parser.add_argument("--verbose", action="store_true", help="print every mapped tensor")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    model = build_model(args.config_file, args.opts)
    try:
        path = resolve_weights(args.input, "input")  # a URL: the cached download
        if path != args.input:
            print(f"{args.input}: cached at {path}")
        obj = load_checkpoint_file(path, unsafe_unpickle=args.unsafe_unpickle)
        state, where = unwrap_state_dict(obj)
        if args.backbone:
            segmentor, _ = segmentor_of(model)
            if not isinstance(segmentor.backbone, ConvertibleBackbone):
                raise TypeError(f"ImageNet weights load into the project's timm backbones, not "
                                f"{type(segmentor.backbone).__name__}.")
            conv = convert_backbone_state(state, segmentor.backbone.body, args.format, source=args.input)
            out = conv.state
        else:
            conv = convert_model_state(state, model, args.format, source=args.input, meta=file_meta(obj))
            if conv is None:  # no foreign format recognised: it must be a checkpoint of this config's model
                segmentor, _ = segmentor_of(model)
                report = load_checked_weights(segmentor, path, key="input", min_matched=1.0,
                                              weights_format="detectron2", what="the model of this config")
                unused = f"; {len(report.unexpected)} tensors of the file are not used" if report.unexpected else ""
                print(f"{args.input} is already a checkpoint of this project (detectron2 format) and fits the model of "
                      f"{args.config_file}: {report.summary()}{unused}. Nothing to convert: set MODEL.WEIGHTS "
                      f"{args.input}")
                return 0
            out = {"model": conv.state, "__author__": f"segdistill tools/convert_checkpoint.py from {args.input}",
                   "matching_heuristics": False}
    except (CheckpointMismatchError, CheckpointReadError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(conv.summary(limit=len(conv.mapped) if args.verbose else 12))
    print(f"(tensors found at the {where} of {args.input})")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save(out, args.output)
    if args.backbone:
        print(f"wrote {args.output}: set MODEL.TIMM.CHECKPOINT {args.output} (MODEL.TIMM.CHECKPOINT_FORMAT timm)")
    else:
        print(f"wrote {args.output}: set MODEL.WEIGHTS (or MODEL.DISTILL.TEACHER.WEIGHTS) {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
