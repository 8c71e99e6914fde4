#!/usr/bin/env python
"""Train or evaluate a segdistill model with detectron2, from a YAML or a lazy (.py) config.

    python train_net.py --config-file configs/demo/deeplabv3_r18.yaml [KEY VALUE ...]
    python train_net.py --config-file configs/demo/deeplabv3_r18.py [key=value ...]
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS out/model_final.pth
    python train_net.py --config-file ... --num-gpus 2      (also CPU processes, with gloo)
    python train_net.py --config-file ... --resume          (continue from OUTPUT_DIR, exactly)
    python train_net.py --config-file ... --overwrite-output  (train from scratch in a folder
                                                               holding another config's checkpoints)

Nothing is written into OUTPUT_DIR before the model and the data are built; lazy configs:
the keys a lazy file sets and its overrides must be keys of the config (``+key=value`` adds one
on purpose). Ctrl-C during training keeps the checkpoints written so far and prints one line:
the last checkpoint and the command that resumes from it (exit status 130).
"""
import logging
import sys

import segdistill  # noqa: F401  (registers models and datasets, also in launched workers)
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from segdistill.config import add_segdistill_config, check_dataset_names, check_device, load_lazy_config
from segdistill.convert import check_weights_file
from segdistill.data import check_eval_datasets, register_config_datasets
from segdistill.engine import (
    INTERRUPTED_EXIT_CODE, RunOutput, Trainer, check_lazy_config, exit_on_interrupt, lazy_evaluate, lazy_train,
    setup_run,
)
from segdistill.hs3.splits import register_config_splits


def setup(args):
    """YAML config: defaults + segdistill keys + file + command-line overrides."""
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    register_config_datasets(cfg)  # DATASETS.FOLDER: <name>_train / _val, in every launched process
    register_config_splits(cfg)  # HS3: <name>_hs3_reduced / _hs3_analysis, in every launched process
    check_device("MODEL.DEVICE", cfg.MODEL.DEVICE)
    check_dataset_names("DATASETS.TRAIN", cfg.DATASETS.TRAIN)
    check_dataset_names("DATASETS.TEST", cfg.DATASETS.TEST)
    output = setup_run(cfg, args)  # the log first (it writes nothing), so that a download is logged
    if not args.resume:  # a missing file fails now, not after the build (--resume: the last checkpoint wins)
        check_weights_file(cfg.MODEL.WEIGHTS)
    return cfg, output


def setup_lazy(args):
    cfg = load_lazy_config(args.config_file, args.opts)  # the file's keys and the overrides, checked
    check_lazy_config(cfg)
    output = setup_run(cfg, args)
    if not args.resume:
        check_weights_file(cfg.train.init_checkpoint, "train.init_checkpoint")
    return cfg, output


def evaluate(cfg, args, output: RunOutput):
    """--eval-only: MODEL.WEIGHTS (or OUTPUT_DIR's last checkpoint with --resume), refused when
    empty or not fitting the model unless TEST.ALLOW_RANDOM_WEIGHTS (an AnytimeSegmentor: every
    tensor, its exits' included; Trainer.build_evaluation_model)."""
    from detectron2.checkpoint import DetectionCheckpointer

    weights = cfg.MODEL.WEIGHTS
    last = DetectionCheckpointer(None, save_dir=cfg.OUTPUT_DIR)
    if args.resume and last.has_checkpoint():
        weights = last.get_checkpoint_file()
    model = Trainer.build_evaluation_model(cfg, weights)
    check_eval_datasets(cfg.DATASETS.TEST)
    output.open()  # the first write into OUTPUT_DIR: model and data are ready
    res = Trainer.test(cfg, model)
    if comm.is_main_process():
        verify_results(cfg, res)
    return res


def main(args):
    if args.config_file.endswith(".py"):
        cfg, output = setup_lazy(args)
        if args.eval_only:
            return lazy_evaluate(cfg, output)
        with exit_on_interrupt(output):  # Ctrl-C: one line (last checkpoint, resume command), exit 130
            return lazy_train(cfg, resume=args.resume, output=output)

    cfg, output = setup(args)
    if args.eval_only:
        return evaluate(cfg, args, output)
    with exit_on_interrupt(output):
        trainer = Trainer(cfg, output=output)
        trainer.resume_or_load(resume=args.resume)
        return trainer.train()


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--overwrite-output", action="store_true",
        help="train from scratch in an OUTPUT_DIR that holds checkpoints of another config, replacing its config.yaml",
    )
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    logging.getLogger(__name__).info("Command line arguments: %s", args)
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except KeyboardInterrupt:  # before training, or the launcher of several processes (their rank 0 reports)
        sys.exit(INTERRUPTED_EXIT_CODE)
