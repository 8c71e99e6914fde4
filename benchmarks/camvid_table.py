#!/usr/bin/env python
"""The CamVid evidence table (docs/results.md): every method against its baseline, five seeds,
from backbones pre-trained here, with the papers' premises checked and a claim-by-claim verdict.

    python benchmarks/camvid_table.py                         # the whole chain, 5 seeds, 2 jobs at once
    python benchmarks/camvid_table.py --blocks sr --seeds 1   # one block, one seed
    python benchmarks/camvid_table.py --methods baseline,ds   # some rows only (a regime check)
    python benchmarks/camvid_table.py --table-only            # rebuild table.md / table.png / verdict
    python benchmarks/camvid_table.py --from-summary docs/results/camvid/summary.json --output /tmp/t \
        --publish docs/results/camvid                          # the same from the committed numbers alone
    python benchmarks/camvid_table.py --data-root /data/camvid --output DIR [KEY VALUE ...]

The chain, one job graph (every step a subprocess, ``--jobs`` at once, ``--threads`` torch
threads each, logs in the run folders):

1. **Pre-training** (``benchmarks/pretrain.py``): each backbone the rows use is pre-trained once
   (``PRETRAINED``: ResNet-18 and MobileNetV2 on CamVid train minus the HS3 analysis split) into
   ``--pretrain-output`` (default ``output/pretrain``); every run of the table then starts from it
   (``MODEL.TIMM.CHECKPOINT``) with freshly initialised heads and exits. ``--pretrained none``
   trains from random weights (the superseded regime); ``--pretrained resnet18=resnet18_demo``
   swaps one backbone's pre-training (the transfer comparison).
2. **Rows** (a run of ``train_net.py`` per method and seed, configs of configs/camvid/table/):

   * ``sr``: baseline, DS, MEA, MEA+SR-L, MEA+SR-F, SR (Self-Regulation, Table 1 ablation).
   * ``hs3``: baseline, DS, HS3 (the paper's trade-off rule), HS3 with constant-ratio class sets
     ("manual", HS3 Table 6), HS3-Fuse. Its Phase 1 runs once first: DS on
     ``camvid_train_hs3_reduced``, confusions on ``camvid_train_hs3_analysis``, then both analyses.
   * ``distill``: a teacher (trained once, seed 0), the student alone, PD, CWD, FAKD-CWD, FAKD-PD,
     HWD, HWD + FAKD-PD (FAKD Tables 3-4, HWD Tables II-III), and the papers' comparison rows
     SKD, IFVD, CIRKD, MGD, DIST, FitNet and AT, and the 2023 papers' Af-DCD, DiffKD and MasKD
     (each with its full objective, e.g. PD + SKD; docs/distillation.md). MasKD's receptive
     tokens are learnt first, once, on the rows' teacher (``tools/maskd_tokens.py``, the
     ``maskd_tokens`` job: on the teacher's training split, for ``MASKD_TOKENS_SHARE`` of the
     rows' iterations), into ``OUTPUT/maskd_tokens/tokens.pth``; the tuning protocol learns its
     own on its teacher (``OUTPUT/tune/maskd_tokens/tokens.pth``).

   * ``equal_compute``: the distillation rows at one training budget (``SOLVER.BUDGET``, the
     FLOPs of ``--budget-steps`` steps of ``--budget-reference``, default 300 steps of the
     student alone: its own row), counted once into ``OUTPUT/budget.json``; a costlier step
     gets fewer iterations (``segdistill.engine.budget``).
   * ``tuned``: each distillation row with its loss weights (``TUNE_KEYS``) picked without val:
     a grid of x0.1, x0.3, x1, x3 of the default, ``--tune-seeds`` seeds a point, trained on
     ``camvid_train_hs3_reduced`` (the distillers with a teacher trained there too) and
     scored on ``camvid_train_hs3_analysis``; the best mean held-out mIoU is the pick
     (``OUTPUT/tune/<method>/pick.json``), then the seeds on val with it.

   ``--regime schedule_4x | demo_pretraining | heldout_exits`` names the confound runs and
   the held-out anytime models (rows, overrides, output folder: ``REGIMES``).
   A row's baseline is its block's first method (the distillation rows: the student alone).
   Runs shared by blocks (baseline, DS) train once.
3. **Premises** (printed, and written at the top of ``table.md``): the final output above every
   DS exit (the Phase-1 DS model on the analysis split, and inside each multi-exit model on
   val: on its mean over seeds, and in each run) and the teacher clearly above the student alone (``--min-teacher-margin``).
   If one fails or is not measured yet, the table is written but its reading (the verdict) is
   withheld, with the margins.
4. **Verdict**: for each claim of the papers (``CLAIMS``) the difference between two rows, paired
   by seed, its 95 % confidence interval (Student t over the seeds both rows finished), and
   two tests (Δ = 0, Δ = the paper's smallest gain) corrected by Holm over every test of the
   table: reproduced (Δ = 0 rejected, above) / not reproduced (rejected below 0, or below the
   gain) / inconclusive; the uncorrected reading of the raw interval beside it. The
   premise "final above every exit" is checked inside each model (a gate) and each run
   (listed per claim).

Every finished run keeps its ``result.json`` under ``OUTPUT/runs/<method>/seed<k>/``, so an
interrupted invocation resumes: finished runs are skipped and an interrupted training continues
from its last checkpoint (``--resume``); pre-trainings resume the same way. Runs go seed by seed
(all rows of seed 0 first), so a partial table has whole seeds to pair. KEY VALUE overrides
apply to every table training (not to pre-training: ``--pretrain-opts``).

Output: ``OUTPUT/table.md`` (premises, tables with paired CIs, verdict), ``OUTPUT/table.png``,
``OUTPUT/results.json`` (everything), ``OUTPUT/summary.json`` (per-seed mIoU and exits only:
small enough to commit), and with ``--publish DIR`` copies of table.md, table.png,
summary.json and the HS3 trade-off plot and report in DIR.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pretrain as pretrain_mod  # noqa: E402  (benchmarks/pretrain.py)
import step_cost  # noqa: E402  (benchmarks/step_cost.py: a method's counted step FLOPs)
from methods import BLOCKS, BUDGET, HISTORY_ROWS, METHODS, TUNE_GRID, TUNE_KEYS, TUNED_VALUE, Method  # noqa: E402  (the one catalogue)
from table_report import TableInputs, write_table  # noqa: E402
from table_stats import exit_mious, exit_premise_per_run, paired, premises, verdict  # noqa: E402,F401  (paired: re-exported with the table)

CONFIGS = os.path.join(ROOT, "configs", "camvid", "table")
TRAIN, VAL = "camvid_train", "camvid_val"
EXITS = ["res2", "res3", "res4"]

# backbone (MODEL.TIMM.NAME) -> the pre-training of benchmarks/pretrain.py every run starts from
PRETRAINED = {"resnet18": "resnet18_camvid", "mobilenetv2_100": "mobilenetv2_camvid", "resnet50": "resnet50_camvid"}


# The confound runs and the held-out models, one name each (``--regime``): the overrides, the rows
# and the output folder each adds to an invocation (docs/results.md, "Still to run").
REGIMES = {
    # 4x the schedule (1200 iterations, warm-up and periods alike): do the exits still cost the head?
    "schedule_4x": dict(opts=["SOLVER.MAX_ITER", "1200", "SOLVER.WARMUP_ITERS", "120", "SOLVER.CHECKPOINT_PERIOD",
                              "400", "TEST.EVAL_PERIOD", "1200"], methods=["baseline", "ds", "sr"], blocks=["sr"],
                        output="output/camvid_table_schedule_4x"),
    # ResNet-18 pre-trained on the demo generator (no CamVid image), as the papers start from data
    # other than their benchmark's
    "demo_pretraining": dict(opts=[], methods=["baseline", "ds", "sr"], blocks=["sr"],
                             pretrained={"resnet18": "resnet18_demo"}, output="output/camvid_table_demo_pretraining"),
    # DS, SR and the plain model trained without the analysis split: the held-out anytime curve's
    # models; with DS's RH-exit and mask-aware variants (per-pixel anytime)
    "heldout_exits": dict(opts=["DATASETS.TRAIN", '("camvid_train_hs3_reduced",)'],
                          methods=["baseline", "ds", "sr", "ds_rh", "ds_pixel"], blocks=["anytime_exits"],
                          output="output/camvid_table_heldout_exits"),
}


# MasKD's first stage at the table's scale: the authors learn the tokens for 10k iterations before
# a 40k-iteration distillation (hunto/MasKD segmentation/: train_mask_module.py's and
# train_maskd.py's defaults), a quarter of it; the table's rows train 300 iterations, so 75 (at
# least 1). A KEY VALUE override of MODEL.DISTILL.MASKD.TOKENS.ITERATIONS wins.
MASKD_TOKENS_SHARE = 0.25


def pick_weight(scores: Dict[float, List[float]]) -> float:
    """The tuning protocol's pick: the grid factor with the best mean held-out mIoU over its seeds
    (a tie goes to the factor nearest the authors' default, x1)."""
    if not scores or any(not v for v in scores.values()):
        raise ValueError(f"every grid point needs a finished run: {scores}")
    return max(scores, key=lambda f: (statistics.mean(scores[f]), -abs(math.log(f))))


def say(msg: str) -> None:
    print(f"[table] {msg}", flush=True)


def block_methods(block: str) -> List[str]:
    return list(BLOCKS[block][1])


def config_file(m: Method) -> str:
    """The table's config of a method: its family's, under configs/camvid/table/."""
    return f"{m.family}.yaml"


@dataclass
class Job:
    """A step to run: a pre-training, the HS3 Phase 1, or a method at one seed."""

    key: str
    folder: str
    cmd: List[str]
    needs: List[str]
    method: Optional[Method] = None
    seed: int = 0
    proc: Optional[subprocess.Popen] = None
    started: float = 0.0
    result: str = ""  # where finish() writes the run's result.json ("": the row's own)
    prepare: Optional[Callable[[], List[str]]] = None  # the command, built when the job starts (a pick it waits for)


def config_of(config: str, opts: Sequence[str]):
    """The merged YAML config of a row (to read its backbone and meta-architecture)."""
    sys.path.insert(0, os.path.join(ROOT, "projects"))
    from segdistill.config import load_yaml_config

    return load_yaml_config(os.path.join(CONFIGS, config), opts)


class Table:
    """The job runner of the table: which runs the invocation needs, running them (``--jobs`` at
    once, resumable), and collecting their results; the statistics are ``table_stats``'s and the
    writing ``table_report``'s."""

    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.output)
        self.runs = os.path.join(self.out, "runs")
        self.clusters_dir = os.path.join(self.out, "hs3_clusters")
        self.phase1 = os.path.join(self.clusters_dir, "phase1")
        self.clusters = {"hs3_clusters": os.path.join(self.clusters_dir, "hs3", "clusters.json"),
                         "hs3_manual": os.path.join(self.clusters_dir, "hs3_manual", "clusters.json")}
        self.teacher_weights = os.path.join(self.runs, "teacher", "seed0", "model_final.pth")
        # the weight-tuning protocol: its runs never see val, nor (training) the analysis split
        self.tune = os.path.join(self.out, "tune")
        self.tune_teacher = os.path.join(self.tune, "teacher", "seed0")
        self._budget: Optional[dict] = None
        self.blocks = args.blocks
        self.seeds = list(range(args.seeds))
        self.pretrain_out = os.path.abspath(args.pretrain_output)
        self.pretrained = dict(PRETRAINED)
        self.pretrained.update(args.pretrained_map)
        self._cfgs: Dict[Tuple[str, Tuple[str, ...]], object] = {}
        self.summary = load_summary(args.from_summary) if args.from_summary else None
        if self.summary is not None:
            # the published clusters files sit beside the published summary.json
            d = os.path.dirname(os.path.abspath(args.from_summary))
            self.clusters = {"hs3_clusters": os.path.join(d, "hs3_clusters.json"),
                             "hs3_manual": os.path.join(d, "hs3_manual_clusters.json")}
        # runs of a published summary that this invocation did not make (checked when the table is written)
        self.merged = load_summary(args.merge_summary) if args.merge_summary else None

    # ---------------------------------------------------------------- runs
    def folder(self, method: str, seed: int) -> str:
        return os.path.join(self.runs, method, f"seed{seed}")

    def result_path(self, method: str, seed: int) -> str:
        return os.path.join(self.folder(method, seed), "result.json")

    def method_seeds(self, m: Method) -> List[int]:
        return list(m.seeds) if m.seeds is not None else self.seeds

    def wanted(self) -> List[Method]:
        names = []
        for b in self.blocks:
            names += [n for n in block_methods(b) if n not in names]
        if self.args.methods:
            names = [n for n in names if n in self.args.methods]
            names += [n for n in self.args.methods if n in HISTORY_ROWS and n not in names]  # asked for by name
        return [METHODS[n] for n in names]

    def cfg(self, config: str, opts: Sequence[str]):
        # a placeholder's value is filled when the run starts; the config read here (backbone,
        # meta-architecture, default weights) does not depend on it
        opts = [x for k, v in zip(opts[::2], opts[1::2]) if v not in (BUDGET, TUNED_VALUE) for x in (k, v)]
        key = (config, tuple(opts))
        if key not in self._cfgs:
            self._cfgs[key] = config_of(config, list(opts) + list(self.args.opts))
        return self._cfgs[key]

    def backbone_weights(self, config: str, opts: Sequence[str]) -> Tuple[Optional[str], Optional[str]]:
        """(pre-training name, exported weights) for a row's backbone; (None, None) from scratch."""
        if self.args.scratch:
            return None, None
        backbone = self.cfg(config, opts).MODEL.TIMM.NAME
        if backbone not in self.pretrained:
            raise SystemExit(f"[table] no pre-training for backbone {backbone!r} ({config}); add it to PRETRAINED "
                             f"(benchmarks/camvid_table.py) and benchmarks/pretrain.py, or run --pretrained none")
        name = self.pretrained[backbone]
        return name, pretrain_mod.weights_path(self.pretrain_out, name)

    def env(self) -> Dict[str, str]:
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "projects") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env["OMP_NUM_THREADS"] = str(self.args.threads)
        env["MKL_NUM_THREADS"] = str(self.args.threads)
        if self.args.data_root:
            env["SEGDISTILL_CAMVID_ROOT"] = os.path.abspath(self.args.data_root)
        return env

    def row_opts(self, config: str, opts: Sequence[str]) -> Tuple[List[str], List[str]]:
        """Overrides that start a row from its pre-trained backbone, and what they wait for."""
        name, weights = self.backbone_weights(config, opts)
        extra = ["MODEL.TIMM.CHECKPOINT", weights or ""]
        if self.cfg(config, opts).MODEL.META_ARCHITECTURE == "Distiller":
            # the teacher's weights are its whole trained model: no backbone file to load first
            extra += ["MODEL.DISTILL.TEACHER.OPTS", '["MODEL.TIMM.CHECKPOINT", ""]']
        return extra, ([f"pretrain:{name}"] if name else [])

    def train_cmd(self, config: str, opts: Sequence[str], folder: str, seed: int) -> List[str]:
        cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", os.path.join(CONFIGS, config), "--resume"]
        return cmd + ["SEED", str(seed), "OUTPUT_DIR", folder] + list(opts) + list(self.args.opts)

    # ----------------------------------------------------- equal compute
    def budget_record(self) -> dict:
        """The equal-compute block's budget, measured once and kept in OUTPUT/budget.json (a
        resumed table keeps it): ``flops`` (counted FLOPs of a step, per method) and, with
        ``--budget-unit cpu``, ``cpu_s`` (single-thread CPU seconds of a step, measured in one
        process, interleaved)."""
        if self._budget is None:
            path = os.path.join(self.out, "budget.json")
            names = [self.args.budget_reference] + [m.name.split("@")[0] for m in self.wanted() if BUDGET in m.opts]
            names = list(dict.fromkeys(names))
            want = {"unit": self.args.budget_unit, "steps": self.args.budget_steps,
                    "reference": self.args.budget_reference, "opts": list(self.args.opts),
                    "source": os.path.abspath(self.args.budget_cpu_from) if self.args.budget_cpu_from else ""}
            rec = None
            if os.path.isfile(path):
                with open(path) as f:
                    rec = json.load(f)
                if {k: rec.get(k) for k in want} != want or not set(names) <= set(rec.get("flops", {})):
                    rec = None
            if rec is None:
                rec = dict(want)
                if self.args.budget_unit == "cpu" and self.args.budget_cpu_from:
                    rec.update(cpu_record_from(self.args.budget_cpu_from, names, self.args.opts))
                elif self.args.budget_unit == "cpu":
                    torch_threads = step_cost.torch.get_num_threads()
                    step_cost.torch.set_num_threads(1)
                    measured = step_cost.measure(names, self.args.opts, self.args.budget_rounds, 1)
                    step_cost.torch.set_num_threads(torch_threads)
                    rec["flops"] = {n: r["flops"]["total"] for n, r in measured.items()}
                    rec["cpu_s"] = {n: r["cpu_s"] for n, r in measured.items()}
                else:
                    with tempfile.TemporaryDirectory() as tmp:
                        rec["flops"] = {n: step_cost.count(step_cost.method_config(n, self.args.opts, tmp))["total"]
                                        for n in names}
                os.makedirs(self.out, exist_ok=True)
                with open(path, "w") as f:
                    json.dump(rec, f, indent=1)
            self._budget = rec
        return self._budget

    def budget(self, method: str) -> float:
        """SOLVER.BUDGET of ``method`` in the equal-compute block. ``flops``: --budget-steps steps of
        the reference's counted FLOPs, the same for every method. ``cpu``: the FLOPs of the
        iterations that cost the method the reference's CPU time (steps x t_ref / t_method),
        so that the engine's count gives those iterations."""
        rec = self.budget_record()
        ref = self.args.budget_reference
        if rec["unit"] == "flops":
            return float(rec["steps"]) * rec["flops"][ref]
        n = int(math.floor(rec["steps"] * rec["cpu_s"][ref] / rec["cpu_s"][method] + 1e-9))  # 119.99999... is 120
        return (max(1, n) + 0.5) * rec["flops"][method]  # half a step of slack: floor() gives n

    def resolve(self, opts: Sequence[str], tuned: Optional[Dict[str, float]] = None, method: str = "") -> List[str]:
        """A row's overrides with the catalogue's placeholders filled: the table's budget for
        ``method`` (a row name, its ``@`` tag ignored), and a tuned weight's value (``tuned``: key -> value)."""
        out = list(opts)
        for i in range(1, len(out), 2):
            if out[i] == BUDGET:
                out[i] = repr(self.budget(method.split("@")[0]))
            elif out[i] == TUNED_VALUE:
                if tuned is None or out[i - 1] not in tuned:
                    raise SystemExit(f"[table] {out[i - 1]}: no tuned value yet (the tuning protocol's pick)")
                out[i] = repr(tuned[out[i - 1]])
        return out

    # ------------------------------------------------ the tuning protocol
    def tune_folder(self, base: str, factor: float, seed: int) -> str:
        return os.path.join(self.tune, base, f"x{factor:g}", f"seed{seed}")

    def default_weights(self, base: Method) -> Dict[str, float]:
        """The authors' default of each weight the method's tuning scales (from its merged config)."""
        cfg = self.cfg(config_file(base), base.opts)
        out = {}
        for key in TUNE_KEYS[base.name]:
            node = cfg
            for part in key.split("."):
                node = node[part]
            out[key] = float(node)
        return out

    def pick_path(self, base: str) -> str:
        return os.path.join(self.tune, base, "pick.json")

    def write_pick(self, base: str) -> bool:
        """Write ``pick.json`` once every grid run of ``base`` finished; whether it exists."""
        path = self.pick_path(base)
        if os.path.isfile(path):
            return True
        scores = {}
        for f in TUNE_GRID:
            scores[f] = []
            for seed in self.args.tune_seeds:
                p = os.path.join(self.tune_folder(base, f, seed), "result.json")
                if not os.path.isfile(p):
                    return False
                with open(p) as fh:
                    scores[f].append(json.load(fh)["mIoU"])
        factor = pick_weight(scores)
        defaults = self.default_weights(METHODS[base])
        with open(path, "w") as fh:
            json.dump({"method": base, "grid": list(TUNE_GRID), "seeds": list(self.args.tune_seeds),
                       "held_out": {f"{f:g}": v for f, v in scores.items()}, "factor": factor, "defaults": defaults,
                       "weights": {k: v * factor for k, v in defaults.items()},
                       "split": f"trained on {TRAIN}_hs3_reduced, scored on {TRAIN}_hs3_analysis"}, fh, indent=1)
        return True

    def tuning_picks(self) -> Dict[str, dict]:
        """The picks of the tuned rows of the invocation (the summary's, when rebuilt from one)."""
        if self.summary is not None:
            return dict(self.summary.get("tuning", {}))
        out = dict(self.merged.get("tuning", {})) if self.merged is not None else {}
        for m in self.wanted():
            base = m.name.split("@")[0]
            if TUNED_VALUE in m.opts and os.path.isfile(self.pick_path(base)):
                with open(self.pick_path(base)) as f:
                    out[base] = json.load(f)
        return out

    def tuned_weights(self, base: str) -> Dict[str, float]:
        with open(self.pick_path(base)) as f:
            return json.load(f)["weights"]

    def tune_jobs(self, tuned: Sequence[Method]) -> List[Job]:
        """The grid runs of each tuned row's method (trained on the reduced split, scored on the
        analysis split), and a teacher trained on the reduced split for them."""
        jobs: List[Job] = []
        held_out = ["DATASETS.TRAIN", f'("{TRAIN}_hs3_reduced",)', "DATASETS.TEST", f'("{TRAIN}_hs3_analysis",)']
        bases = [METHODS[m.name.split("@")[0]] for m in tuned]
        if any("teacher" in b.needs for b in bases) and not os.path.isfile(os.path.join(self.tune_teacher, "result.json")):
            t = METHODS["teacher"]
            extra, needs = self.row_opts(config_file(t), t.opts)
            jobs.append(Job("tune/teacher", self.tune_teacher,
                            self.train_cmd(config_file(t), list(t.opts) + extra + held_out, self.tune_teacher, 0), needs,
                            t, 0, result=os.path.join(self.tune_teacher, "result.json")))
        for b in bases:
            if os.path.isfile(self.pick_path(b.name)):
                continue
            if "maskd_tokens" in b.needs and not os.path.isfile(self.maskd_tokens_path(tune=True)) \
                    and not any(j.key == "tune/maskd_tokens" for j in jobs):
                jobs.append(self.maskd_tokens_job(tune=True))
            defaults = self.default_weights(b)
            for f in TUNE_GRID:
                for seed in self.args.tune_seeds:
                    folder = self.tune_folder(b.name, f, seed)
                    if os.path.isfile(os.path.join(folder, "result.json")):
                        continue
                    extra, needs = self.row_opts(config_file(b), b.opts)
                    opts = list(b.opts) + extra + held_out + [x for k, v in defaults.items() for x in (k, repr(v * f))]
                    if "teacher" in b.needs:
                        opts += ["MODEL.DISTILL.TEACHER.WEIGHTS", os.path.join(self.tune_teacher, "model_final.pth")]
                        needs = needs + ["tune_teacher"]
                    if "maskd_tokens" in b.needs:  # learnt on the tuning protocol's teacher
                        opts += ["MODEL.DISTILL.MASKD.TOKENS_FILE", self.maskd_tokens_path(tune=True)]
                        needs = needs + ["tune_maskd_tokens"]
                    jobs.append(Job(f"tune/{b.name}/x{f:g}/seed{seed}", folder,
                                    self.train_cmd(config_file(b), opts, folder, seed), needs, b, seed,
                                    result=os.path.join(folder, "result.json")))
        return jobs

    # ------------------------------------------------ MasKD's first stage
    def maskd_tokens_path(self, tune: bool = False) -> str:
        """MasKD's tokens file, learnt on the rows' teacher (``tune``: the tuning protocol's)."""
        return os.path.join(self.tune if tune else self.out, "maskd_tokens", "tokens.pth")

    def maskd_tokens_job(self, tune: bool = False) -> Job:
        """``tools/maskd_tokens.py`` on the teacher the MasKD rows distil from, on the split that
        teacher trained on (``tune``: the tuning protocol's teacher and its reduced split), for
        ``MASKD_TOKENS_SHARE`` of the rows' iterations. It writes ``tokens.pth.tmp``, which
        :meth:`finish` renames: an interrupted job leaves no file that looks finished, and a
        finished one is not run again."""
        m = METHODS["maskd"]
        path = self.maskd_tokens_path(tune)
        iterations = max(1, round(MASKD_TOKENS_SHARE * self.cfg(config_file(m), m.opts).SOLVER.MAX_ITER))
        teacher = self.tune_teacher if tune else self.folder("teacher", 0)
        opts = list(m.opts) + ["SEED", "0", "MODEL.DISTILL.MASKD.TOKENS.ITERATIONS", str(iterations),
                               "MODEL.DISTILL.TEACHER.WEIGHTS", os.path.join(teacher, "model_final.pth"),
                               "MODEL.DISTILL.TEACHER.OPTS", '["MODEL.TIMM.CHECKPOINT", ""]']
        if tune:
            opts += ["DATASETS.TRAIN", f'("{TRAIN}_hs3_reduced",)']
        cmd = [sys.executable, os.path.join(ROOT, "tools", "maskd_tokens.py"), "--config-file",
               os.path.join(CONFIGS, config_file(m)), "--output", path + ".tmp"] + opts + list(self.args.opts)
        return Job("tune/maskd_tokens" if tune else "maskd_tokens", os.path.dirname(path), cmd,
                   ["tune_teacher" if tune else "teacher"])

    def needs_hs3(self, methods: Sequence[Method]) -> bool:
        return any(n in m.needs for m in methods for n in self.clusters)

    def jobs(self) -> List[Job]:
        jobs: List[Job] = []
        methods = self.wanted()
        rows: List[Job] = []
        if (self.needs_hs3(methods) or "phase1" in self.args.methods) and not all(os.path.isfile(p) for p in self.clusters.values()):
            reduced, analysis = f"{TRAIN}_hs3_reduced", f"{TRAIN}_hs3_analysis"
            opts = ["DATASETS.TRAIN", f'("{reduced}",)', "DATASETS.TEST", f'("{analysis}",)']
            extra, needs = self.row_opts("ds.yaml", opts)
            rows.append(Job("hs3_clusters", self.phase1, self.train_cmd("ds.yaml", opts + extra, self.phase1, 0), needs))
        tuned = [m for m in methods if TUNED_VALUE in m.opts]
        rows += self.tune_jobs(tuned)
        for m in methods:
            for seed in self.method_seeds(m):
                if os.path.isfile(self.result_path(m.name, seed)):
                    continue
                folder = self.folder(m.name, seed)
                extra, needs = self.row_opts(config_file(m), m.opts)
                opts = extra
                if "teacher" in m.needs:
                    opts += ["MODEL.DISTILL.TEACHER.WEIGHTS", self.teacher_weights]
                for n, path in self.clusters.items():
                    if n in m.needs:
                        opts += ["MODEL.EXITS.HS3.CLUSTERS_FILE", path]
                if "maskd_tokens" in m.needs:
                    opts += ["MODEL.DISTILL.MASKD.TOKENS_FILE", self.maskd_tokens_path()]
                    if not os.path.isfile(self.maskd_tokens_path()) and not any(j.key == "maskd_tokens" for j in rows):
                        rows.append(self.maskd_tokens_job())
                if m in tuned:  # its weights are the pick's: the command is built when the pick exists
                    base = m.name.split("@")[0]
                    prepare = (lambda m=m, base=base, opts=opts, folder=folder, seed=seed: self.train_cmd(
                        config_file(m), self.resolve(m.opts, self.tuned_weights(base)) + opts, folder, seed))
                    rows.append(Job(f"{m.name}/seed{seed}", folder, [sys.executable, f"(weights of {base}'s pick)"],
                                    list(m.needs) + needs + [f"pick:{base}"], m, seed, prepare=prepare))
                    continue
                rows.append(Job(f"{m.name}/seed{seed}", folder,
                                self.train_cmd(config_file(m), self.resolve(m.opts, method=m.name) + opts, folder, seed),
                                list(m.needs) + needs, m, seed))
        # pre-trainings the rows wait for, first; then the steps other rows wait for; then seed by seed
        for name in sorted({n.split(":", 1)[1] for j in rows for n in j.needs if n.startswith("pretrain:")}):
            if not os.path.isfile(pretrain_mod.weights_path(self.pretrain_out, name)):
                cmd = pretrain_mod.worker_cmd(name, self.pretrain_out, shlex.split(self.args.pretrain_opts))
                jobs.append(Job(f"pretrain:{name}", pretrain_mod.run_folder(self.pretrain_out, name), cmd, []))
        order = {m.name: i for i, m in enumerate(methods)}
        first = ("hs3_clusters", "teacher/seed0", "tune/teacher", "maskd_tokens", "tune/maskd_tokens")
        rows.sort(key=lambda j: (0 if j.key in first else 1,
                                 0 if j.key.startswith("tune/") else 1, j.seed,
                                 order.get(j.method.name, 0) if j.method else 0))
        return jobs + rows

    def ready(self, job: Job) -> bool:
        for need in job.needs:
            if need.startswith("pretrain:"):
                if not os.path.isfile(pretrain_mod.weights_path(self.pretrain_out, need.split(":", 1)[1])):
                    return False
            elif need == "teacher" and not os.path.isfile(self.result_path("teacher", 0)):
                return False
            elif need in self.clusters and not os.path.isfile(self.clusters[need]):
                return False
            elif need == "tune_teacher" and not os.path.isfile(os.path.join(self.tune_teacher, "result.json")):
                return False
            elif need == "maskd_tokens" and not os.path.isfile(self.maskd_tokens_path()):
                return False
            elif need == "tune_maskd_tokens" and not os.path.isfile(self.maskd_tokens_path(tune=True)):
                return False
            elif need.startswith("pick:") and not self.write_pick(need.split(":", 1)[1]):
                return False
        return True

    def run(self) -> None:
        pending = self.jobs()
        total = len(pending)
        if not total:
            say("every run of the requested rows is finished")
            return
        say(f"{total} jobs to run ({self.args.jobs} at once, {self.args.threads} thread(s) each) under {self.out}")
        if self.args.dry_run:
            for j in pending:
                say("would run: " + " ".join(j.cmd[1:]))
            return
        running: List[Job] = []
        done, durations, t0 = 0, [], time.time()
        while pending or running:
            for j in [j for j in pending if self.ready(j)][: max(0, self.args.jobs - len(running))]:
                if j.prepare is not None:
                    j.cmd = j.prepare()
                os.makedirs(j.folder, exist_ok=True)
                log = open(os.path.join(j.folder, "stdout.txt"), "a")
                j.proc = subprocess.Popen(j.cmd, cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT)
                j.started = time.time()
                pending.remove(j)
                running.append(j)
                say(f"start {j.key} (pid {j.proc.pid}, log: {j.folder}/log.txt)")
            if not running:
                blocked = ", ".join(j.key for j in pending)
                raise SystemExit(f"[table] runs wait for a step that did not finish: {blocked}")
            time.sleep(1.0)
            for j in [j for j in running if j.proc.poll() is not None]:
                running.remove(j)
                if j.proc.returncode != 0:
                    for other in running:
                        other.proc.terminate()
                    raise SystemExit(f"[table] {j.key} failed (exit {j.proc.returncode}); see {j.folder}/stdout.txt. "
                                     "Rerun the same command to resume after fixing it.")
                secs = time.time() - j.started
                summary = self.finish(j, secs)
                done += 1
                durations.append(secs)
                eta = statistics.mean(durations) * (len(pending) + len(running)) / max(1, self.args.jobs)
                say(f"done {j.key} in {secs / 60:.1f} min: {summary} [{done}/{total}, "
                    f"{(time.time() - t0) / 60:.1f} min so far, about {eta / 60:.0f} min left]")
                if j.method is not None and not self.args.dry_run:
                    self.write_table(quiet=True)  # the table fills as runs finish

    # ------------------------------------------------------- after a run
    def finish(self, job: Job, secs: float) -> str:
        if job.key.startswith("pretrain:"):
            name = job.key.split(":", 1)[1]
            with open(os.path.join(self.pretrain_out, f"{name}.json")) as f:
                held = json.load(f)["held_out"]
            return f"backbone exported (held-out mIoU {held.get('sem_seg/mIoU', float('nan')):.1f})"
        if job.key == "hs3_clusters":
            return self.analyse_phase1()
        if job.key in ("maskd_tokens", "tune/maskd_tokens"):
            path = self.maskd_tokens_path(tune=job.key.startswith("tune/"))
            os.replace(path + ".tmp", path)
            return f"MasKD tokens learnt on the teacher: {os.path.relpath(path, self.out)}"
        metrics = last_eval(os.path.join(job.folder, "metrics.json"))
        result = {
            "method": job.method.name, "seed": job.seed, "mIoU": metrics["sem_seg/mIoU"],
            "exits": exit_mious(metrics), "metrics": metrics, "seconds": secs,
            "sec_per_iter": train_time(os.path.join(job.folder, "metrics.json")),
            "command": " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in job.cmd[1:]),
        }
        if not self.args.keep_checkpoints:
            for f in os.listdir(job.folder):
                if f.startswith("model_") and f.endswith(".pth") and f != "model_final.pth":
                    os.remove(os.path.join(job.folder, f))
        path = job.result or self.result_path(job.method.name, job.seed)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)
        return f"mIoU {result['mIoU']:.1f}"

    def analyse_phase1(self) -> str:
        """Both HS3 analyses of the Phase-1 confusions: the paper's trade-off rule and the constant ratio."""
        sys.path.insert(0, os.path.join(ROOT, "projects"))
        from segdistill.hs3.report import run_hs3_analysis

        confusions = os.path.join(self.phase1, "inference", f"{TRAIN}_hs3_analysis")
        sizes = {}
        for need, method in (("hs3_clusters", self.args.hs3_method), ("hs3_manual", "manual")):
            out = os.path.dirname(self.clusters[need])
            if os.path.isdir(out):
                shutil.rmtree(out)  # a half-written analysis of an earlier, interrupted invocation
            run_hs3_analysis(confusions, out, method=method, ratio=self.args.hs3_ratio, exits=EXITS)
            with open(self.clusters[need]) as f:
                sizes[need] = {e: c["num_clusters"] for e, c in json.load(f)["exits"].items()}
        return f"clusters per exit: trade-off rule {sizes['hs3_clusters']}, manual {sizes['hs3_manual']}"

    # ------------------------------------------------------------ table
    def collect(self) -> Dict[str, List[dict]]:
        # the History rows are collected too (kept in summary.json, shown in no block)
        if self.summary is not None:
            out = {m.name: [r for r in self.summary["results"].get(m.name, []) if r["seed"] in self.method_seeds(m)]
                   for m in self.wanted()}
            return dict(out, **{n: rs for n, rs in self.summary["results"].items() if n in HISTORY_ROWS})
        results = {}
        for m in self.wanted() + [METHODS[n] for n in HISTORY_ROWS]:
            rows = []
            for seed in self.method_seeds(m):
                p = self.result_path(m.name, seed)
                if os.path.isfile(p):
                    with open(p) as f:
                        rows.append(json.load(f))
            if rows or m.name not in HISTORY_ROWS:
                results[m.name] = rows
        if self.merged is not None:
            results = merge_results(results, self.merged["results"], {m.name: self.method_seeds(m) for m in
                                    self.wanted() + [METHODS[n] for n in HISTORY_ROWS]})
        return results

    def phase1_metrics(self) -> dict:
        if self.summary is not None:
            return dict(self.summary.get("phase1", {}))
        path = os.path.join(self.phase1, "metrics.json")
        if not os.path.isfile(path) and self.merged is not None:
            return dict(self.merged.get("phase1", {}))
        return last_eval(path, required=False) if os.path.isfile(path) else {}

    def describe_pretraining(self) -> str:
        if self.summary is not None:
            info = self.summary.get("pretraining", {})
            return ", ".join(f"{b} from {n}" for b, n in self.pretrained.items() if n in info) or \
                "random initialisation (no pre-training)"
        if self.args.scratch:
            return "random initialisation (no pre-training)"
        info = self.pretraining_info()
        return ", ".join(f"{b} from {n}" for b, n in self.pretrained.items()
                         if os.path.isfile(pretrain_mod.weights_path(self.pretrain_out, n)) or n in info)

    def pretraining_info(self) -> dict:
        if self.summary is not None:
            return dict(self.summary.get("pretraining", {}))
        info = {}
        for name in sorted(set(self.pretrained.values())):  # one order, whatever the hash seed
            p = os.path.join(self.pretrain_out, f"{name}.json")
            if os.path.isfile(p) and not self.args.scratch:
                with open(p) as f:
                    info[name] = json.load(f)
        if self.merged is not None:
            info = merge_pretraining(info, self.merged.get("pretraining", {}))
        return info

    def write_table(self, quiet: bool = False) -> str:
        """Collect the finished runs, compute the premises and the verdict (table_stats) and write
        the table (table_report); returns its markdown."""
        results = self.collect()
        rows = {m.name for m in self.wanted()}
        checks = premises(rows, results, self.phase1_metrics(),
                          self.needs_hs3(self.wanted()) or "phase1" in self.args.methods, self.args.min_teacher_margin)
        inputs = TableInputs(
            out=self.out, seeds=self.seeds, blocks={b: BLOCKS[b] for b in self.blocks}, rows=rows, results=results,
            premises=checks, verdict=verdict(results, run_failures=run_failures(rows, results)), pretraining=self.describe_pretraining(),
            pretraining_info=self.pretraining_info(), phase1=self.phase1_metrics(), clusters=self.clusters,
            tuning=self.tuning_picks(),
        )
        text = write_table(inputs, self.args.publish)
        if not quiet:
            for c in checks:
                say(f"premise {'holds' if c['ok'] else 'FAILS'}: {c['name']}: {c['text']}")
        return text

