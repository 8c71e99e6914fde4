#!/usr/bin/env python
"""The demo (`make demo`): what distillation does for a small segmentation model, on CPU.

On the built-in demo dataset (generated on first use), three trainings from scratch:

1. the teacher:  DeepLabV3-ResNet18, output stride 8      configs/demo/make_demo/teacher.yaml
2. the baseline: the student alone, DeepLabV3-MobileNetV2 configs/demo/make_demo/student.yaml
3. the method:   the same student, same schedule, taught by the teacher with channel-wise
                 distillation (CWD)                        configs/demo/make_demo/cwd.yaml

then the baseline and the method side by side: per-class IoU, mIoU, fwIoU, pixel accuracy
and the difference (the teacher's column for reference), their training curves in one
figure, and pictures of validation images with image | ground truth | student alone |
student + CWD and a legend of the class colours. The distilled student is scored and drawn
as deployed (tools/deploy_model.py): the plain student, same weights count and cost as the
baseline. Everything is written under --output (default output/demo):

    comparison.md        the table printed at the end
    summary.json         every model's metrics, the gain, each step's time
    training_curves.png  losses and val mIoU of the baseline and the method
    pictures/            one picture per validation image, and overview.png (the first few)
    teacher/ student/ cwd/   the three trainings (train_net.py outputs, checkpoints, curves)

    python tools/demo.py [--output DIR] [--dataset NAME] [--max-iter N] [--pictures N]

Interrupted, it resumes: finished steps are kept, an unfinished training continues from
its last checkpoint. ``--max-iter`` shortens every training (tests run the whole demo in
seconds with ``--dataset segdistill_demo_mini --max-iter 4``).
"""
from __future__ import annotations

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
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from segdistill.config import load_yaml_config  # noqa: E402
from segdistill.data import SemSegDatasetMapper  # noqa: E402
from segdistill.convert import load_checked_weights  # noqa: E402
from segdistill.evaluation import metrics_from_confusion  # noqa: E402
from segdistill.utils.plots import read_metrics  # noqa: E402
from segdistill.utils.predictions import write_prediction_pictures  # noqa: E402

CONFIGS = "configs/demo/make_demo"
# step name -> (config, caption)
STEPS = {
    "teacher": (f"{CONFIGS}/teacher.yaml", "teacher (DeepLabV3-R18)"),
    "student": (f"{CONFIGS}/student.yaml", "student alone"),
    "cwd": (f"{CONFIGS}/cwd.yaml", "student + CWD"),
}
BASELINE, METHOD = "student", "cwd"
DONE = "demo_step.json"


def say(msg):
    print(f"\n=== {msg}", flush=True)


def load_cfg(config_file, opts=()):
    return load_yaml_config(os.path.join(ROOT, config_file), opts)


