"""Training curves from detectron2's ``metrics.json`` (one JSON object per line)."""
from __future__ import annotations

import json
from typing import Dict, List

__all__ = ["read_metrics", "plot_training_curves"]


def read_metrics(path: str) -> List[Dict]:
    """The records of a metrics.json; a partial last line (a run killed mid-write) is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def plot_training_curves(metrics_path: str, out_path: str) -> str:
    """Three panels: every ``loss*`` term, the learning rate, and evaluation metrics (mIoU...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if "total_loss" in r or any(k.startswith("loss") for k in r)]
    evals = [r for r in records if any(k.endswith("/mIoU") for k in r)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    loss_keys = sorted({k for r in train for k in r if k.startswith("loss") or k == "total_loss"})
    for k in loss_keys:
        pts = [(r["iteration"], r[k]) for r in train if k in r]
        axes[0].plot(*zip(*pts), label=k, lw=2 if k == "total_loss" else 1)
    axes[0].set(title="training losses", xlabel="iteration", yscale="log")
    if loss_keys:
        axes[0].legend(fontsize=7)
    lr = [(r["iteration"], r["lr"]) for r in train if "lr" in r]
    if lr:
        axes[1].plot(*zip(*lr))
    axes[1].set(title="learning rate", xlabel="iteration")
    metric_keys = sorted({k for r in evals for k in r if k.split("/")[-1] in ("mIoU", "mACC", "pACC")})
    for k in metric_keys:
        pts = [(r["iteration"], r[k]) for r in evals if k in r]
        axes[2].plot(*zip(*pts), marker="o", label=k)
    axes[2].set(title="evaluation (%)", xlabel="iteration")
    if metric_keys:
        axes[2].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
