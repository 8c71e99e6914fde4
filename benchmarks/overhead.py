#!/usr/bin/env python
"""Training and inference overhead of every method against its baseline, in one run.

    python benchmarks/overhead.py --threads 1                  # demo scale: batch 8, 128x128, CPU
    python benchmarks/overhead.py --methods sr hs3 cwd --rounds 20 --markdown overhead.md
    python benchmarks/overhead.py --device cuda --batch 8 --size 512x512 --output-json overhead.json
    python benchmarks/overhead.py --methods pd cwd hwd fakd_cwd fakd_pd --classes 171 --threads 1
    python benchmarks/overhead.py --methods ds sr MODEL.EXITS.CHANNELS 128      # KEY VALUE: every config

Methods and their baselines: the catalogue of ``benchmarks/methods.py`` (the CamVid table's
names and overrides), each built from the demo-scale config of its family (``configs/demo/``):

* multi-exit DeepLabV3-R18 (``exits/*.yaml``, ``hs3/hs3*_r18.yaml``): ``ds``, ``mea``,
  ``mea_srl``, ``mea_srf``, ``sr``, ``hs3``, ``hs3_fuse`` against ``baseline``, the same
  multi-exit config with ``MODEL.EXITS.MODE none`` (no exits built; ``exits/none.yaml``).
  HS3's clusters file is a synthetic one written to a temporary folder (K_i = N / 2^(exits - i)
  clusters per exit; the count only changes the exits' segmenters).
* distillation (``distill/Base-Distill.yaml`` with the method's ``MODEL.DISTILL.LOSSES``, as
  ``distill/<method>.yaml``): ``pd``, ``cwd``, ``hwd``, ``fakd_cwd``, ``fakd_pd``,
  ``hwd_fakd_pd`` and the comparison rows ``skd``, ``ifvd``, ``cirkd``, ``mgd``, ``dist``,
  ``fitnet``, ``at``, ``afdcd``, ``diffkd``, ``maskd`` (each with its full objective, e.g. PD + SKD) against ``student``, the
  demo student (DeepLabV3 on MobileNetV2) trained alone. The teacher (DeepLabV3-R18, 256-channel ASPP) has random weights
  (``MODEL.DISTILL.TEACHER.ALLOW_RANDOM``): its cost does not depend on them.

**Training block.** One process builds every model with the same seed and times SGD steps
(zero_grad, forward with losses, backward, update; FAKD's lambda and every other schedule at
mid-training) on one random batch, all models interleaved round by round so that load on the
machine affects them alike (the order shuffled afresh each round, seeded by ``--seed``, so
that neither position nor neighbour biases a model). A step's time is the median over the
rounds after the warm-up ones; ``x base`` is the ratio to the method's baseline. The
reference rows (the baselines and CWD) are timed ``--reference-repeats`` times per round
(3): a reference is the median of its repeats, and the repeats' spread ((max - min) /
median) is the run's **noise floor**, reported with every table next to the spread of the
inference rows that do exactly the baseline's work; a ratio within the floor of 1.00 is no
difference. ``--threads`` is 1 by default (the docs' tables assume it).

**Precisions** (``--precisions fp32 bf16 channels_last bf16_channels_last
teacher_bf16_channels_last``; ``fp16`` on CUDA): every model is also timed, in the same
shuffled rounds, under autocast in bf16 (fp16), with its weights and batch in channels_last
(a second copy of the model, the same initial weights), or both; or, for a Distiller, with its
frozen teacher's forward alone in bf16 (``MODEL.DISTILL.TEACHER.PRECISION bf16``) and the
float32 student in channels_last (a model without a teacher, and every deployed model, then
does channels_last's work: a second measurement of it); the "Precision" table gives each row's fp32 time and the speed-up
of each precision over it (> 1: faster), at training (the forward under autocast, the
backward outside it, as the trainer's step) and at inference. On CPU the process's CPU time per
step is reported next to the wall time and is the figure the ratios use: on a shared machine
it is far less sensitive to other processes. On CUDA the ratios use the (synchronised) wall
time. Memory: on CUDA the peak allocated memory of a step (the model's own weights, buffers,
optimizer state and frozen teacher, plus the step's peak above what was allocated before it:
activations, gradients, workspace; the other models resident in the process are not
counted); on CPU the bytes of the distinct tensors autograd saves for the backward pass of a
step (weights included), a deterministic proxy for activation memory. The table names which.
Parameters and FLOPs (fvcore's count, one multiply-accumulate = one FLOP, one image): at
training, the whole training model (backbone, head, exits, classifiers, HS3-Fuse blocks, and
the frozen teacher for distillation) and the forward pass of everything a step computes
before the losses (losses and backward not counted; fvcore counts a batch norm in training
mode, which computes batch statistics, higher than in eval(), so a baseline's training FLOPs
are slightly above its inference FLOPs); at inference, the deployed model.

**Folded BatchNorms** (``--fold-bn``): every deployed model (each precision's copy) is timed
with its convolutions' BatchNorms folded into them (``TEST.FOLD_BN``, ``segdistill.modeling.fold``),
as the deployed file runs; the settings line and JSON (``settings.fold_bn``) say so, and the
deployed parameters and FLOPs are the folded models'. Training is never folded.

**Inference block.** Every method's deployed model is built the way the project ships it
(``segdistill.convert.deploy``, ``tools/deploy_model.py``): the trained model's
``deploy_state_dict()`` loaded strictly (no missing or unexpected keys) into its deployed
config: the plain ``deeplabv3_r18.yaml`` ``SemanticSegmentorAnySize`` for ds / MEA / SR / HS3, the
same hs3_fuse_r18.yaml for HS3-Fuse (its fuse blocks and the exits they read stay at inference),
the student's config for distillation. Each is timed in ``eval()`` under ``no_grad`` on the
batch (no labels), interleaved with its plain baseline (``plain``: the baseline's weights in
``deeplabv3_r18.yaml``; ``student``), as a median ratio. Parameters and FLOPs of the deployed
model are compared with the baseline's *exactly*: every method but HS3-Fuse must be equal
(``equal`` column), and its inference time ratio 1.00 within noise (identical computation).
HS3-Fuse is expected to cost more.

Distillation rows also have ``x CWD`` (step time and memory against CWD's, when ``cwd``
runs) and ``loss alone``: the distillation terms' forward + backward from fixed student
and teacher taps, which isolates what each term costs next to CWD; ``loss parts`` counts the
parameters of the losses' trainable parts (connectors, MGD's generator, CIRKD's projection
head, SKD/IFVD's discriminator), trained with the student and never deployed.
``--classes N`` builds every model (and the teacher) with N classes (e.g. 171, COCO-Stuff's),
``--covariance`` picks FAKD's covariance. The targets (the cost each method was accepted
under: SR at most 1.15x its baseline; HWD at most 1.05x and FAKD at most 1.2x CWD, per training
step) are checked at the end (PASS / FAIL) for the methods that ran.

Reading it: ``x base 1.10`` on a training row means a step costs 10% more than the
baseline's on the same model and batch; ``x base (mem)`` the same for memory. The teacher
runs under ``no_grad``, so it adds time but (on CPU's saved-for-backward measure) next to no
memory; its transient activations show in the CUDA peak only. On the inference rows, every
ratio of a deployed model that equals its baseline should read 1.00 within the run's noise
(about +-2% with ten rounds on a shared CPU); use more ``--rounds`` to tighten it.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from detectron2.modeling import build_model  # noqa: E402
from methods import METHODS, Method  # noqa: E402  (benchmarks/methods.py: the one catalogue)
from segdistill.config import load_yaml_config  # noqa: E402
from segdistill.convert import deployed_state_dict  # noqa: E402
from segdistill.engine import fold_for_inference, use_channels_last  # noqa: E402
from segdistill.engine.hooks import FollowsTrainingProgress  # noqa: E402
from segdistill.modeling.exits.hs3_clusters import save_clusters, synthetic_clusters  # noqa: E402
from segdistill.modeling.meta_arch.distill import Distiller  # noqa: E402

PLAIN_CONFIG = "configs/demo/deeplabv3_r18.yaml"
STUDENT_CONFIG = "configs/demo/distill/student.yaml"
TEACHER = ["MODEL.DISTILL.TEACHER.WEIGHTS", "", "MODEL.DISTILL.TEACHER.ALLOW_RANDOM", True]
HS3 = "@clusters"  # replaced by the synthetic clusters file


class Build(NamedTuple):
    """How this benchmark builds the models of a family (benchmarks/methods.py) and deploys them."""

    config: str
    deploy_config: Optional[str] = PLAIN_CONFIG  # the config its deployed state dict loads into; None: its own
    deploy_overrides: Tuple = ()  # besides the method's own overrides when it deploys into its own config
    same_at_inference: bool = True  # deployed params / FLOPs must equal the inference baseline's


HS3_FUSE_CONFIG = "configs/demo/hs3/hs3_fuse_r18.yaml"
BUILDS: Dict[str, Build] = {
    "baseline": Build("configs/demo/exits/none.yaml"),
    "ds": Build("configs/demo/exits/ds.yaml"),
    "sr": Build("configs/demo/exits/sr.yaml"),
    "hs3": Build("configs/demo/hs3/hs3_r18.yaml"),
    "hs3_fuse": Build(HS3_FUSE_CONFIG, deploy_config=None, deploy_overrides=("MODEL.EXITS.EVAL_EXITS", False),
                      same_at_inference=False),
    "student": Build(STUDENT_CONFIG, deploy_config=None),
    "distill": Build("configs/demo/distill/Base-Distill.yaml", deploy_config=STUDENT_CONFIG),  # random teacher
}


class Row(NamedTuple):
    """One row of this benchmark: a method of the catalogue, as built here."""

    config: str
    overrides: Tuple = ()
    baseline: Optional[str] = None   # training baseline (None: it is a baseline)
    deploy_config: str = PLAIN_CONFIG  # the config its deployed state dict loads into
    deploy_overrides: Tuple = ()
    same_at_inference: bool = True   # deployed params / FLOPs must equal the inference baseline's


def _row(m: Method) -> Row:
    """A method of benchmarks/methods.py with this benchmark's config of its family and what its
    needs become here: a random teacher, the synthetic HS3 clusters file."""
    b = BUILDS[m.family]
    overrides = tuple(m.opts)
    if "teacher" in m.needs:
        overrides += tuple(TEACHER)
    if {"hs3_clusters", "hs3_manual"} & set(m.needs):
        overrides += ("MODEL.EXITS.HS3.CLUSTERS_FILE", HS3)
    if b.deploy_config is None:  # deployed into its own config: with its own overrides
        return Row(b.config, overrides, m.baseline, b.config, overrides + tuple(b.deploy_overrides), b.same_at_inference)
    return Row(b.config, overrides, m.baseline, b.deploy_config, tuple(b.deploy_overrides), b.same_at_inference)


# The rows, baselines first, then the table's order (its other rows cost what these do: hs3_manual
# = hs3 with other clusters, at_scaled = at with another weight; the teacher is no method).
ROWS: Dict[str, Row] = {n: _row(METHODS[n]) for n in [
    "baseline", "student", "ds", "mea", "mea_srl", "mea_srf", "sr", "hs3", "hs3_fuse",
    "pd", "cwd", "hwd", "fakd_cwd", "fakd_pd", "hwd_fakd_pd", "skd", "ifvd", "cirkd", "mgd", "dist", "fitnet", "at", "afdcd",
    "diffkd",
    "maskd",
]}
BASELINES = [n for n, m in ROWS.items() if m.baseline is None]
CHOICES = [n for n, m in ROWS.items() if m.baseline is not None]
INFERENCE_BASELINE = {"baseline": "plain", "student": "student"}  # training baseline -> inference row name
# method -> (reference method, largest step-time ratio): the cost each method was accepted under
# (SR: 15 % over its baseline; HWD and FAKD: 5 % and 20 % over CWD, the term they extend).
TARGETS = {"sr": ("baseline", 1.15), "hwd": ("cwd", 1.05), "fakd_cwd": ("cwd", 1.2), "fakd_pd": ("cwd", 1.2)}
COVARIANCES = ("diagonal", "full")
# The numeric precision / memory format a model is timed in, besides float32: autocast in bf16
# (fp16: CUDA only), the model and its batches in channels_last, or both; or a Distiller's frozen
# teacher alone in bf16 (MODEL.DISTILL.TEACHER.PRECISION) with the float32 student in channels_last
# (a model without a teacher, and every deployed model, then does channels_last's work).
TEACHER_BF16 = "teacher_bf16_channels_last"
PRECISIONS = ("fp32", "bf16", "fp16", "channels_last", "bf16_channels_last", TEACHER_BF16)
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "bf16_channels_last": torch.bfloat16}


class Settings(NamedTuple):
    """What every model of one run is built with, besides its own config and overrides."""

    device: str
    clusters: Optional[str] = None  # the synthetic HS3 clusters file
    classes: int = 0  # 0: the configs' own class count
    covariance: str = ""  # FAKD's covariance ("" = the configs')
    opts: Tuple = ()  # KEY VALUE overrides of every config


def progress(msg: str) -> None:
    print(f"[overhead] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- setup
def parse_size(text: str) -> Tuple[int, int]:
    try:
        parts = [int(v) for v in text.lower().replace(",", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"--size takes HxW (e.g. 128x128) or one side, got {text!r}")
    return parts[0], parts[1]


def resolve_methods(names: Sequence[str]) -> List[str]:
    """The requested methods in the canonical order; ``all`` = every method. ValueError on a bad name."""
    wanted = []
    for n in names:
        for part in str(n).split(","):
            part = part.strip().lower()
            if part:
                wanted.append(part)
    if not wanted:
        raise ValueError(f"No method given; choose from {', '.join(CHOICES)} (or 'all').")
    bad = [n for n in wanted if n != "all" and n not in CHOICES]
    if bad:
        raise ValueError(f"Unknown method(s) {', '.join(repr(b) for b in bad)}; choose from "
                         f"{', '.join(CHOICES)} (or 'all'; baselines {', '.join(BASELINES)} are always run).")
    if "all" in wanted:
        return list(CHOICES)
    return [n for n in CHOICES if n in wanted]


def write_clusters(folder: str, exits: Sequence[str], num_classes: int) -> str:
    """A valid HS3 clusters file (the package's synthetic clusters, written by its writer)."""
    return save_clusters(os.path.join(folder, "clusters.json"), synthetic_clusters(num_classes, exits))


def load_cfg(file: str, overrides: Sequence, settings: Settings):
    if settings.clusters is None and HS3 in overrides:
        raise ValueError(f"{file} needs the HS3 clusters file")
    cfg = load_yaml_config(os.path.join(ROOT, file), [settings.clusters if v == HS3 else v for v in overrides])
    cfg.merge_from_list(list(settings.opts))
    if settings.classes:
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = settings.classes
    if cfg.MODEL.META_ARCHITECTURE == "Distiller":
        if settings.classes:
            cfg.MODEL.DISTILL.TEACHER.OPTS = list(cfg.MODEL.DISTILL.TEACHER.OPTS) + [
                "MODEL.SEM_SEG_HEAD.NUM_CLASSES", settings.classes]
        if settings.covariance:
            cfg.MODEL.DISTILL.FAKD.COVARIANCE = settings.covariance
    cfg.MODEL.DEVICE = settings.device
    cfg.DATASETS.TRAIN = ()  # nothing reads the dataset (HS3 would check the clusters' class names)
    return cfg


def build(file: str, overrides: Sequence, settings: Settings) -> nn.Module:
    cfg = load_cfg(file, overrides, settings)
    torch.manual_seed(0)
    return build_model(cfg)


def teacher_bf16_variant(name: str, settings: Settings) -> nn.Module:
    """Row ``name`` (a Distiller) with its frozen teacher's forward in bf16 and the float32
    student in channels_last, in training mode at mid-schedule (the same initial weights)."""
    m = ROWS[name]
    overrides = tuple(m.overrides) + ("MODEL.DISTILL.TEACHER.PRECISION", "bf16")
    cfg = load_cfg(m.config, overrides, settings)
    model = use_channels_last(build(m.config, overrides, settings).train())
    if isinstance(model, FollowsTrainingProgress):
        model.set_training_progress(cfg.SOLVER.MAX_ITER // 2, cfg.SOLVER.MAX_ITER)
    return model


def make_batch(n: int, size: Tuple[int, int], num_classes: int, seed: int = 0, labels: bool = True):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    batch = []
    for _ in range(n):
        d = {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8), "height": h, "width": w}
        if labels:
            lab = torch.randint(0, num_classes, (max(1, h // 8), max(1, w // 8)), generator=g)
            lab = lab.repeat_interleave(8, 0).repeat_interleave(8, 1)[:h, :w]  # blobs: a few classes per image
            lab = torch.nn.functional.pad(lab, (0, w - lab.shape[1], 0, h - lab.shape[0]), value=255)
            lab[: max(1, h // 32)] = 255  # some ignore pixels, as padding makes
            d["sem_seg"] = lab
        batch.append(d)
    return batch


# ------------------------------------------------------------------------------------- measures
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def resident_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Weights, buffers, optimizer state and (distillation) the frozen teacher."""
    mods = [model] + ([model.teacher] if isinstance(getattr(model, "teacher", None), nn.Module) else [])
    n = sum(tensor_bytes(m.parameters()) + tensor_bytes(m.buffers()) for m in mods)
    return n + sum(tensor_bytes(s.values()) for s in opt.state.values())


def precision_context(precision: str, device: str):
    """Autocast for a precision of :data:`PRECISIONS` (nothing for fp32 and channels_last alone)."""
    dtype = _AUTOCAST.get(precision)
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()


def uses_channels_last(precision: str) -> bool:
    return precision.endswith("channels_last")


def train_step(model, opt, batch, device: str, precision: str = "fp32") -> Tuple[float, float, int]:
    """One SGD step: (wall s, CPU s, CUDA peak bytes above the memory allocated before it); the
    forward in ``precision`` (autocast), the backward outside it, as the trainer's step."""
    opt.zero_grad(set_to_none=True)
    cuda = device.startswith("cuda")
    sync(device)
    if cuda:
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    w, c = time.perf_counter(), time.process_time()
    with precision_context(precision, device):
        losses = model(batch)
    sum(losses.values()).backward()
    opt.step()
    sync(device)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    return wall, cpu, (torch.cuda.max_memory_allocated() - before) if cuda else 0


@torch.no_grad()
def infer_step(model, batch, device: str, precision: str = "fp32") -> Tuple[float, float]:
    sync(device)
    w, c = time.perf_counter(), time.process_time()
    with precision_context(precision, device):
        model(batch)
    sync(device)
    return time.perf_counter() - w, time.process_time() - c


def saved_bytes(model, opt, batch) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass of one step (no update)."""
    seen = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = model(batch)
    sum(losses.values()).backward()
    opt.zero_grad(set_to_none=True)
    return sum(seen.values())


def loss_alone(model, batch, device: str, rounds: int) -> Optional[float]:
    """Median time of a Distiller's distillation terms alone (forward + backward from fixed
    student and teacher taps); None for other models."""
    if not isinstance(model, Distiller):
        return None
    with torch.no_grad():
        _, inputs = model.distill_batch(batch)
    fixed = dict(inputs.student)
    cuda = device.startswith("cuda")
    times = []
    for _ in range(rounds):
        inputs.student = {k: v.detach().requires_grad_(True) for k, v in fixed.items()}
        sync(device)
        t0 = time.perf_counter() if cuda else time.process_time()
        total = sum(sum(term.distill(inputs).values()) for term in model.distill_losses.values())
        total.backward()
        sync(device)
        times.append((time.perf_counter() if cuda else time.process_time()) - t0)
    return median(times)


class TrainingGraph(nn.Module):
    """Everything a training step computes before the losses, as a traceable module: the
    (student's) backbone, head, exits, classifiers and HS3-Fuse blocks, and the teacher."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.teacher = getattr(model, "teacher", None) if isinstance(getattr(model, "teacher", None), nn.Module) else None

    def forward(self, x):
        m = self.model
        s = m.student if self.teacher is not None else m
        feats = s.backbone(x)
        if len(getattr(s, "exits", None) or {}):
            out = s.forward_outputs(feats, x.shape[-2:])
            tensors = [out.final.features, out.final.seg_logits]
            tensors += [out.final.cls_logits] if out.final.cls_logits is not None else []
            for e in out.exits.values():
                tensors += [e.features, e.seg_logits] + ([e.cls_logits] if e.cls_logits is not None else [])
            logits = out.final.seg_logits
        else:
            head = s.sem_seg_head.forward_outputs(feats)
            logits = head["logits"]
            tensors = [head["features"], logits] if head.get("features") is not None else [logits]
        if self.teacher is not None:
            t_logits = m.teacher_taps(x, ["logits"])["logits"]  # the Distiller's teacher on the same batch
            if t_logits.shape[-2:] != logits.shape[-2:]:
                t_logits = nn.functional.interpolate(t_logits, size=logits.shape[-2:], mode="bilinear")
            tensors.append(t_logits)
        return tuple(tensors)


def count_flops(model: nn.Module, size: Tuple[int, int], device: str, training: bool) -> int:
    from detectron2.utils.analysis import FlopCountAnalysis as D2Flops
    from fvcore.nn import FlopCountAnalysis

    img = make_batch(1, size, 2, labels=False)[0]
    was_training = model.training
    if training:
        s = getattr(model, "student", model)
        x = ((img["image"].to(device).float() - s.pixel_mean) / s.pixel_std)[None]
        model.train()
        counter = FlopCountAnalysis(TrainingGraph(model), (x,))
    else:
        model.eval()
        counter = D2Flops(model, [{"image": img["image"].to(device), "height": size[0], "width": size[1]}])
    counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with torch.no_grad():
        total = counter.total()
    model.train(was_training)
    return int(total)


def loss_parts_params(model: nn.Module) -> Optional[int]:
    """Parameters of a Distiller's loss parts (None for other models)."""
    return sum(p.numel() for p in model.distill_losses.parameters()) if isinstance(model, Distiller) else None


def training_params(model: nn.Module) -> int:
    teacher = getattr(model, "teacher", None)
    n = sum(p.numel() for p in model.parameters())
    return n + (sum(p.numel() for p in teacher.parameters()) if isinstance(teacher, nn.Module) else 0)


def shuffled(entries: List, r: int, seed: int) -> List:
    """Round ``r``'s order: a fresh permutation per round (seeded by ``seed`` and ``r``), so that
    no entry always runs first or after the same neighbour (a rotation keeps neighbours)."""
    order = list(entries)
    random.Random(seed * 1_000_003 + r).shuffle(order)
    return order


class Entry(NamedTuple):
    """One timed entry of a round: a row, the precision it runs in, and which repeat it is
    (reference rows are timed several times per round: a robust reference and the noise floor)."""

    name: str
    precision: str = "fp32"
    repeat: int = 0


def timed_rounds(entries: List[Entry], step, total: int, warmup: int, seed: int, what: str) -> Dict[Entry, List]:
    """``step(entry)`` for every entry in every round, in a shuffled order; the results of the
    rounds after the warm-up ones, per entry."""
    rec = {e: [] for e in entries}
    for r in range(total):
        t0 = time.perf_counter()
        for e in shuffled(entries, r, seed):
            out = step(e)
            if r >= warmup:
                rec[e].append(out)
        progress(f"{what} round {r + 1}/{total}{' (warm-up)' if r < warmup else ''}: {time.perf_counter() - t0:.1f} s")
    return rec


def robust(rec: Dict[Entry, List], name: str, precision: str, index: int) -> Tuple[float, Optional[float]]:
    """(median over the repeats of each repeat's median of field ``index``, the repeats' spread
    (max - min) / median, None for a row timed once)."""
    per = [median([x[index] for x in v]) for e, v in rec.items() if e.name == name and e.precision == precision]
    mid = median(per)
    return mid, ((max(per) - min(per)) / mid if len(per) > 1 and mid else None)


def precision_times(rec: Dict[Entry, List], name: str, precision: str, cuda: bool) -> dict:
    """A row's step time in ``precision`` and its ratio to the row's fp32 time (> 1: faster)."""
    i = 0 if cuda else 1
    t, fp32 = robust(rec, name, precision, i)[0], robust(rec, name, "fp32", i)[0]
    return {"time_s": t, "speedup": ratio(fp32, t)}


def median(xs: List[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# ------------------------------------------------------------------------------------- run
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["all"], metavar="METHOD",
                   help=f"'all' or any of: {', '.join(CHOICES)} (their baselines always run)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, which the docs' tables "
                   "assume and is steadiest on a shared machine; 0 = torch's default)")
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=PRECISIONS, metavar="P",
                   help=f"also time every model in these ({', '.join(PRECISIONS)}; fp16: CUDA only): a column "
                        "per precision, as a ratio to fp32")
    p.add_argument("--reference-repeats", type=int, default=3, metavar="K",
                   help="time the reference rows (baselines, CWD) K times per round: their median is the "
                        "reference of the ratios, their spread the noise floor")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-round order")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (each times every model once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=parse_size, default=(128, 128), metavar="HxW")
    p.add_argument("--output-json", default="", metavar="PATH")
    p.add_argument("--markdown", default="", metavar="PATH", help="write the tables as markdown")
    p.add_argument("--classes", type=int, default=0,
                   help="classes of every model and of the teacher (default: the configs' own, 10)")
    p.add_argument("--covariance", default="", choices=("",) + COVARIANCES,
                   help="FAKD's class covariance (default: the configs')")
    p.add_argument("--fold-bn", action="store_true",
                   help="time the deployed models with their convolutions' BatchNorms folded (TEST.FOLD_BN), "
                        "in every precision")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="overrides of every config")
    args = p.parse_args(argv)
    try:
        methods = resolve_methods(args.methods)
    except ValueError as e:
        p.error(str(e))
    if args.rounds < 1 or args.warmup < 0 or args.batch < 1 or args.classes < 0 or args.classes == 1:
        p.error("--rounds and --batch must be >= 1, --warmup >= 0 and --classes 0 (the configs') or >= 2")
    if args.reference_repeats < 1:
        p.error("--reference-repeats must be >= 1")
    if "fp16" in args.precisions and args.device != "cuda":
        p.error("--precisions fp16 needs --device cuda (use bf16 on CPU)")
    args.precisions = ["fp32"] + [x for x in dict.fromkeys(args.precisions) if x != "fp32"]
    if len(args.opts) % 2:
        p.error(f"overrides come as KEY VALUE pairs, got {args.opts}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, cuda = args.device, args.device == "cuda"
    logging.getLogger("segdistill.modeling.meta_arch.distill").setLevel(logging.ERROR)  # the random-teacher banner

    baselines = [b for b in BASELINES if any(ROWS[m].baseline == b for m in methods)]
    names = [n for n in list(ROWS) if n in baselines or n in methods]  # canonical order, baselines first
    tmp = tempfile.TemporaryDirectory(prefix="overhead_")
    try:
        return _run(args, names, device, cuda, tmp.name)
    finally:
        tmp.cleanup()


def _run(args, names, device, cuda, tmp) -> dict:
    settings = Settings(device, None, args.classes, args.covariance, tuple(args.opts))
    num_classes = load_cfg(PLAIN_CONFIG, (), settings).MODEL.SEM_SEG_HEAD.NUM_CLASSES
    if any(HS3 in ROWS[n].overrides for n in names):
        hs3_cfg = load_cfg("configs/demo/hs3/hs3_r18.yaml", (), settings)
        clusters = write_clusters(tmp, list(hs3_cfg.MODEL.EXITS.IN_FEATURES), hs3_cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        settings = settings._replace(clusters=clusters)

    # ---- training block
    models, opts, variants, teacher_bf16 = {}, {}, {}, {}
    precisions = list(args.precisions)
    for n in names:
        m = ROWS[n]
        progress(f"building {n} ({m.config}{' + overrides' if m.overrides else ''})")
        models[n] = build(m.config, m.overrides, settings).train()
        cfg = load_cfg(m.config, m.overrides, settings)
        if isinstance(models[n], FollowsTrainingProgress):  # schedules (FAKD's lambda, SR) at mid-training
            models[n].set_training_progress(cfg.SOLVER.MAX_ITER // 2, cfg.SOLVER.MAX_ITER)
        opts[n] = torch.optim.SGD(models[n].parameters(), lr=1e-3, momentum=0.9)
        if cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES != num_classes:
            raise ValueError(f"{n}: {cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES} classes, the plain baseline {num_classes}")
        if any(uses_channels_last(x) for x in precisions):  # the same weights, in channels_last
            cl = use_channels_last(build(m.config, m.overrides, settings).train())
            if isinstance(cl, FollowsTrainingProgress):
                cl.set_training_progress(cfg.SOLVER.MAX_ITER // 2, cfg.SOLVER.MAX_ITER)
            variants[n] = (cl, torch.optim.SGD(cl.parameters(), lr=1e-3, momentum=0.9))
        if TEACHER_BF16 in precisions and cfg.MODEL.META_ARCHITECTURE == "Distiller":
            tb = teacher_bf16_variant(n, settings)
            teacher_bf16[n] = (tb, torch.optim.SGD(tb.parameters(), lr=1e-3, momentum=0.9))
    batch = make_batch(args.batch, args.size, num_classes)
    # reference rows: the baselines and CWD (the "x CWD" reference), timed several times per round
    refs = set(BASELINES) | {"cwd"}
    entries = [Entry(n, x, k) for n in names for x in precisions
               for k in range(args.reference_repeats if n in refs else 1)]

    def one_train_step(e: Entry):
        if e.precision == TEACHER_BF16 and e.name in teacher_bf16:
            model, opt = teacher_bf16[e.name]
        else:
            model, opt = variants[e.name] if uses_channels_last(e.precision) else (models[e.name], opts[e.name])
        return train_step(model, opt, batch, device, e.precision)

    rec = timed_rounds(entries, one_train_step, args.warmup + args.rounds, args.warmup, args.seed, "training")
    train, noise = {}, {"training": {}, "inference": {}}
    for n in names:
        progress(f"memory, parameters and FLOPs of {n} (training)")
        (wall, wall_spread), (cpu, cpu_spread), (peak, _) = (robust(rec, n, "fp32", i) for i in range(3))
        if n in refs and args.reference_repeats > 1:
            noise["training"][n] = wall_spread if cuda else cpu_spread
        train[n] = {
            "baseline": ROWS[n].baseline or n, "wall_s": wall, "cpu_s": cpu if not cuda else None,
            "saved_bytes": saved_bytes(models[n], opts[n], batch),
            "cuda_peak_bytes": int(peak + resident_bytes(models[n], opts[n])) if cuda else None,
            "params": training_params(models[n]),
            "trainable_params": sum(p.numel() for p in models[n].parameters() if p.requires_grad),
            # a Distiller's trainable loss parts (connectors, generators, projection heads,
            # discriminators), counted apart from the student: trained, never deployed
            "loss_parts_params": loss_parts_params(models[n]),
            "flops": count_flops(models[n], args.size, device, training=True),
            "loss_alone_s": loss_alone(models[n], batch, device, args.rounds),
            "precision": {x: precision_times(rec, n, x, cuda) for x in precisions},
        }
    key = "wall_s" if cuda else "cpu_s"
    mem = "cuda_peak_bytes" if cuda else "saved_bytes"
    for n in names:
        b = train[train[n]["baseline"]]
        train[n].update(time_ratio=ratio(train[n][key], b[key]), wall_ratio=ratio(train[n]["wall_s"], b["wall_s"]),
                        memory_ratio=ratio(train[n][mem], b[mem]))
        cwd = train.get("cwd") if train[n]["baseline"] == "student" else None  # distillation rows against CWD
        train[n].update(cwd_ratio=ratio(train[n][key], cwd[key]) if cwd else None,
                        cwd_memory_ratio=ratio(train[n][mem], cwd[mem]) if cwd else None)
    targets = {}
    for n, (ref, limit) in TARGETS.items():
        if n in train and ref in train:
            r = ratio(train[n][key], train[ref][key])
            targets[n] = {"reference": ref, "ratio": r, "limit": limit, "pass": bool(r <= limit)}

    # ---- inference block: deployed models
    deployed, rows, deployed_cl = {}, {}, {}
    for n in names:
        m = ROWS[n]
        row = INFERENCE_BASELINE.get(n, n)
        progress(f"deploying {n} -> {m.deploy_config}")
        state = {k: v.to(device) for k, v in deployed_state_dict(models[n]).items()}
        model = build(m.deploy_config, m.deploy_overrides, settings)
        model.load_state_dict(state, strict=True)
        deployed[row] = fold_for_inference(model.eval(), args.fold_bn)  # --fold-bn: as TEST.FOLD_BN runs it
        rows[row] = n
        if any(uses_channels_last(x) for x in precisions):
            cl = build(m.deploy_config, m.deploy_overrides, settings)
            cl.load_state_dict(state, strict=True)
            deployed_cl[row] = fold_for_inference(use_channels_last(cl).eval(), args.fold_bn)
    for d in (models, opts, variants, teacher_bf16):  # free the training models before the inference block
        d.clear()
    infer_batch = make_batch(args.batch, args.size, num_classes, labels=False)
    irefs = set(INFERENCE_BASELINE.values())
    ientries = [Entry(row, x, k) for row in deployed for x in precisions
                for k in range(args.reference_repeats if row in irefs else 1)]

    def one_infer_step(e: Entry):
        model = deployed_cl[e.name] if uses_channels_last(e.precision) else deployed[e.name]
        return infer_step(model, infer_batch, device, e.precision)

    irec = timed_rounds(ientries, one_infer_step, args.warmup + args.rounds, args.warmup, args.seed + 1, "inference")
    infer = {}
    for row, model in deployed.items():
        progress(f"parameters and FLOPs of {row} (deployed)")
        n = rows[row]
        base = INFERENCE_BASELINE[ROWS[n].baseline or n]
        (wall, wall_spread), (cpu, cpu_spread) = (robust(irec, row, "fp32", i) for i in range(2))
        if row in irefs and args.reference_repeats > 1:
            noise["inference"][row] = wall_spread if cuda else cpu_spread
        infer[row] = {
            "method": n, "baseline": base, "deploy_config": ROWS[n].deploy_config,
            "wall_s": wall, "cpu_s": None if cuda else cpu,
            "params": sum(p.numel() for p in model.parameters()),
            "flops": count_flops(model, args.size, device, training=False),
            "expected_equal": ROWS[n].same_at_inference,
            "precision": {x: precision_times(irec, row, x, cuda) for x in precisions},
        }
    for row, v in infer.items():
        b = infer[v["baseline"]]
        v.update(time_ratio=ratio(v[key], b[key]), wall_ratio=ratio(v["wall_s"], b["wall_s"]),
                 params_equal=v["params"] == b["params"], flops_equal=v["flops"] == b["flops"])
    for n in names:
        d = infer[INFERENCE_BASELINE.get(n, n)]
        train[n].update(params_inference=d["params"], flops_inference=d["flops"])
    # rows doing the same work as their reference: deployed models equal to their baseline
    same = [v["time_ratio"] for row, v in infer.items() if v["expected_equal"] and row != v["baseline"]]
    noise["inference_equal_rows"] = [min(same), max(same)] if same else None

    where = (f"CUDA {torch.cuda.get_device_name()}" if cuda else f"CPU, {torch.get_num_threads()} thread(s)")
    result = {
        "settings": {"device": device, "where": where, "batch": args.batch, "size": list(args.size),
                     "classes": num_classes, "covariance": args.covariance or "config", "opts": list(args.opts),
                     "rounds": args.rounds, "warmup": args.warmup, "timing": "wall" if cuda else "cpu",
                     "precisions": precisions, "fold_bn": bool(args.fold_bn),
                     "reference_repeats": args.reference_repeats, "seed": args.seed,
                     "memory": "cuda_peak" if cuda else "saved_for_backward", "torch": torch.__version__},
        "training": train, "inference": infer, "targets": targets, "noise": noise,
    }
    for d in (train, infer):  # every ratio must be a real number
        for n, v in d.items():
            bad = [k for k, x in v.items() if k.endswith("ratio") and x is not None and not (x > 0 and math.isfinite(x))]
            if bad:
                raise RuntimeError(f"{n}: non-finite ratios {bad}: {v}")
    text = report(result, "github")
    print(report(result, "simple"))
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(text)
        progress(f"markdown written to {args.markdown}")
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
        progress(f"JSON written to {args.output_json}")
    return result


# ------------------------------------------------------------------------------------- report
def report(result: dict, fmt: str) -> str:
    from tabulate import tabulate

    s, train, infer = result["settings"], result["training"], result["inference"]
    cuda = s["device"] == "cuda"
    t = "wall" if cuda else "CPU"
    mem = "CUDA peak" if cuda else "saved for bwd"
    md = fmt == "github"
    h = "### " if md else ""
    mb, m, g = (lambda b: f"{b / 2**20:.1f}"), (lambda n: f"{n / 1e6:.3f}"), (lambda n: f"{n / 1e9:.3f}")
    lines = [
        f"{h}Overhead of every method against its baseline",
        "",
        f"Batch {s['batch']} x {s['size'][0]}x{s['size'][1]}, {s['classes']} classes, {s['where']}, median of "
        f"{s['rounds']} interleaved "
        f"rounds after {s['warmup']} warm-up; ratios (x base) use the {t} time; memory: "
        + ("peak CUDA memory of a step (own weights, optimizer state, teacher + the step's peak)" if cuda else
           "bytes autograd saves for the backward pass (CPU: no peak-memory counter)")
        + ". Params / FLOPs (fvcore, 1 image): training = the whole training model (frozen teacher included), "
          "forward before the losses; inference = the deployed model"
        + (" with its BatchNorms folded into the convolutions (--fold-bn, every precision)." if s["fold_bn"]
           else "."),
        "",
        f"{h}Training step",
        "",
    ]
    head = ["method", "baseline", "step wall (ms)"] + ([] if cuda else ["step CPU (ms)"]) + [
        f"x base ({t})", "x CWD", f"{mem} (MB)", "x base (mem)", "x CWD (mem)", "loss alone (ms)",
        "params train (M)", "loss parts (M)", "GFLOPs train", "params infer (M)", "GFLOPs infer"]
    rows = []
    opt = (lambda x, f: "-" if x is None else f.format(x))
    for n, v in train.items():
        rows.append([n, v["baseline"] if v["baseline"] != n else "-", f"{v['wall_s'] * 1e3:.1f}"]
                    + ([] if cuda else [f"{v['cpu_s'] * 1e3:.1f}"])
                    + [f"{v['time_ratio']:.3f}", opt(v["cwd_ratio"], "{:.3f}"),
                       mb(v["cuda_peak_bytes"] if cuda else v["saved_bytes"]), f"{v['memory_ratio']:.3f}",
                       opt(v["cwd_memory_ratio"], "{:.3f}"), opt(v["loss_alone_s"] and v["loss_alone_s"] * 1e3, "{:.2f}"),
                       m(v["params"]), opt(v["loss_parts_params"] and v["loss_parts_params"] / 1e6, "{:.3f}"),
                       g(v["flops"]), m(v["params_inference"]), g(v["flops_inference"])])
    lines += [tabulate(rows, head, tablefmt=fmt, disable_numparse=True, colalign=_align(head, 2)), "",
              f"{h}Inference (deployed model vs plain baseline{', BatchNorms folded' if s['fold_bn'] else ''})", ""]
    head = ["deployed", "loads into", "baseline", "wall (ms)"] + ([] if cuda else ["CPU (ms)"]) + [
        f"x base ({t})", "params (M)", "GFLOPs", "params equal", "FLOPs equal"]
    rows = []
    for n, v in infer.items():
        rows.append([n, os.path.relpath(v["deploy_config"], "configs/demo"), v["baseline"] if v["baseline"] != n else "-",
                     f"{v['wall_s'] * 1e3:.1f}"] + ([] if cuda else [f"{v['cpu_s'] * 1e3:.1f}"])
                    + [f"{v['time_ratio']:.3f}", m(v["params"]), g(v["flops"]),
                       _yes(v["params_equal"], v["expected_equal"]), _yes(v["flops_equal"], v["expected_equal"])])
    lines += [tabulate(rows, head, tablefmt=fmt, disable_numparse=True, colalign=_align(head, 3)), ""]
    must = {n: v for n, v in infer.items() if v["expected_equal"]}
    ok = all(v["params_equal"] and v["flops_equal"] for v in must.values())
    lines.append(f"Deployed parameters and FLOPs equal the baseline's exactly for {', '.join(must)}: "
                 f"{'yes' if ok else 'NO'}")
    ratios = [v["time_ratio"] for n, v in must.items() if n != v["baseline"]]
    if ratios:
        lines.append(f"Their inference time ratios ({t}): {min(ratios):.3f} to {max(ratios):.3f} "
                     "(identical computation: 1.00 within noise).")
    extra = [n for n, v in infer.items() if not v["expected_equal"]]
    if extra:
        lines.append(f"Kept at inference by design: {', '.join(extra)} (HS3-Fuse's fuse blocks and the exits they read).")
    lines += ["", noise_line(result, t)]
    if len(s["precisions"]) > 1:
        lines += ["", f"{h}Precision (speed-up over fp32, {t} time; > 1: faster)", ""]
        others = s["precisions"][1:]
        head = ["row", "fp32 train (ms)"] + [f"{x} train" for x in others] + ["fp32 infer (ms)"] + [
            f"{x} infer" for x in others]
        rows = []
        for n, v in train.items():
            d = infer[INFERENCE_BASELINE.get(n, n)]
            rows.append([n, f"{v['precision']['fp32']['time_s'] * 1e3:.1f}"]
                        + [f"{v['precision'][x]['speedup']:.2f}x" for x in others]
                        + [f"{d['precision']['fp32']['time_s'] * 1e3:.1f}"]
                        + [f"{d['precision'][x]['speedup']:.2f}x" for x in others])
        lines.append(tabulate(rows, head, tablefmt=fmt, disable_numparse=True, colalign=_align(head, 1)))
    if result["targets"]:
        lines += ["", f"{h}Targets (training step, {t} time)", ""]
        for n, v in result["targets"].items():
            lines.append(f"{'- ' if md else ''}{n}: {v['ratio']:.3f}x {v['reference']} per step "
                         f"(target <= {v['limit']}): {'PASS' if v['pass'] else 'FAIL'}")
    return "\n".join(lines) + "\n"


def noise_line(result: dict, t: str) -> str:
    """The run's noise floor: the spread of the repeated reference rows and of the deployed rows
    doing exactly their baseline's work."""
    noise = result["noise"]
    parts = []
    for block in ("training", "inference"):
        if noise[block]:
            spread = ", ".join(f"{n} {100 * v:.1f}%" for n, v in noise[block].items())
            parts.append(f"{block}: repeated reference rows ({result['settings']['reference_repeats']} per round) "
                         f"spread {spread}")
    if noise["inference_equal_rows"]:
        lo, hi = noise["inference_equal_rows"]
        parts.append(f"deployed rows equal to their baseline: {lo:.3f} to {hi:.3f} of it")
    return f"Noise floor ({t} time): " + ("; ".join(parts) if parts else "one repeat, not measured") + "."


def _align(head, text_columns: int):
    return ("left",) * text_columns + ("right",) * (len(head) - text_columns)


def _yes(equal: bool, expected: bool) -> str:
    if equal:
        return "yes"
    return "no (by design)" if not expected else "NO"


if __name__ == "__main__":
    main()