def common_opts(args):
    """Overrides every step shares: the dataset and a shortened schedule."""
    opts = []
    if args.dataset:
        opts += ["DATASETS.TRAIN", f"('{args.dataset}_train',)", "DATASETS.TEST", f"('{args.dataset}_val',)"]
    if args.max_iter:
        n = args.max_iter
        opts += ["SOLVER.MAX_ITER", str(n), "SOLVER.WARMUP_ITERS", str(max(1, min(25, n // 2))),
                 "SOLVER.CHECKPOINT_PERIOD", str(max(1, n // 2)), "TEST.EVAL_PERIOD", str(max(1, n // 2))]
    return opts


def step_opts(step, args):
    out = os.path.join(args.output, step)
    opts = common_opts(args) + ["OUTPUT_DIR", out]
    if step == METHOD:
        opts += ["MODEL.DISTILL.TEACHER.WEIGHTS", os.path.join(args.output, "teacher", "model_final.pth")]
    return opts


def run_step(step, args, env):
    """Train one model with train_net.py (resuming), unless a finished run with the same options is there."""
    config, caption = STEPS[step]
    opts = step_opts(step, args)
    out = os.path.join(args.output, step)
    marker = os.path.join(out, DONE)
    if os.path.isfile(marker):
        with open(marker) as f:
            done = json.load(f)
        if done.get("config") == config and done.get("opts") == opts:
            print(f"{caption}: done earlier ({done['seconds'] / 60:.1f} min), kept: {out}")
            return done["seconds"]
        raise SystemExit(f"{out} holds a demo step run with other options ({done.get('opts')}); "
                         "delete it or choose another --output.")
    cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", os.path.join(ROOT, config),
           "--resume", *opts]
    print("python train_net.py --config-file", config, "--resume", " ".join(opts), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    seconds = time.time() - t0
    with open(marker, "w") as f:
        json.dump({"config": config, "opts": opts, "seconds": seconds}, f)
    return seconds


def confusion_of(step, args, test_name):
    path = os.path.join(args.output, step, "inference", test_name, "confusion_sem_seg.json")
    with open(path) as f:
        saved = json.load(f)
    return np.asarray(saved["matrix"]), list(saved["classes"])


def comparison_table(metrics, names):
    """Markdown table: per-class IoU and the summary metrics of every model, and the method's gain."""
    cols = [STEPS[s][1] for s in metrics]
    rows = []
    for label, key in [(n, f"IoU-{n}") for n in names] + [("**mIoU**", "mIoU"), ("fwIoU", "fwIoU"),
                                                           ("mean accuracy", "mACC"), ("pixel accuracy", "pACC")]:
        vals = [metrics[s].get(key, float("nan")) for s in metrics]
        gain = metrics[METHOD].get(key, float("nan")) - metrics[BASELINE].get(key, float("nan"))
        rows.append([label] + [("" if v != v else f"{v:.1f}") for v in vals] + ["" if gain != gain else f"{gain:+.1f}"])
    return tabulate(rows, headers=["val (%)"] + cols + [f"{STEPS[METHOD][1]} - {STEPS[BASELINE][1]}"],
                    tablefmt="pipe", disable_numparse=True)


def plot_comparison_curves(args, out_path):
    """Both students' losses (their own cross-entropy, and the distillation term) and val mIoU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    colors = {BASELINE: "tab:blue", METHOD: "tab:red"}
    for step in (BASELINE, METHOD):
        records = read_metrics(os.path.join(args.output, step, "metrics.json"))
        caption = STEPS[step][1]
        # the student's own cross-entropy (detectron2 logs a single loss as total_loss only)
        ce = [(r["iteration"], r.get("loss_sem_seg", r.get("total_loss"))) for r in records
              if "loss_sem_seg" in r or ("total_loss" in r and not any(k.startswith("loss_") for k in r))]
        cwd = [(r["iteration"], r["loss_cwd"]) for r in records if "loss_cwd" in r]
        for pts, style, what in ((ce, ".-", "cross-entropy"), (cwd, ".:", "CWD term")):
            if pts:
                axes[0].plot(*zip(*pts), style, color=colors[step], label=f"{caption}: {what}")
        pts = [(r["iteration"], r["sem_seg/mIoU"]) for r in records if "sem_seg/mIoU" in r]
        if pts:
            axes[1].plot(*zip(*pts), "o-", color=colors[step], label=caption)
    axes[0].set(title="training losses", xlabel="iteration", yscale="log")
    axes[1].set(title="val mIoU (%)", xlabel="iteration")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def deploy_method(args, env):
    """The distilled student as deployed (tools/deploy_model.py): a plain student checkpoint."""
    out = os.path.join(args.output, METHOD, "student_deploy.pth")
    weights = os.path.join(args.output, METHOD, "model_final.pth")
    if not (os.path.isfile(out) and os.path.getmtime(out) >= os.path.getmtime(weights)):
        cmd = [sys.executable, os.path.join(ROOT, "tools", "deploy_model.py"), "--config-file",
               os.path.join(ROOT, STEPS[METHOD][0]), "--output", out, *step_opts(METHOD, args), "MODEL.WEIGHTS", weights]
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="output/demo")
    p.add_argument("--dataset", default="", help="dataset prefix (NAME_train / NAME_val); default: the configs' "
                                                 "segdistill_demo")
    p.add_argument("--max-iter", type=int, default=0, help="shorten every training to N iterations (a quick check)")
    p.add_argument("--pictures", type=int, default=0, help="pictures of the first N validation images (default all)")
    args = p.parse_args(argv)
    args.output = os.path.abspath(args.output)
    start = time.time()
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "projects") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cfg = load_cfg(STEPS[BASELINE][0], common_opts(args))
    train_name, test_name = cfg.DATASETS.TRAIN[0], cfg.DATASETS.TEST[0]

    say(f"1/6 dataset: {train_name} / {test_name} (generated on first use)")
    print(f"{len(DatasetCatalog.get(train_name))} training and {len(DatasetCatalog.get(test_name))} validation images")

    seconds = {}
    for i, step in enumerate(STEPS, start=2):
        say(f"{i}/6 training the {STEPS[step][1]} ({STEPS[step][0]}); resumes if interrupted")
        seconds[step] = run_step(step, args, env)

    say("5/6 the baseline and the method side by side (validation set)")
    metrics, names = {}, None
    for step in STEPS:
        conf, names = confusion_of(step, args, test_name)
        metrics[step] = metrics_from_confusion(conf, names)
    table = comparison_table(metrics, names)
    gain = metrics[METHOD]["mIoU"] - metrics[BASELINE]["mIoU"]
    # The method's premise at this budget: a teacher better than the student alone.
    premise = metrics["teacher"]["mIoU"] > metrics[BASELINE]["mIoU"]
    check = (f"check: the teacher ({metrics['teacher']['mIoU']:.1f}) is better than the student alone "
             f"({metrics[BASELINE]['mIoU']:.1f}): {'yes, it has something to teach' if premise else 'NO: the demo shows nothing'}")
    verdict = (f"val mIoU: {STEPS[BASELINE][1]} {metrics[BASELINE]['mIoU']:.1f}, {STEPS[METHOD][1]} "
               f"{metrics[METHOD]['mIoU']:.1f} ({gain:+.1f}), same student, same schedule, same inference cost")
    print(table)
    print(f"\n{verdict}\n{check}")
    with open(os.path.join(args.output, "comparison.md"), "w") as f:
        f.write(f"# make demo: {STEPS[BASELINE][1]} vs {STEPS[METHOD][1]} ({test_name})\n\n{table}\n\n{verdict}\n\n{check}\n")
    curves = plot_comparison_curves(args, os.path.join(args.output, "training_curves.png"))

    say("6/6 pictures: image | ground truth | student alone | student + CWD (deployed)")
    student_cfg = load_cfg(STEPS[BASELINE][0], common_opts(args))
    models = {}
    for step, weights in ((BASELINE, os.path.join(args.output, BASELINE, "model_final.pth")),
                          (METHOD, deploy_method(args, env))):
        model = build_model(student_cfg)
        # every tensor of the student must come from the file (a Distiller checkpoint would not fit)
        load_checked_weights(model, weights, key=f"the {step} step's checkpoint", min_matched=1.0,
                             what=f"the {STEPS[step][1]}")
        models[STEPS[step][1]] = model
    pics = os.path.join(args.output, "pictures")
    n = write_prediction_pictures(models, test_name, pics, mapper=SemSegDatasetMapper(student_cfg, False),
                                  max_images=args.pictures or None, scale=2, overview=4)
    total = time.time() - start
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump({"dataset": [train_name, test_name], "baseline": BASELINE, "method": METHOD,
                   "captions": {s: STEPS[s][1] for s in STEPS}, "configs": {s: STEPS[s][0] for s in STEPS},
                   "metrics": metrics, "gain_mIoU": gain, "teacher_better": premise,
                   "train_seconds": seconds, "total_seconds": total}, f, indent=1)
    print(f"{n} pictures in {pics}/ ({os.path.join(pics, 'overview.png')}: the first four)")
    print(f"training curves of both students: {curves}")
    print(f"table: {os.path.join(args.output, 'comparison.md')}; metrics: {os.path.join(args.output, 'summary.json')}")
    print(f"\ndemo finished in {total / 60:.1f} min ({verdict})")
    return metrics


if __name__ == "__main__":
    main()