def run_failures(rows, results: Dict[str, List[dict]]) -> Dict[str, List[int]]:
    """``{method: [seed, ...]}``: the runs whose final output is not above every exit."""
    return {m: sorted({f["seed"] for f in fs}) for m, fs in exit_premise_per_run(rows, results).items() if fs}


def cpu_record_from(path: str, names: Sequence[str], opts: Sequence[str]) -> dict:
    """``flops`` and ``cpu_s`` per method from a ``benchmarks/step_cost.py --json`` file measured
    on a quiet machine (the table's own measurement runs beside its trainings): one thread, the
    table's overrides, every method of the block."""
    if not os.path.isfile(path):
        raise SystemExit(f"[table] --budget-cpu-from {path}: no such file (write it with benchmarks/step_cost.py "
                         "--threads 1 --json PATH on a quiet machine)")
    with open(path) as f:
        doc = json.load(f)
    missing = [n for n in names if n not in doc.get("methods", {})]
    if doc.get("threads") != 1 or list(doc.get("opts", [])) != list(opts) or missing:
        raise SystemExit(f"[table] --budget-cpu-from {path}: measured with {doc.get('threads')} thread(s) and overrides "
                         f"{doc.get('opts', [])}; the table needs 1 thread, its overrides {list(opts)} and every method "
                         f"of the block (missing: {missing})")
    return {"flops": {n: doc["methods"][n]["flops"]["total"] for n in names},
            "cpu_s": {n: doc["methods"][n]["cpu_s"] for n in names}}


