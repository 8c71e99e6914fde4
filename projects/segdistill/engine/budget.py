"""A run's training budget (``SOLVER.BUDGET``): the iteration count and the stretched schedule
that follow from a total compute, so that methods of different step cost can be compared at
equal compute rather than at equal iterations.

``SOLVER.BUDGET`` is the whole run's training compute in FLOPs (0: off, ``SOLVER.MAX_ITER``
rules). FLOPs rather than seconds: a count is the same on every machine and under any load,
and a budget in FLOPs means the same thing for a student alone and for a distiller whose step
also runs a teacher. The step's cost is counted once, at the start of the run, on the real
model: one training step (forward with every loss, then backward) on a deep copy of the model
(so that nothing of the run's model, its buffers or its loss parts' state changes), fed a
synthetic batch of the training shape (``SOLVER.IMS_PER_BATCH`` per process, ``INPUT.CROP.SIZE``),
with the FLOP formulas of ``torch.utils.flop_counter`` (the registry ``FlopCounterMode`` uses;
its module tracking is replaced, as it fails under ``torch.autograd.grad``). What it counts: matrix products and
convolutions, forward and backward, in every module the step runs: the student's forward and
backward, the teacher's forward (no backward: it runs under ``no_grad``), connectors,
discriminators and their gradient penalty, generators, memories' similarity products,
covariance products. What it misses: element-wise work (normalisation, activations, softmax,
the losses' element-wise terms), pooling, interpolation, gathers and queue updates, the
optimizer's update and data loading. ``benchmarks/step_cost.py`` measures how far that
leaves the count from single-thread CPU time, method by method.

The iteration count is ``floor(BUDGET / step FLOPs)`` (at least 1), and the config's schedule
is stretched to it: ``SOLVER.MAX_ITER`` is the length the config's schedule was written for,
and ``SOLVER.WARMUP_ITERS``, ``SOLVER.STEPS``, ``SOLVER.CHECKPOINT_PERIOD`` and
``TEST.EVAL_PERIOD`` scale by the same factor (the poly schedule follows ``MAX_ITER``). The
count is written to ``OUTPUT_DIR/budget.json`` and read back on resume, so a resumed run keeps
its iteration count whatever the counter would say on another machine or torch release.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
from typing import Dict, List, Tuple

import torch
from detectron2.utils import comm
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ..config import ConfigError, register_config_hook
from ..modeling.meta_arch.distill import Distiller

__all__ = ["add_budget_config", "step_flops", "synthetic_batch", "iterations_for_budget", "stretch_schedule", "apply_budget",
           "BUDGET_FILE"]

BUDGET_FILE = "budget.json"
logger = logging.getLogger(__name__)


@register_config_hook
def add_budget_config(cfg) -> None:
    """``SOLVER.BUDGET``: this file's one key."""
    if "BUDGET" in cfg.SOLVER:
        return
    # The whole run's training compute in FLOPs (torch's FLOP counter: 2 per multiply-accumulate,
    # forward and backward); 0 = off (SOLVER.MAX_ITER iterations). When set, the run takes
    # floor(BUDGET / the counted FLOPs of its step) iterations, and SOLVER.MAX_ITER is the
    # length its schedule (warm-up, steps, periods) was written for, stretched to that count.
    cfg.SOLVER.BUDGET = 0.0


