#!/usr/bin/env python
"""MasKD's first stage: learn the receptive tokens on the frozen teacher and write the tokens file.

    python tools/maskd_tokens.py --config-file configs/demo/distill/maskd.yaml \
        --output output/demo/distill/maskd_tokens.pth

The config is the MasKD distillation config (YAML; for a lazy row, its YAML twin): its teacher
(``MODEL.DISTILL.TEACHER.*``), its training data (``DATASETS.TRAIN``, ``INPUT.*``,
``SOLVER.IMS_PER_BATCH``), ``MODEL.DEVICE`` and the stage's settings
``MODEL.DISTILL.MASKD.NUM_TOKENS``, ``SEED`` and ``TOKENS.*`` (iterations, SGD lr / momentum /
weight decay with poly 0.9 decay, Dice weight; the authors' ``train_mask_module.py`` values).
Only the tokens train: the teacher runs frozen in eval(). Then distil with

    MODEL.DISTILL.MASKD.TOKENS_FILE <output>

The work is ``segdistill.modeling.distill.maskd.learn_receptive_tokens``; this is its command
line (teacher, data, device, file).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))

import torch  # noqa: E402

import segdistill  # noqa: E402,F401
from detectron2.structures import ImageList  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from segdistill.config import config_tool_parser, load_yaml_config  # noqa: E402
from segdistill.data import SemSegDatasetMapper, build_sem_seg_train_loader  # noqa: E402
from segdistill.modeling.distill import LOGITS, segmentor_taps  # noqa: E402
from segdistill.modeling.distill.maskd import learn_receptive_tokens, save_receptive_tokens  # noqa: E402
from segdistill.modeling.meta_arch.distill import build_teacher, load_teacher_cfg  # noqa: E402


def teacher_batches(cfg, teacher_format, normalization, device):
    """The training loader's batches as the teacher sees them: (normalised, padded images, labels
    padded with the ignore value)."""
    mean, std, div = normalization
    flip = {cfg.INPUT.FORMAT, teacher_format} == {"RGB", "BGR"}
    ignore = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
    for batch in build_sem_seg_train_loader(cfg, mapper=SemSegDatasetMapper(cfg, True)):
        images = [x["image"].to(device).float() for x in batch]
        images = [((im.flip(0) if flip else im) - mean) / std for im in images]
        x = ImageList.from_tensors(images, div).tensor
        labels = ImageList.from_tensors([b["sem_seg"].to(device) for b in batch], div, pad_value=ignore).tensor
        yield x, labels.long()


def make_tokens(cfg, output: str) -> dict:
    d, c = cfg.MODEL.DISTILL, cfg.MODEL.DISTILL.MASKD
    device = cfg.MODEL.DEVICE
    teacher = build_teacher(d.TEACHER.CONFIG_FILE, d.TEACHER.WEIGHTS, opts=d.TEACHER.OPTS, device=device,
                            allow_random=d.TEACHER.ALLOW_RANDOM)
    lazy_teacher = d.TEACHER.CONFIG_FILE.endswith(".py")
    teacher_format = cfg.INPUT.FORMAT if lazy_teacher else load_teacher_cfg(d.TEACHER.CONFIG_FILE, d.TEACHER.OPTS).INPUT.FORMAT
    taps = segmentor_taps(teacher)
    if c.TEACHER_TAP != LOGITS:
        raise ValueError(f"MODEL.DISTILL.MASKD.TEACHER_TAP is {c.TEACHER_TAP!r}: the tokens are learnt on the "
                         f"teacher's logits (the masked sum must segment); set it to '{LOGITS}'.")
    num_classes = taps.tap_shapes()[LOGITS].channels
    torch.manual_seed(c.SEED)
    tokens, last = learn_receptive_tokens(
        teacher_batches(cfg, teacher_format, taps.tap_normalization(), device),
        lambda x: taps.tap_teacher(x, [LOGITS])[LOGITS], num_tokens=c.NUM_TOKENS, num_classes=num_classes,
        iterations=c.TOKENS.ITERATIONS, base_lr=c.TOKENS.BASE_LR, momentum=c.TOKENS.MOMENTUM,
        weight_decay=c.TOKENS.WEIGHT_DECAY, dice_weight=c.TOKENS.DICE_WEIGHT,
        ignore_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE, seed=c.SEED, device=device)
    meta = {"teacher_config": d.TEACHER.CONFIG_FILE, "teacher_weights": d.TEACHER.WEIGHTS,
            "iterations": int(c.TOKENS.ITERATIONS), "final_ce": last.get("ce", float("nan")),
            "final_dice": last.get("dice", float("nan"))}
    save_receptive_tokens(output, tokens, **meta)
    return {"output": output, "tokens": list(tokens.shape), **meta}


def main(argv=None):
    p = config_tool_parser(__doc__, "the MasKD distillation config (YAML)")
    p.add_argument("--output", required=True, help="the tokens file to write (.pth)")
    args = p.parse_args(argv)
    setup_logger(name="segdistill")
    cfg = load_yaml_config(args.config_file, args.opts)
    try:
        doc = make_tokens(cfg, args.output)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    print(doc)
    return doc


if __name__ == "__main__":
    main()