# Two runs of the same row and seed "agree" when their mIoU differ by less than this: the
# summary keeps 3 decimals, and runs on one machine with the same threads reproduce to the bit
MERGE_TOLERANCE = 0.001


def merge_pretraining(local: Dict[str, dict], published: Dict[str, dict]) -> Dict[str, dict]:
    """The pre-trainings of this machine and of a published summary. A pre-training on both must
    have the same held-out scores (the same backbone trained again); otherwise their runs are not
    comparable and merging them is refused."""
    out = dict(published)
    for name, info in local.items():
        if name in published:
            a, b = info.get("held_out", {}), published[name].get("held_out", {})
            bad = {k: (a[k], b[k]) for k in a if k in b and abs(a[k] - b[k]) > 1e-6}
            if bad:
                raise SystemExit(f"[table] --merge-summary: the pre-training {name!r} made here differs from the "
                                 f"published one (held-out {bad}, here vs published): its runs are not comparable; "
                                 "rerun every row here instead of merging")
        out[name] = info
    return out


def merge_results(local: Dict[str, List[dict]], published: Dict[str, List[dict]],
                  seeds: Dict[str, List[int]]) -> Dict[str, List[dict]]:
    """Each row's runs made here, completed with the published runs of the seeds not made here.
    Every run made here that the summary also has must agree with it (``MERGE_TOLERANCE``): the
    check that the published runs reproduce on this machine, without which the rows could not be
    paired across the two. Refused, with every disagreement listed, otherwise."""
    out: Dict[str, List[dict]] = {}
    bad = []
    for name in set(local) | set(seeds):
        mine = {r["seed"]: r for r in local.get(name, [])}
        theirs = {r["seed"]: r for r in published.get(name, []) if r["seed"] in seeds.get(name, [])}
        for seed in sorted(set(mine) & set(theirs)):
            if abs(mine[seed]["mIoU"] - theirs[seed]["mIoU"]) >= MERGE_TOLERANCE:
                bad.append(f"{name} seed {seed}: {mine[seed]['mIoU']:.3f} here, {theirs[seed]['mIoU']:.3f} published")
        rows = [mine.get(s, theirs.get(s)) for s in sorted(set(mine) | set(theirs))]
        if rows or name in local:
            out[name] = rows
    if bad:
        raise SystemExit("[table] --merge-summary: runs made here disagree with the published ones, so the two "
                         "cannot be paired (rerun every row here instead): " + "; ".join(bad))
    return out