def synthetic_batch(cfg, n: int, seed: int = 0) -> List[dict]:
    """``n`` images of the training crop's shape, with labels in blobs of the config's classes
    (and some ignored pixels): the input a training step of the config sees."""
    if not cfg.INPUT.CROP.ENABLED or cfg.INPUT.CROP.TYPE != "absolute":
        raise ConfigError("SOLVER.BUDGET counts a step at the training input's size, which needs a fixed crop: set "
                          f"INPUT.CROP.ENABLED True and INPUT.CROP.TYPE \"absolute\" (got {cfg.INPUT.CROP.ENABLED}, "
                          f"{cfg.INPUT.CROP.TYPE!r})")
    h, w = (int(v) for v in cfg.INPUT.CROP.SIZE)
    classes = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n):
        lab = torch.randint(0, classes, (max(1, h // 8), max(1, w // 8)), generator=g)
        lab = lab.repeat_interleave(8, 0).repeat_interleave(8, 1)[:h, :w]
        lab = torch.nn.functional.pad(lab, (0, w - lab.shape[1], 0, h - lab.shape[0]), value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
        lab[: max(1, h // 32)] = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "sem_seg": lab, "height": h, "width": w})
    return batch


class _FlopCount(TorchDispatchMode):
    """Sums torch's FLOP formulas (``torch.utils.flop_counter.flop_registry``: 2 FLOPs per
    multiply-accumulate) over every op dispatched while active, into the bucket ``owner`` names.
    torch's own ``FlopCounterMode`` does the same but also tracks modules through backward hooks,
    which fail under ``torch.autograd.grad`` (the holistic term's gradient penalty); here the
    owner is set by forward hooks on the model's top-level children and by :func:`step_flops`."""

    def __init__(self):
        super().__init__()
        self.counts: Dict[str, int] = {}
        self.owner = "other"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet is torch.ops.aten.convolution_backward:
            flops = _conv_backward_flops(*args)
        elif packet in flop_registry:
            flops = int(flop_registry[packet](*args, **kwargs, out_val=out))
        else:
            return out
        self.counts[self.owner] = self.counts.get(self.owner, 0) + flops
        return out


def _conv_backward_flops(grad_out, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups,
                         output_mask) -> int:
    """A convolution's backward: each gradient asked for (input, weight) costs the forward's
    multiply-accumulates. torch's registry formula transposes the weight's shape and so counts a
    grouped (depthwise) convolution's input gradient as a dense one, tens of times too high for a
    MobileNetV2; the forward's count, ``prod(output) * prod(weight.shape[1:])`` (``input`` for a
    transposed one), already holds the groups."""
    macs = (x.numel() if transposed else grad_out.numel()) * math.prod(w.shape[1:])
    return 2 * macs * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def step_flops(model: torch.nn.Module, batch: List[dict]) -> Dict[str, int]:
    """FLOPs of one training step of ``model`` on ``batch`` (forward with losses, backward), on a
    deep copy: ``{"total": n, "backward": n, "<child>": n, ...}``, the forward FLOPs of each
    top-level child module that ran (e.g. a Distiller's ``student``, ``teacher``,
    ``distill_losses``: a loss's own gradient penalty counts with it) and the backward pass's."""
    probe = copy.deepcopy(model)
    probe.train()
    counter = _FlopCount()
    stack: List[str] = []

    def enter(name):
        def hook(module, args):
            stack.append(counter.owner)
            counter.owner = name
        return hook

    def leave(module, args, output):
        counter.owner = stack.pop()

    # every module names its top-level ancestor, so that the work of a grandchild called directly
    # (a Distiller's ``student.backbone``) counts with its ancestor
    owned = [(q.split(".")[0], m) for q, m in probe.named_modules() if q]
    if isinstance(probe, Distiller):  # its teacher is held outside the module tree (Distiller.teacher)
        owned += [("teacher", m) for m in probe.teacher.modules()]
    handles = []
    for owner, module in owned:
        handles.append(module.register_forward_pre_hook(enter(owner)))
        handles.append(module.register_forward_hook(leave))
    try:
        with counter:
            losses = probe(batch)
            counter.owner = "backward"
            sum(losses.values()).backward()
    finally:
        for h in handles:
            h.remove()
    del probe
    out = {"total": sum(counter.counts.values())}
    out.update(sorted(counter.counts.items()))
    return out


def iterations_for_budget(budget: float, flops_per_step: float) -> int:
    """The whole steps a budget pays for (at least one)."""
    if budget <= 0 or flops_per_step <= 0:
        raise ValueError(f"budget {budget} and step cost {flops_per_step} must be positive")
    return max(1, int(math.floor(budget / flops_per_step)))


def stretch_schedule(cfg, max_iter: int):
    """A copy of ``cfg`` whose schedule, written for ``cfg.SOLVER.MAX_ITER`` iterations, is stretched
    to ``max_iter``: warm-up, LR steps, checkpoint and evaluation periods scale alike."""
    ref = int(cfg.SOLVER.MAX_ITER)
    if ref <= 0:
        raise ConfigError(f"SOLVER.BUDGET stretches the schedule written for SOLVER.MAX_ITER, which is {ref}: set the "
                          "schedule's length (e.g. SOLVER.MAX_ITER 300)")
    f = max_iter / ref
    out = cfg.clone()
    out.defrost()
    out.SOLVER.MAX_ITER = int(max_iter)
    out.SOLVER.WARMUP_ITERS = int(round(cfg.SOLVER.WARMUP_ITERS * f))
    out.SOLVER.STEPS = tuple(int(round(s * f)) for s in cfg.SOLVER.STEPS)
    out.SOLVER.CHECKPOINT_PERIOD = max(1, int(round(cfg.SOLVER.CHECKPOINT_PERIOD * f)))
    if cfg.TEST.EVAL_PERIOD > 0:
        out.TEST.EVAL_PERIOD = max(1, int(round(cfg.TEST.EVAL_PERIOD * f)))
    out.freeze()
    return out


def apply_budget(cfg, model: torch.nn.Module) -> Tuple[object, dict]:
    """``(cfg, record)``: ``cfg`` unchanged when ``SOLVER.BUDGET`` is 0; else the config stretched to
    the iterations the budget pays for at this model's counted step cost, and the record written
    to (or, on resume, read from) ``OUTPUT_DIR/budget.json``."""
    budget = float(cfg.SOLVER.BUDGET)
    if budget <= 0:
        return cfg, {}
    path = os.path.join(cfg.OUTPUT_DIR, BUDGET_FILE)
    record = None
    if os.path.isfile(path):
        with open(path) as f:
            record = json.load(f)
        if record.get("budget") != budget or record.get("schedule_iter") != int(cfg.SOLVER.MAX_ITER):
            record = None  # another budget or schedule: count again
    if record is None:
        per_process = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
        flops = step_flops(model, synthetic_batch(cfg, per_process))
        # every process runs the same step: the run's step costs the world size times one process's
        flops = {k: v * comm.get_world_size() for k, v in flops.items()}
        record = {"budget": budget, "schedule_iter": int(cfg.SOLVER.MAX_ITER), "step_flops": flops,
                  "counter": "torch.utils.flop_counter.flop_registry", "batch": cfg.SOLVER.IMS_PER_BATCH,
                  "crop": list(cfg.INPUT.CROP.SIZE)}
        record["iterations"] = iterations_for_budget(budget, flops["total"])
        record["spent"] = record["iterations"] * flops["total"]
        if comm.is_main_process():
            os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(record, f, indent=1)
            os.replace(path + ".tmp", path)
    logger.info("SOLVER.BUDGET %.4g FLOPs at %.4g FLOPs a step: %d iterations (the schedule written for %d, "
                "stretched)", budget, record["step_flops"]["total"], record["iterations"], record["schedule_iter"])
    return stretch_schedule(cfg, record["iterations"]), record
