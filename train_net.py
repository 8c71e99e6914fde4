#!/usr/bin/env python
"""Train or evaluate a segdistill model with detectron2, from a YAML or a lazy (.py) config.

    python train_net.py --config-file configs/demo/deeplabv3_r18.yaml [KEY VALUE ...]
    python train_net.py --config-file configs/demo/deeplabv3_r18.py [key=value ...]
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS out/model_final.pth
    python train_net.py --config-file ... --num-gpus 2      (also CPU processes, with gloo)
    python train_net.py --config-file ... --resume          (continue from OUTPUT_DIR)
"""
import logging

import segdistill  # noqa: F401  (registers models and datasets, also in launched workers)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from segdistill import add_segdistill_config
from segdistill.hs3.splits import register_config_splits
from segdistill.engine import (
    Trainer, check_dataset_names, check_device, check_lazy_config, check_weights_file, lazy_test, lazy_train,
)


def setup(args):
    """YAML config: defaults + segdistill keys + file + command-line overrides."""
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    register_config_splits(cfg)  # HS3: <name>_hs3_reduced / _hs3_analysis, in every launched process
    check_device("MODEL.DEVICE", cfg.MODEL.DEVICE)
    check_dataset_names("DATASETS.TRAIN", cfg.DATASETS.TRAIN)
    check_dataset_names("DATASETS.TEST", cfg.DATASETS.TEST)
    default_setup(cfg, args)
    return cfg


def setup_lazy(args):
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    check_lazy_config(cfg)
    default_setup(cfg, args)
    return cfg


def main(args):
    if args.config_file.endswith(".py"):
        cfg = setup_lazy(args)
        if args.eval_only:
            from segdistill.engine.lazy import build_lazy_model

            model = build_lazy_model(cfg)
            check_weights_file(cfg.train.init_checkpoint, "train.init_checkpoint")
            DetectionCheckpointer(model).load(cfg.train.init_checkpoint)
            return lazy_test(cfg, model)
        return lazy_train(cfg, resume=args.resume)

    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        check_weights_file(cfg.MODEL.WEIGHTS)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    logging.getLogger(__name__).info("Command line arguments: %s", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