def load_summary(path: str) -> dict:
    """A published summary.json (``--publish``), its runs in the form ``collect`` returns: what the
    table, premises and verdict are computed from when the runs' folders are not on this machine."""
    if not os.path.isfile(path):
        raise SystemExit(f"[table] {path}: no such summary file (the table's published summary.json, "
                         "e.g. docs/results/camvid/summary.json)")
    with open(path) as f:
        data = json.load(f)
    results = {}
    for m, rs in data["results"].items():
        results[m] = []
        for r in rs:
            metrics = {"sem_seg/mIoU": r["mIoU"], **{f"sem_seg/IoU-{c}": v for c, v in r.get("IoU", {}).items()}}
            results[m].append({"method": m, "seed": r["seed"], "mIoU": r["mIoU"], "exits": dict(r.get("exits", {})),
                               "metrics": metrics, "sec_per_iter": r.get("sec_per_iter")})
    return dict(data, results=results)


def last_eval(metrics_path: str, required: bool = True) -> dict:
    """The last evaluation in a detectron2 metrics.json (the one at the end of training)."""
    found = None
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                line = line.strip()
                if line and '"sem_seg/mIoU"' in line:
                    found = json.loads(line)
    if found is None:
        if not required:
            return {}
        raise SystemExit(f"[table] no evaluation in {metrics_path}: did the training reach TEST.EVAL_PERIOD?")
    return {k: v for k, v in found.items() if k.startswith("sem_seg")}


