#!/usr/bin/env python
"""Write image | ground truth | prediction pictures, with a legend of the class names and
colours in each picture, for a trained model (YAML config).

    python tools/visualize_predictions.py --config-file CFG --weights MODEL.pth \
        [--dataset NAME] [--output DIR] [--max-images N] [--scale 2] [--overview 4] [KEY VALUE ...]
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects"))

import segdistill  # noqa: E402,F401
from detectron2.modeling import build_model  # noqa: E402
from segdistill.config import config_tool_parser, load_yaml_config  # noqa: E402
from segdistill.data import SemSegDatasetMapper, register_config_datasets  # noqa: E402
from segdistill.convert import load_checked_weights  # noqa: E402
from segdistill.engine import fold_for_inference, inference_precision, use_channels_last  # noqa: E402
from segdistill.utils.predictions import write_prediction_pictures  # noqa: E402


def main(argv=None):
    p = config_tool_parser(__doc__, "the config of the model")
    p.add_argument("--weights", required=True)
    p.add_argument("--dataset", help="default: the config's first DATASETS.TEST")
    p.add_argument("--output", help="default: OUTPUT_DIR/predictions/<dataset>")
    p.add_argument("--max-images", type=int, default=None, help="default: SEGDISTILL.VIS_MAX_IMAGES")
    p.add_argument("--scale", type=int, default=1, help="enlarge every tile this many times (small images)")
    p.add_argument("--overview", type=int, default=0, help="also stack the first N pictures into overview.png")
    args = p.parse_args(argv)
    cfg = load_yaml_config(args.config_file, args.opts)
    register_config_datasets(cfg)  # DATASETS.FOLDER
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    out = args.output or os.path.join(cfg.OUTPUT_DIR, "predictions", dataset)
    precision = inference_precision(cfg.TEST.PRECISION, cfg.MODEL.DEVICE)  # fp16 on CPU: an error before the build
    model = use_channels_last(build_model(cfg), cfg.MODEL.CHANNELS_LAST)
    # refuses a missing file, random weights and a checkpoint of another model (e.g. an
    # undeployed Distiller checkpoint: the error gives the tools/deploy_model.py command)
    load_checked_weights(model, args.weights, key="--weights", min_matched=cfg.TEST.MIN_MATCHED_WEIGHTS,
                         what="the model of --config-file", weights_format=cfg.MODEL.WEIGHTS_FORMAT)
    model = fold_for_inference(model, cfg.TEST.FOLD_BN)  # as the evaluation
    with precision:  # TEST.PRECISION, as the evaluation
        n = write_prediction_pictures(model, dataset, out, max_images=args.max_images or cfg.SEGDISTILL.VIS_MAX_IMAGES,
                                      mapper=SemSegDatasetMapper(cfg, False), scale=args.scale, overview=args.overview)
    print(f"wrote {n} pictures to {out}")


if __name__ == "__main__":
    main()
