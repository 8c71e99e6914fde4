"""SOLVER.BUDGET (segdistill/engine/budget.py): the counted step cost, the iterations a budget pays
for (a method twice as expensive gets half the iterations and the same counted cost), the
stretched schedule, and a budgeted train_net.py run end to end."""
import json
import math
import os

import pytest
import torch
from conftest import REPO, YAML_TINY, run_train_net
from torch import nn

from segdistill.config import load_yaml_config
from segdistill.engine.budget import (apply_budget, iterations_for_budget, step_flops, stretch_schedule,
                                      synthetic_batch)


class Branch(nn.Module):
    """A toy segmentor: ``branches`` identical conv branches summed, one pixel loss."""

    def __init__(self, branches: int, groups: int = 1):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1, groups=groups) for _ in range(branches))

    def forward(self, batch):
        x = torch.stack([b["image"].float() for b in batch]).repeat(1, 8 // 3 + 1, 1, 1)[:, :8]
        y = sum(c(x) for c in self.convs)
        return {"loss": y.square().mean()}


def batch(n=2, h=8, w=8):
    return [{"image": torch.zeros(3, h, w, dtype=torch.uint8)} for _ in range(n)]


def test_step_cost_by_hand_and_twice_as_expensive_gets_half_the_iterations():
    one, two = step_flops(Branch(1), batch()), step_flops(Branch(2), batch())
    # forward: 2 FLOPs per multiply-accumulate, 2 x 8 x 8 x 8 outputs x (8 x 3 x 3) each;
    # backward: the weight's gradient only (the image needs none), the same products again
    fwd = 2 * (2 * 8 * 8 * 8) * (8 * 3 * 3)
    assert one["convs"] == fwd and one["backward"] == fwd and one["total"] == 2 * fwd
    assert two["total"] == 2 * one["total"]
    budget = 100 * one["total"]
    n1, n2 = iterations_for_budget(budget, one["total"]), iterations_for_budget(budget, two["total"])
    assert (n1, n2) == (100, 50)
    assert n1 * one["total"] == n2 * two["total"] == budget  # the same counted cost
    assert iterations_for_budget(budget, 3 * one["total"]) == 33  # whole steps only
    with pytest.raises(ValueError):
        iterations_for_budget(0, 1.0)


def test_a_grouped_convolution_backward_counts_its_groups():
    # torch's own registry formula counts a depthwise conv's input gradient as dense (8x here)
    dw = Branch(1, groups=8)
    fwd = 2 * (2 * 8 * 8 * 8) * (1 * 3 * 3)

    class WithInputGrad(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(8, 8, 1, bias=False)
            self.dw = dw.convs[0]

        def forward(self, b):
            x = torch.stack([i["image"].float() for i in b]).repeat(1, 3, 1, 1)[:, :8]
            return {"loss": self.dw(self.stem(x)).square().mean()}

    f = step_flops(WithInputGrad(), batch())
    stem = 2 * (2 * 8 * 8 * 8) * 8
    assert f["dw"] == fwd and f["backward"] == 2 * fwd + stem  # depthwise: input and weight grads; stem: weight


def test_the_schedule_stretches_with_the_iterations():
    cfg = load_yaml_config(os.path.join(REPO, "configs/demo/deeplabv3_r18.yaml"),
                           ["SOLVER.MAX_ITER", "300", "SOLVER.WARMUP_ITERS", "30", "SOLVER.STEPS", "(100, 200)",
                            "SOLVER.CHECKPOINT_PERIOD", "100", "TEST.EVAL_PERIOD", "300"])
    s = stretch_schedule(cfg, 150)
    assert (s.SOLVER.MAX_ITER, s.SOLVER.WARMUP_ITERS, tuple(s.SOLVER.STEPS)) == (150, 15, (50, 100))
    assert (s.SOLVER.CHECKPOINT_PERIOD, s.TEST.EVAL_PERIOD) == (50, 150)
    assert stretch_schedule(cfg, 1200).SOLVER.WARMUP_ITERS == 120
    assert apply_budget(cfg, None) == (cfg, {})  # no budget: untouched, nothing counted


def test_a_budgeted_run_trains_the_iterations_its_budget_pays_for(tmp_path):
    from detectron2.modeling import build_model

    opts = YAML_TINY + ["SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "4", "MODEL.DEVICE", "cpu"]
    cfg = load_yaml_config(os.path.join(REPO, "configs/demo/deeplabv3_r18.yaml"), opts)
    per_step = step_flops(build_model(cfg), synthetic_batch(cfg, cfg.SOLVER.IMS_PER_BATCH))["total"]
    budget = 2.5 * per_step  # pays for 2 whole steps
    out = tmp_path / "run"
    run_train_net(["--config-file", "configs/demo/deeplabv3_r18.yaml", *opts, "SOLVER.BUDGET", repr(budget),
                   "OUTPUT_DIR", str(out)])
    record = json.loads((out / "budget.json").read_text())
    assert record["iterations"] == 2 and record["step_flops"]["total"] == per_step and record["schedule_iter"] == 8
    # config.yaml keeps the config as given (budget and the schedule's written length): the same
    # config gives the same run; budget.json holds what followed from it
    assert "BUDGET: " in (out / "config.yaml").read_text() and "MAX_ITER: 8" in (out / "config.yaml").read_text()
    # two iterations (0 and 1), checkpointed every 4 x 2 / 8 = 1 of them: the stretched period
    assert sorted(f for f in os.listdir(out) if f.startswith("model_")) == [
        "model_0000000.pth", "model_0000001.pth", "model_final.pth"]
    assert math.isclose(record["spent"], 2 * per_step)


def test_a_resumed_run_keeps_its_counted_iterations(tmp_path):
    cfg = load_yaml_config(os.path.join(REPO, "configs/demo/deeplabv3_r18.yaml"),
                           ["SOLVER.MAX_ITER", "300", "SOLVER.BUDGET", "1e12", "OUTPUT_DIR", str(tmp_path)])
    record = {"budget": 1e12, "schedule_iter": 300, "step_flops": {"total": 5e9}, "iterations": 200, "spent": 1e12}
    (tmp_path / "budget.json").write_text(json.dumps(record))
    resolved, got = apply_budget(cfg, None)  # read back: no model needed, nothing counted again
    assert got == record and resolved.SOLVER.MAX_ITER == 200
    # another budget: counted again (here on no model at all, so it fails loudly)
    cfg.defrost()
    cfg.SOLVER.BUDGET = 2e12
    with pytest.raises(Exception):
        apply_budget(cfg, None)


def test_a_budget_needs_a_fixed_training_size():
    from segdistill.config import ConfigError

    cfg = load_yaml_config(os.path.join(REPO, "configs/demo/deeplabv3_r18.yaml"), ["INPUT.CROP.ENABLED", "False"])
    with pytest.raises(ConfigError, match="INPUT.CROP.ENABLED True"):
        synthetic_batch(cfg, 2)
    cfg = load_yaml_config(os.path.join(REPO, "configs/demo/deeplabv3_r18.yaml"), ["INPUT.CROP.SIZE", "(16, 24)"])
    b = synthetic_batch(cfg, 3)
    assert len(b) == 3 and b[0]["image"].shape == (3, 16, 24) and b[0]["sem_seg"].shape == (16, 24)