def train_time(metrics_path: str) -> Optional[float]:
    """Median seconds per training iteration logged in metrics.json (None when not logged)."""
    times = []
    with open(metrics_path) as f:
        for line in f:
            d = json.loads(line) if line.strip() else {}
            if isinstance(d.get("time"), (int, float)) and math.isfinite(d["time"]):
                times.append(d["time"])
    return statistics.median(times) if times else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", default="sr,hs3,distill", help="comma-separated: " + ", ".join(BLOCKS))
    p.add_argument("--methods", default="", help="comma-separated rows to run (default: every row of the blocks); "
                   "'phase1' runs the HS3 Phase 1 (the premise check on the analysis split) without HS3 rows")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per method (the teacher: seed 0 only)")
    p.add_argument("--jobs", type=int, default=2, help="trainings at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training")
    p.add_argument("--data-root", default="", help="CamVid folder (default: $SEGDISTILL_CAMVID_ROOT, "
                   "else $DETECTRON2_DATASETS/camvid)")
    p.add_argument("--output", default="output/camvid_table", help="folder of the runs and the table")
    p.add_argument("--pretrain-output", default=pretrain_mod.DEFAULT_OUTPUT,
                   help="folder of the pre-trained backbones (benchmarks/pretrain.py --output)")
    p.add_argument("--pretrained", default="", help="'none' (random initialisation), or BACKBONE=PRETRAINING,... "
                   f"to change {PRETRAINED}")
    p.add_argument("--pretrain-opts", default="", help="KEY VALUE overrides of the pre-trainings, one string")
    p.add_argument("--min-teacher-margin", type=float, default=3.0,
                   help="mIoU the teacher must be above the student alone's mean for the premise to hold")
    p.add_argument("--hs3-method", default="spectral", choices=("spectral", "kmeans", "manual"),
                   help="HS3 analysis of the 'hs3' row (the paper's trade-off rule: spectral)")
    p.add_argument("--hs3-ratio", type=float, default=0.5, help="classes kept per stage by the 'hs3_manual' row")
    p.add_argument("--budget-steps", type=float, default=300.0,
                   help="the equal-compute block's budget, in training steps of --budget-reference")
    p.add_argument("--budget-reference", default="student", help="the method whose step is the budget's unit")
    p.add_argument("--budget-unit", default="flops", choices=("flops", "cpu"),
                   help="equal counted training FLOPs, or equal single-thread CPU time (measured once here)")
    p.add_argument("--budget-rounds", type=int, default=5, help="timed steps per method for --budget-unit cpu")
    p.add_argument("--tune-seeds", type=int, default=2, help="seeds 0..N-1 per grid point of the tuning protocol")
    p.add_argument("--regime", default="", choices=("",) + tuple(REGIMES),
                   help="a named set of rows, overrides and output folder: " + ", ".join(REGIMES))
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the periodic checkpoints of finished runs")
    p.add_argument("--table-only", action="store_true", help="only rebuild table.md / table.png from finished runs")
    p.add_argument("--from-summary", default="", help="rebuild the table from a published summary.json instead of "
                   "the runs under --output (implies --table-only), e.g. docs/results/camvid/summary.json")
    p.add_argument("--budget-cpu-from", default="", help="with --budget-unit cpu: take each step's single-thread "
                   "CPU time from a benchmarks/step_cost.py --json file measured on a quiet machine (e.g. "
                   "docs/results/camvid/step_cost.json) instead of measuring beside the trainings")
    p.add_argument("--merge-summary", default="", help="complete the rows with the runs of a published "
                   "summary.json that were not made here (e.g. docs/results/camvid/summary.json), after checking "
                   "that its pre-trainings and every run made on both agree (the runs reproduce here)")
    p.add_argument("--publish", default="", help="also copy table.md, table.png, summary.json and the HS3 plots here")
    p.add_argument("--dry-run", action="store_true", help="list the jobs that would run")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every table training")
    args = p.parse_args(argv)
    if args.from_summary:
        args.table_only = True
        if args.merge_summary:
            p.error("--from-summary rebuilds from one summary alone; --merge-summary completes the runs made here")
    if args.budget_reference not in METHODS or args.budget_steps <= 0 or args.tune_seeds < 1:
        p.error(f"--budget-reference takes a method of {sorted(METHODS)} (got {args.budget_reference!r}), "
                "--budget-steps a positive number, --tune-seeds at least 1")
    args.tune_seeds = list(range(args.tune_seeds))
    if args.regime:
        r = REGIMES[args.regime]
        if args.output == p.get_default("output"):
            args.output = r["output"]
        args.blocks = ",".join(r["blocks"]) if args.blocks == p.get_default("blocks") else args.blocks
        args.methods = args.methods or ",".join(r["methods"])
        args.opts = list(r["opts"]) + (args.opts[1:] if args.opts[:1] == ["--"] else list(args.opts))
        if r.get("pretrained") and not args.pretrained:
            args.pretrained = ",".join(f"{b}={n}" for b, n in r["pretrained"].items())
    args.blocks = [b.strip() for b in args.blocks.split(",") if b.strip()]
    bad = [b for b in args.blocks if b not in BLOCKS]
    if bad or not args.blocks:
        p.error(f"unknown block(s) {bad}; choose from {list(BLOCKS)}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS and m != "phase1"]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    if args.seeds < 1 or args.jobs < 1 or args.threads < 1:
        p.error("--seeds, --jobs and --threads must be at least 1")
    args.scratch = args.pretrained.strip().lower() == "none"
    args.pretrained_map = {}
    if args.pretrained and not args.scratch:
        for item in args.pretrained.split(","):
            backbone, _, name = item.partition("=")
            if not name or name.strip() not in pretrain_mod.PRETRAINS:
                p.error(f"--pretrained takes BACKBONE=PRETRAINING pairs with a pre-training of "
                        f"{sorted(pretrain_mod.PRETRAINS)}, or 'none'; got {item!r}")
            args.pretrained_map[backbone.strip()] = name.strip()
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    if len(args.opts) % 2:
        p.error(f"overrides come as KEY VALUE pairs, got {args.opts}")
    root = args.data_root or os.environ.get("SEGDISTILL_CAMVID_ROOT") or os.path.join(
        os.environ.get("DETECTRON2_DATASETS", "datasets"), "camvid")
    if not args.table_only and not os.path.isdir(os.path.join(root, "train")):
        p.error(f"no CamVid at {os.path.abspath(root)} (expected train/ trainannot/ val/ valannot/); give --data-root "
                "or set SEGDISTILL_CAMVID_ROOT (datasets/README.md)")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    table = Table(args)
    os.makedirs(table.out, exist_ok=True)
    if not args.table_only:
        table.run()
    if args.dry_run:
        return ""
    text = table.write_table()
    print("\n" + text, flush=True)
    say(f"wrote {os.path.join(table.out, 'table.md')} and table.png")
    return text


if __name__ == "__main__":
    main()
