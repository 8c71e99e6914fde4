#!/usr/bin/env python
"""Choose the anytime exit thresholds on a held-out split and write the thresholds file.

    python tools/calibrate_exits.py --config-file configs/demo/exits/ds.yaml \
        --output output/anytime/thresholds_ds.json --max-drop 1.0 \
        MODEL.WEIGHTS output/demo/exits/ds/model_final.pth

The config is the multi-exit *training* config (ds / sr); the model is its deployed
``AnytimeSegmentor`` (MODEL.WEIGHTS: the training checkpoint or ``tools/deploy_model.py
--target anytime``'s). Every exit and the final head run once on the split; the thresholds
are then searched on those records (docs/anytime.md):

* ``--max-drop D``: the lowest average MACs whose mIoU is at most D points below the final
  output's on the split (default, D = 1);
* ``--budget F``: the best mIoU whose average MACs are at most F x the final path's;
* ``--risk-control {crc,ucb} --epsilon E [--delta D] [--risk-quality miou|pixel_accuracy]``:
  one threshold for every exit, chosen so that the per-image gap to the final output
  (max(0, q_final - q_answer), q in [0, 1]) is at most E on new images drawn like the split:
  in expectation (``crc``, conformal risk control) or with probability 1 - D (``ucb``,
  Hoeffding-Bentkus upper bound); *Fast yet Safe* (Jazbec et al., NeurIPS 2024).
  ``--risk-quality disagreement`` bounds the share of pixels whose answer differs from the final
  output's: it reads no label, so unlabelled images can be calibrated on.

``--policy pixel`` calibrates the per-pixel policy's PIXEL_THRESHOLDS instead: the policy
runs once per candidate setting (``--pixel-grid``, at most 16 shared thresholds; "never"
is added), so calibration costs that many passes of the split, and the objectives above pick
among the settings run. The file written is read with
``MODEL.EXITS.ANYTIME.POLICY pixel MODEL.EXITS.ANYTIME.THRESHOLDS_FILE <output>``.

The split defaults to ``<DATASETS.TRAIN[0]>_hs3_analysis`` (HS3_ANALYSIS.FRACTION,
SPLIT_SEED, FILES); train on ``<name>_hs3_reduced`` to hold it out. An evaluation
split (``DATASETS.TEST``), or one sharing an image with it, is refused. Use the file with

    MODEL.EXITS.ANYTIME.POLICY confidence MODEL.EXITS.ANYTIME.THRESHOLDS_FILE <output>

The work is ``segdistill.engine.anytime.calibrate_from_config``; this is its command line.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))

import torch  # noqa: E402

import segdistill  # noqa: E402,F401
from detectron2.utils.logger import setup_logger  # noqa: E402
from segdistill.config import config_tool_parser  # noqa: E402
from segdistill.engine.anytime import anytime_cfg, calibrate_from_config  # noqa: E402
from segdistill.evaluation.anytime import QUALITIES  # noqa: E402
from segdistill.evaluation.anytime_pixel import DEFAULT_PIXEL_GRID  # noqa: E402


def main(argv=None):
    p = config_tool_parser(__doc__, "the multi-exit training config (YAML)",
                           "KEY VALUE overrides (MODEL.WEIGHTS is required)")
    p.add_argument("--output", required=True, help="the thresholds file to write (.json)")
    p.add_argument("--dataset", default="", help="calibration split (default: <DATASETS.TRAIN[0]>_hs3_analysis)")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--max-drop", type=float, default=None, help="mIoU points below the final output (default 1)")
    goal.add_argument("--budget", type=float, default=None, help="average MACs as a fraction of the final path's")
    goal.add_argument("--risk-control", choices=["crc", "ucb"], default="",
                      help="one shared threshold with a guarantee on new images (needs --epsilon)")
    p.add_argument("--epsilon", type=float, default=None, help="risk control: the per-image gap allowed, in (0, 1)")
    p.add_argument("--delta", type=float, default=0.1, help="risk control (ucb): the probability the bound may fail")
    p.add_argument("--risk-quality", choices=list(QUALITIES), default="miou",
                   help="risk control: the per-image quality whose gap is controlled (disagreement: label-free)")
    p.add_argument("--policy", choices=["confidence", "pixel"], default="confidence",
                   help="the policy to calibrate: per-image confidence thresholds, or per-pixel PIXEL_THRESHOLDS")
    p.add_argument("--pixel-grid", default=None,
                   help="--policy pixel: comma-separated shared thresholds to run (default: "
                        f"{','.join(map(str, DEFAULT_PIXEL_GRID))})")
    p.add_argument("--candidates", type=int, default=16, help="threshold candidates per exit")
    p.add_argument("--records", default="", help="save / reuse the split's records here (.npz)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)
    setup_logger(name="segdistill")
    if args.threads:
        torch.set_num_threads(args.threads)
    if bool(args.risk_control) != (args.epsilon is not None):
        p.error("--risk-control and --epsilon go together.")
    if args.pixel_grid is not None and args.policy != "pixel":
        p.error("--pixel-grid goes with --policy pixel.")
    try:
        grid = None if args.pixel_grid is None else [float(v) for v in args.pixel_grid.split(",") if v.strip()]
    except ValueError:
        p.error(f"--pixel-grid must be comma-separated numbers, got {args.pixel_grid!r}.")
    cfg = anytime_cfg(args.config_file, args.opts)
    try:
        doc = calibrate_from_config(cfg, args.output, dataset=args.dataset, max_drop=args.max_drop,
                                    budget=args.budget, candidates=args.candidates, records_path=args.records,
                                    risk_control=args.risk_control, epsilon=args.epsilon, delta=args.delta,
                                    quality=args.risk_quality, policy=args.policy, pixel_grid=grid)
    except (ValueError, KeyError, FileNotFoundError) as e:
        p.error(str(e))
    print(json.dumps({**doc, "config": args.config_file}, indent=1))


if __name__ == "__main__":
    main()
