#!/usr/bin/env python
"""Write the deployed checkpoint of a trained model: training-only parts removed.

    python tools/deploy_model.py --config-file TRAIN_CONFIG.yaml --output model_deploy.pth \
        MODEL.WEIGHTS output/run/model_final.pth

The output loads with no missing or unexpected keys into the plain model its deployed
config builds (a multi-exit model's baseline config, a distiller's student config). A
checkpoint that does not fit the training config (less than TEST.MIN_MATCHED_WEIGHTS of
the model, or tensors of another shape) is an error, not a half-random deployed model.

``--target anytime`` (a multi-exit ds / sr model) writes the anytime model instead: backbone,
head and the exits' segmenters (classifiers and objective state dropped), which loads into
the same training config with ``MODEL.META_ARCHITECTURE AnytimeSegmentor`` (docs/anytime.md).
"""
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))

import segdistill  # noqa: E402,F401
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from segdistill.config import config_tool_parser, load_yaml_config  # noqa: E402
from segdistill.convert import load_checked_weights, save_deployed_checkpoint  # noqa: E402
from segdistill.data import register_config_datasets  # noqa: E402
from segdistill.modeling.meta_arch.anytime import anytime_from_trained  # noqa: E402


def main(argv=None):
    p = config_tool_parser(__doc__, "the config the model was trained with",
                           "KEY VALUE overrides (MODEL.WEIGHTS is required)")
    p.add_argument("--output", required=True, help="where to write the deployed checkpoint (.pth)")
    p.add_argument("--target", choices=("plain", "anytime"), default="plain",
                   help="plain: the deployed plain model, SemanticSegmentorAnySize (default); anytime: the AnytimeSegmentor")
    args = p.parse_args(argv)
    setup_logger(name="segdistill")
    cfg = load_yaml_config(args.config_file, args.opts)
    register_config_datasets(cfg)  # DATASETS.FOLDER (an HS3 model reads its class names)
    cfg.MODEL.DEVICE = "cpu"
    if not cfg.MODEL.WEIGHTS:
        p.error("set MODEL.WEIGHTS to the trained checkpoint")
    model = build_model(cfg)
    load_checked_weights(model, cfg.MODEL.WEIGHTS, min_matched=cfg.TEST.MIN_MATCHED_WEIGHTS,
                         what="the model of the training config")
    if args.target == "anytime":  # keeps the exits, which anytime inference answers from
        model = anytime_from_trained(cfg, model)
    path = save_deployed_checkpoint(model, args.output)
    logging.getLogger("segdistill").info("Deployed checkpoint written to %s", path)
    print(path)


if __name__ == "__main__":
    main()
