#!/usr/bin/env python
"""The CamVid evidence table (docs/results.md): every method against its baseline, five seeds,
from backbones pre-trained here, with the papers' premises checked and a claim-by-claim verdict.

    python benchmarks/camvid_table.py                         # the whole chain, 5 seeds, 2 jobs at once
    python benchmarks/camvid_table.py --blocks sr --seeds 1   # one block, one seed
    python benchmarks/camvid_table.py --methods baseline,ds   # some rows only (a regime check)
    python benchmarks/camvid_table.py --table-only            # rebuild table.md / table.png / verdict
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
     SKD, IFVD, CIRKD, MGD, DIST, FitNet and AT (each with its full objective, e.g. PD + SKD;
     docs/distillation.md).

   A row's baseline is its block's first method (the distillation rows: the student alone).
   Runs shared by blocks (baseline, DS) train once.
3. **Premises** (printed, and written at the top of ``table.md``): the final output above every
   DS exit (the Phase-1 DS model on the analysis split, and the baseline against the DS runs'
   exits on val) and the teacher clearly above the student alone (``--min-teacher-margin``).
   If one fails or is not measured yet, the table is written but its reading (the verdict) is
   withheld, with the margins.
4. **Verdict**: for each claim of the papers (``CLAIMS``) the difference between two rows, paired
   by seed, its 95 % confidence interval (Student t over the seeds both rows finished), and
   reproduced (the interval is above 0) / not reproduced (below 0, or it excludes the paper's
   smallest reported gain) / inconclusive (it holds both 0 and the paper's gain).

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
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pretrain as pretrain_mod  # noqa: E402  (benchmarks/pretrain.py)

CONFIGS = os.path.join(ROOT, "configs", "camvid", "table")
TRAIN, VAL = "camvid_train", "camvid_val"
EXITS = ["res2", "res3", "res4"]

# backbone (MODEL.TIMM.NAME) -> the pre-training of benchmarks/pretrain.py every run starts from
PRETRAINED = {"resnet18": "resnet18_camvid", "mobilenetv2_100": "mobilenetv2_camvid", "resnet50": "resnet50_camvid"}


def say(msg: str) -> None:
    print(f"[table] {msg}", flush=True)


@dataclass
class Method:
    """One row of the table: a config of configs/camvid/table/ and its overrides."""

    name: str
    label: str
    config: str
    opts: List[str] = field(default_factory=list)
    needs: List[str] = field(default_factory=list)  # "teacher", "hs3_clusters" or "hs3_manual"
    seeds: Optional[Sequence[int]] = None  # None: every seed of the invocation


SR_OFF = ["MODEL.EXITS.SR.F_WEIGHT", "0.0", "MODEL.EXITS.SR.L_WEIGHT", "0.0"]
# CIRKD's memories at the table's scale (the authors' 20000 / 2000 entries per class are sized
# for 40k Cityscapes iterations, and would make every checkpoint ~200 MB here)
CIRKD_SMALL = ["MODEL.DISTILL.CIRKD.PIXEL_MEMORY_SIZE", "2000", "MODEL.DISTILL.CIRKD.REGION_MEMORY_SIZE", "200"]
METHODS = {m.name: m for m in [
    Method("baseline", "baseline", "baseline.yaml"),
    Method("ds", "DS", "ds.yaml"),
    Method("mea", "MEA", "sr.yaml", SR_OFF),
    Method("mea_srl", "MEA+SR-L", "sr.yaml", ["MODEL.EXITS.SR.F_WEIGHT", "0.0"]),
    Method("mea_srf", "MEA+SR-F", "sr.yaml", ["MODEL.EXITS.SR.L_WEIGHT", "0.0"]),
    Method("sr", "SR", "sr.yaml"),
    Method("hs3", "HS3", "hs3.yaml", needs=["hs3_clusters"]),
    Method("hs3_manual", "HS3 (manual ratio)", "hs3.yaml", needs=["hs3_manual"]),
    Method("hs3_fuse", "HS3-Fuse", "hs3_fuse.yaml", needs=["hs3_clusters"]),
    Method("teacher", "teacher (R18, ASPP 256)", "teacher.yaml", seeds=(0,)),
    Method("student", "student (MBV2) alone", "student.yaml"),
    Method("pd", "PD", "distill.yaml", ["MODEL.DISTILL.LOSSES", '["pd"]'], ["teacher"]),
    Method("cwd", "CWD", "distill.yaml", ["MODEL.DISTILL.LOSSES", '["cwd"]'], ["teacher"]),
    Method("fakd_cwd", "FAKD-CWD", "distill.yaml", ["MODEL.DISTILL.LOSSES", '["fakd_cwd"]'], ["teacher"]),
    Method("fakd_pd", "FAKD-PD", "distill.yaml", ["MODEL.DISTILL.LOSSES", '["fakd_pd"]'], ["teacher"]),
    Method("hwd", "HWD", "distill.yaml", ["MODEL.DISTILL.LOSSES", '["hwd"]'], ["teacher"]),
    Method("hwd_fakd_pd", "HWD + FAKD-PD", "distill.yaml", ["MODEL.DISTILL.LOSSES", '["hwd", "fakd_pd"]'],
           ["teacher"]),
    # the comparison rows of FAKD Tables 1-3 / HWD Tables II-III, each with its paper's full objective
    Method("skd", "SKD", "distill.yaml", ["MODEL.DISTILL.LOSSES", '["pd", "skd"]'], ["teacher"]),
    Method("ifvd", "IFVD", "distill.yaml", ["MODEL.DISTILL.LOSSES", '["pd", "ifvd"]'], ["teacher"]),
    Method("cirkd", "CIRKD", "distill.yaml", ["MODEL.DISTILL.LOSSES", '["pd", "cirkd"]'] + CIRKD_SMALL, ["teacher"]),
    Method("mgd", "MGD", "distill.yaml", ["MODEL.DISTILL.LOSSES", '["mgd", "cwd"]'], ["teacher"]),
    Method("dist", "DIST", "distill.yaml", ["MODEL.DISTILL.LOSSES", '["dist"]'], ["teacher"]),
    Method("fitnet", "FitNet", "distill.yaml", ["MODEL.DISTILL.LOSSES", '["pd", "fitnet"]'], ["teacher"]),
    Method("at", "AT", "distill.yaml", ["MODEL.DISTILL.LOSSES", '["pd", "at"]'], ["teacher"]),
    # AT's code-form loss scales as 1 / (H W) of the tapped map and CIRKD's weight 1e4 is tuned for
    # 64x128 maps (512x1024 crops at stride 8); here head_features are 6x8: 1e4 * 48 / 8192
    Method("at_scaled", "AT (weight x HW/8192)", "distill.yaml",
           ["MODEL.DISTILL.LOSSES", '["pd", "at"]', "MODEL.DISTILL.AT.WEIGHT", "58.6"], ["teacher"]),
]}
# block -> (title, methods; the first is the baseline of the others)
BLOCKS = {
    "sr": ("Self-Regulation (SR Table 1 ablation)", ["baseline", "ds", "mea", "mea_srl", "mea_srf", "sr"]),
    "hs3": ("HS3 (HS3 Tables 1, 2 and 6)", ["baseline", "ds", "hs3", "hs3_manual", "hs3_fuse"]),
    "distill": ("Distillation (FAKD Tables 3-4, HWD Tables II-III)",
                ["student", "teacher", "pd", "cwd", "fakd_cwd", "fakd_pd", "hwd", "hwd_fakd_pd",
                 "skd", "ifvd", "cirkd", "mgd", "dist", "fitnet", "at", "at_scaled"]),
}


@dataclass(frozen=True)
class Claim:
    """A paper's claim that row ``a`` beats row ``b``; ``gain``: the smallest gain the paper reports."""

    a: str
    b: str
    source: str
    gain: float


# The papers' numbers behind each gain: SR Table 1 (Cityscapes, OCRNet-HRNetV2-W48, the FSSS
# column); HS3 Table 1 (NYUD-v2: HRNetv2-w18-OCR 40.6 / DS 41.2 / HS3 41.7, w48 47.2 / 47.0 /
# 47.6), Table 6 (Cityscapes HRNetv2-w18: none 77.6, DS 77.7, manual 77.9, spectral 78.1),
# Table 2 (HS3-Fuse +1.2 over SA-Gates); FAKD Table 3 (Cityscapes, four students; "Ours" =
# FAKD-CWD) and Table 4 (ADE20K, PD -> PD-aug); HWD Tables II (ADE20K, three students) and III
# (Cityscapes, COCO-Stuff).
CLAIMS = [
    Claim("mea", "baseline", "SR Table 1, MEA vs baseline", 0.4),
    Claim("mea_srl", "mea", "SR Table 1, +SR-L vs MEA", 0.5),
    Claim("mea_srf", "mea", "SR Table 1, +SR-F vs MEA", 0.6),
    Claim("sr", "mea", "SR Table 1, SR vs MEA", 1.0),
    Claim("sr", "baseline", "SR Table 1, SR vs baseline", 1.4),
    Claim("hs3", "baseline", "HS3 Tables 1, 6, HS3 vs no auxiliary supervision", 0.4),
    Claim("hs3", "ds", "HS3 Tables 1, 6, HS3 vs DS", 0.4),
    Claim("hs3", "hs3_manual", "HS3 Table 6, trade-off rule (spectral) vs manual", 0.2),
    Claim("hs3_manual", "ds", "HS3 Table 6, manual vs DS", 0.2),
    Claim("hs3_fuse", "baseline", "HS3 Table 2, HS3-Fuse vs baseline", 1.2),
    Claim("cwd", "student", "FAKD Table 3, HWD Tables II-III, CWD vs student", 0.12),
    Claim("fakd_cwd", "student", "FAKD Table 3, FAKD vs student", 0.99),
    Claim("fakd_cwd", "cwd", "FAKD Table 3, FAKD vs CWD", 0.39),
    Claim("fakd_pd", "pd", "FAKD Table 4, PD-aug vs PD", 1.09),
    Claim("hwd", "student", "HWD Tables II-III, HWD vs student", 0.71),
    Claim("hwd", "cwd", "HWD Tables II-III, HWD vs CWD", 0.59),
    Claim("fakd_cwd", "skd", "FAKD Table 3, FAKD vs SKD", 1.18),
    Claim("fakd_cwd", "ifvd", "FAKD Table 3, FAKD vs IFVD", 0.6),
    Claim("fakd_cwd", "cirkd", "FAKD Table 3, FAKD vs CIRKD", 0.44),
    Claim("hwd", "skd", "HWD Tables II-III, HWD vs SKD", 0.82),
    Claim("hwd", "cirkd", "HWD Tables II-III, HWD vs CIRKD", 0.91),
    Claim("hwd", "mgd", "HWD Tables II-III, HWD vs MGD", 0.32),
]


def block_methods(block: str) -> List[str]:
    return list(BLOCKS[block][1])


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


def config_of(config: str, opts: Sequence[str]):
    """The merged YAML config of a row (to read its backbone and meta-architecture)."""
    sys.path.insert(0, os.path.join(ROOT, "projects"))
    from detectron2.config import get_cfg
    from segdistill import add_segdistill_config

    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, config))
    cfg.merge_from_list(list(opts))
    return cfg


class Table:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.output)
        self.runs = os.path.join(self.out, "runs")
        self.clusters_dir = os.path.join(self.out, "hs3_clusters")
        self.phase1 = os.path.join(self.clusters_dir, "phase1")
        self.clusters = {"hs3_clusters": os.path.join(self.clusters_dir, "hs3", "clusters.json"),
                         "hs3_manual": os.path.join(self.clusters_dir, "hs3_manual", "clusters.json")}
        self.teacher_weights = os.path.join(self.runs, "teacher", "seed0", "model_final.pth")
        self.blocks = args.blocks
        self.seeds = list(range(args.seeds))
        self.pretrain_out = os.path.abspath(args.pretrain_output)
        self.pretrained = dict(PRETRAINED)
        self.pretrained.update(args.pretrained_map)
        self._cfgs: Dict[Tuple[str, Tuple[str, ...]], object] = {}

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
        return [METHODS[n] for n in names]

    def cfg(self, config: str, opts: Sequence[str]):
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
        for m in methods:
            for seed in self.method_seeds(m):
                if os.path.isfile(self.result_path(m.name, seed)):
                    continue
                folder = self.folder(m.name, seed)
                extra, needs = self.row_opts(m.config, m.opts)
                opts = list(m.opts) + extra
                if "teacher" in m.needs:
                    opts += ["MODEL.DISTILL.TEACHER.WEIGHTS", self.teacher_weights]
                for n, path in self.clusters.items():
                    if n in m.needs:
                        opts += ["MODEL.EXITS.HS3.CLUSTERS_FILE", path]
                rows.append(Job(f"{m.name}/seed{seed}", folder, self.train_cmd(m.config, opts, folder, seed),
                                list(m.needs) + needs, m, seed))
        # pre-trainings the rows wait for, first; then the steps other rows wait for; then seed by seed
        for name in sorted({n.split(":", 1)[1] for j in rows for n in j.needs if n.startswith("pretrain:")}):
            if not os.path.isfile(pretrain_mod.weights_path(self.pretrain_out, name)):
                cmd = pretrain_mod.worker_cmd(name, self.pretrain_out, shlex.split(self.args.pretrain_opts))
                jobs.append(Job(f"pretrain:{name}", pretrain_mod.run_folder(self.pretrain_out, name), cmd, []))
        order = {m.name: i for i, m in enumerate(methods)}
        rows.sort(key=lambda j: (0 if j.key in ("hs3_clusters", "teacher/seed0") else 1, j.seed,
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
        with open(self.result_path(job.method.name, job.seed) + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(self.result_path(job.method.name, job.seed) + ".tmp", self.result_path(job.method.name, job.seed))
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
        results = {}
        for m in self.wanted():
            rows = []
            for seed in self.method_seeds(m):
                p = self.result_path(m.name, seed)
                if os.path.isfile(p):
                    with open(p) as f:
                        rows.append(json.load(f))
            results[m.name] = rows
        return results

    def phase1_metrics(self) -> dict:
        path = os.path.join(self.phase1, "metrics.json")
        return last_eval(path, required=False) if os.path.isfile(path) else {}

    def premises(self, results: Dict[str, List[dict]]) -> List[dict]:
        """The papers' premises in this regime, with their margins (module doc, step 3)."""
        checks = []
        names = {m.name for m in self.wanted()}
        if names & {"ds", "mea", "sr", "hs3", "hs3_fuse", "hs3_manual", "mea_srl", "mea_srf"}:
            p1 = self.phase1_metrics()
            exits = exit_mious(p1)
            if "sem_seg/mIoU" in p1 and exits:
                margins = {e: p1["sem_seg/mIoU"] - v for e, v in exits.items()}
                checks.append(dict(
                    name="final above every DS exit (Phase-1 DS model, analysis split)", ok=min(margins.values()) > 0,
                    text=f"final {p1['sem_seg/mIoU']:.1f}; exits " + ", ".join(f"{e} {v:.1f}" for e, v in exits.items())
                    + "; margins " + ", ".join(f"{e} {m:+.1f}" for e, m in margins.items())))
            elif self.needs_hs3(self.wanted()) or "phase1" in self.args.methods:
                checks.append(dict(name="final above every DS exit (Phase-1 DS model, analysis split)", ok=False,
                                   text="not measured yet (the HS3 Phase 1 has not finished)"))
            base, ds = results.get("baseline", []), results.get("ds", [])
            if base and ds:
                b = statistics.mean(r["mIoU"] for r in base)
                dsf = statistics.mean(r["mIoU"] for r in ds)
                ex = {e: statistics.mean(r["exits"][e] for r in ds) for e in sorted(ds[0]["exits"])}
                margins = {e: b - v for e, v in ex.items()}
                checks.append(dict(
                    name="baseline's final above every DS exit (val)", ok=bool(margins) and min(margins.values()) > 0,
                    text=f"baseline {b:.1f} (n={len(base)}), DS final {dsf:.1f}; DS exits "
                    + ", ".join(f"{e} {v:.1f}" for e, v in ex.items()) + " (n=" + str(len(ds)) + "); margins "
                    + ", ".join(f"{e} {m:+.1f}" for e, m in margins.items())))
            else:
                checks.append(dict(name="baseline's final above every DS exit (val)", ok=False,
                                   text="not measured yet (baseline and DS runs needed)"))
        if "teacher" in names or "student" in names:
            t, s = results.get("teacher", []), results.get("student", [])
            if t and s:
                tv = t[0]["mIoU"]
                sv = [r["mIoU"] for r in s]
                margin = tv - statistics.mean(sv)
                ok = margin >= self.args.min_teacher_margin and tv > max(sv)
                checks.append(dict(
                    name=f"teacher clearly above the student (>= {self.args.min_teacher_margin:g} mIoU, above every seed)",
                    ok=ok, text=f"teacher {tv:.1f}; student alone {statistics.mean(sv):.1f} (best seed {max(sv):.1f}, "
                    f"n={len(sv)}); margin {margin:+.1f}"))
            else:
                checks.append(dict(name="teacher clearly above the student", ok=False,
                                   text="not measured yet (teacher and student runs needed)"))
        return checks

    def hs3_choice(self) -> List[str]:
        """The paper's rule in numbers: the reference, and each exit's chosen K (and why K = N)."""
        path = self.clusters["hs3_clusters"]
        if not os.path.isfile(path):
            return []
        with open(path) as f:
            data = json.load(f)
        ref = data.get("info", {}).get("reference", {})
        n, m = ref.get("num_classes"), ref.get("mIoU")
        lines = [f"HS3 Phase 1 (analysis split): final output mIoU {m:.1f} over N = {n} classes, so the paper's rule "
                 f"keeps the largest K with mIoU_exit(K) / K >= {m:.1f} / {n} = {m / n:.2f} per class."]
        for e, info in data["exits"].items():
            k = info["num_clusters"]
            mi = info.get("analysis_mIoU", float("nan"))  # the clusters file's per-exit record
            why = " (= N: this exit's full-class mIoU already meets the final output's per-class rate)" if k == n else ""
            lines.append(f"- {e}: K = {k}, mIoU {mi:.1f} in its {k}-cluster space ({mi / k:.2f} per class){why}")
        return lines

    def write_table(self, quiet: bool = False) -> str:
        results = self.collect()
        lines = [f"CamVid val (101 images), final mIoU % of the deployed model over seeds {self.seeds} "
                 f"(mean ± standard deviation; n = finished seeds). Δ: against the block's baseline, paired by "
                 f"seed, with its 95 % confidence interval (Student t, n - 1 degrees of freedom). "
                 f"Backbones: {self.describe_pretraining()}. Output: {self.out}", ""]
        checks = self.premises(results)
        lines += ["### Premises", ""]
        for c in checks:
            lines.append(f"- {'holds' if c['ok'] else 'FAILS'}: {c['name']}: {c['text']}")
        lines.append("")
        for b in self.blocks:
            title, _ = BLOCKS[b]
            names = [n for n in block_methods(b) if n in {m.name for m in self.wanted()}]
            if not names:
                continue
            base = results.get(names[0], [])
            lines += [f"### {title}", "",
                      f"| method | mIoU | n | Δ vs {METHODS[names[0]].label} [95 % CI] | exits mIoU (res2 / res3 / res4) "
                      "| s / iter (shared machine) |",
                      "|---|---|---|---|---|---|"]
            for n in names:
                rs = results.get(n, [])
                if not rs:
                    lines.append(f"| {METHODS[n].label} | (not run) | 0 | | | |")
                    continue
                vals = [r["mIoU"] for r in rs]
                mean = statistics.mean(vals)
                std = statistics.stdev(vals) if len(vals) > 1 else 0.0
                delta = ""
                if n != names[0] and n != "teacher" and base:
                    d = paired(base, rs)
                    if d["n"] >= 2:
                        delta = f"{d['mean']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}] (n={d['n']})"
                    elif d["n"] == 1:
                        delta = f"{d['mean']:+.1f} (n=1)"
                exits = ""
                if rs[0].get("exits"):
                    exits = " / ".join(f"{statistics.mean(r['exits'][e] for r in rs):.1f}" for e in sorted(rs[0]["exits"]))
                spi = [r["sec_per_iter"] for r in rs if r.get("sec_per_iter")]
                spi_s = f"{statistics.mean(spi):.2f}" if spi else ""
                lines.append(f"| {METHODS[n].label} | {mean:.1f} ± {std:.1f} | {len(vals)} | {delta} | {exits} | {spi_s} |")
            lines.append("")
        if "hs3" in self.blocks:
            choice = self.hs3_choice()
            if choice:
                lines += choice + [""]
            for need, label in (("hs3_clusters", "trade-off rule"), ("hs3_manual", "manual ratio")):
                if os.path.isfile(self.clusters[need]):
                    lines += [f"HS3 clusters ({label}): {describe_clusters(self.clusters[need])}", ""]
        lines += self.per_class_lines(results)
        verdict = self.verdict(results)
        lines += ["### Verdict (claims of the papers, paired by seed)", ""]
        if all(c["ok"] for c in checks):
            lines += ["| claim | Δ [95 % CI] (n) | paper's smallest gain | verdict |", "|---|---|---|---|"]
            lines += [f"| {v['source']}: {METHODS[v['a']].label} > {METHODS[v['b']].label} | {v['delta']} | "
                      f"+{v['gain']:.2f} | {v['verdict']} |" for v in verdict]
        else:
            failed = "; ".join(f"{c['name']}: {c['text']}" for c in checks if not c["ok"])
            lines += [f"Reading withheld: a premise of the papers does not hold (or is not measured yet) in this "
                      f"regime, so the differences above cannot test the papers' claims. {failed}"]
        lines.append("")
        text = "\n".join(lines)
        with open(os.path.join(self.out, "table.md"), "w") as f:
            f.write(text + "\n")
        summary = {m: [{"seed": r["seed"], "mIoU": round(r["mIoU"], 3),
                        "IoU": {k[len("sem_seg/IoU-"):]: round(v, 2) for k, v in r.get("metrics", {}).items()
                                if k.startswith("sem_seg/IoU-")},
                        "exits": {e: round(v, 3) for e, v in r.get("exits", {}).items()},
                        "sec_per_iter": r.get("sec_per_iter")} for r in rs] for m, rs in results.items()}
        common = {"seeds": self.seeds, "blocks": {b: block_methods(b) for b in self.blocks},
                  "pretraining": self.pretraining_info(), "premises": checks, "verdict": verdict,
                  "phase1": self.phase1_metrics()}
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(dict(common, results=results), f, indent=1)
        p1 = common["phase1"]
        common["phase1"] = {k: v for k, v in p1.items() if k.endswith("/mIoU")}
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump(dict(common, results=summary), f, indent=1)
        self.plot(results)
        if self.args.publish:
            self.publish(self.args.publish)
        if not quiet:
            for c in checks:
                say(f"premise {'holds' if c['ok'] else 'FAILS'}: {c['name']}: {c['text']}")
        return text

    def per_class_lines(self, results: Dict[str, List[dict]]) -> List[str]:
        """Per-class IoU of every row (mean over its seeds), the classes no run predicts, and the
        class whose IoU moves most between the seeds of one row: where the mIoU's variance lives."""
        rows = [(n, rs) for n, rs in results.items() if rs and all(r.get("metrics") for r in rs)]
        classes = per_class_names({k: 0 for _, rs in rows for r in rs for k in r["metrics"]})
        if not classes:
            return []
        lines = ["### Per class (IoU %, mean over the row's seeds)", "",
                 "| method | n | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
        spread = []  # (range over seeds, class, method, low, high)
        for n, rs in rows:
            ious = [[r["metrics"].get(f"sem_seg/IoU-{c}", float("nan")) for c in classes] for r in rs]
            means = [statistics.mean(col) for col in zip(*ious)]
            lines.append(f"| {METHODS[n].label} | {len(rs)} | " + " | ".join(f"{v:.1f}" for v in means) + " |")
            if len(rs) > 1:
                for c, col in zip(classes, zip(*ious)):
                    spread.append((max(col) - min(col), c, n, min(col), max(col)))
        never = [c for i, c in enumerate(classes)
                 if all(r["metrics"].get(f"sem_seg/IoU-{c}", 0.0) < 1.0 for _, rs in rows for r in rs)]
        lines.append("")
        if never:
            lines.append(f"Below 1 IoU in every run: {', '.join(never)} ({len(never)} of {len(classes)} classes).")
        if spread:
            per_class = {}
            for rng, c, n, lo, hi in spread:
                per_class.setdefault(c, []).append(rng)
            top = max(spread)
            lines.append(f"Largest seed-to-seed range within one row: {top[1]} in {METHODS[top[2]].label} "
                         f"({top[3]:.1f} to {top[4]:.1f} IoU); median range per class over the rows: "
                         + ", ".join(f"{c} {statistics.median(v):.1f}" for c, v in per_class.items()) + ".")
        return lines + [""]

    def verdict(self, results: Dict[str, List[dict]]) -> List[dict]:
        out = []
        for c in CLAIMS:
            if c.a not in METHODS or c.b not in METHODS:
                continue
            a, b = results.get(c.a), results.get(c.b)
            if a is None or b is None:
                continue  # rows not in this invocation
            d = paired(b, a)
            if d["n"] < 2:
                v, delta = "pending (fewer than 2 paired seeds)", f"n={d['n']}"
            else:
                delta = f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] (n={d['n']})"
                if d["lo"] > 0:
                    v = "reproduced"
                elif d["hi"] < 0:
                    v = "not reproduced (significantly the other way)"
                elif d["hi"] < c.gain:
                    v = "not reproduced (the CI excludes the paper's gain)"
                else:
                    v = "inconclusive"
            out.append(dict(a=c.a, b=c.b, source=c.source, gain=c.gain, delta=delta, verdict=v,
                            **{k: d.get(k) for k in ("mean", "lo", "hi", "n")}))
        return out

    def describe_pretraining(self) -> str:
        if self.args.scratch:
            return "random initialisation (no pre-training)"
        return ", ".join(f"{b} from {n}" for b, n in self.pretrained.items()
                         if os.path.isfile(pretrain_mod.weights_path(self.pretrain_out, n)))

    def pretraining_info(self) -> dict:
        info = {}
        for name in set(self.pretrained.values()):
            p = os.path.join(self.pretrain_out, f"{name}.json")
            if os.path.isfile(p) and not self.args.scratch:
                with open(p) as f:
                    info[name] = json.load(f)
        return info

    def publish(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        for f in ("table.md", "table.png", "summary.json"):
            shutil.copyfile(os.path.join(self.out, f), os.path.join(folder, f))
        for need, prefix in (("hs3_clusters", "hs3"), ("hs3_manual", "hs3_manual")):
            d = os.path.dirname(self.clusters[need])
            for f in ("tradeoff.png", "report.md", "clusters.json"):
                if os.path.isfile(os.path.join(d, f)):
                    shutil.copyfile(os.path.join(d, f), os.path.join(folder, f"{prefix}_{f}"))

    def plot(self, results: Dict[str, List[dict]]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(self.blocks), figsize=(4.4 * len(self.blocks), 4.0), squeeze=False)
        for ax, b in zip(axes[0], self.blocks):
            title, _ = BLOCKS[b]
            names = [n for n in block_methods(b) if n != "teacher"]
            for i, n in enumerate(names):
                vals = [r["mIoU"] for r in results.get(n, [])]
                if not vals:
                    continue
                ax.bar(i, statistics.mean(vals), color="tab:gray" if i == 0 else "tab:blue", alpha=0.6)
                ax.scatter([i] * len(vals), vals, color="black", s=12, zorder=3)
            base = results.get(names[0], [])
            if base:
                ax.axhline(statistics.mean(r["mIoU"] for r in base), color="tab:gray", ls="--", lw=1)
            teacher = results.get("teacher", []) if b == "distill" else []
            if teacher:
                ax.axhline(teacher[0]["mIoU"], color="tab:red", ls=":", lw=1, label="teacher")
                ax.legend(loc="lower right", fontsize=8)
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels([METHODS[n].label.split(" (")[0] for n in names], rotation=45, ha="right", fontsize=8)
            ax.set_title(title.split(" (")[0], fontsize=10)
            ax.set_ylabel("CamVid val mIoU %")
            vals = [r["mIoU"] for n in names for r in results.get(n, [])]
            if vals:
                ax.set_ylim(max(0.0, min(vals) - 5), max(vals) + 3)
        fig.tight_layout()
        fig.savefig(os.path.join(self.out, "table.png"), dpi=120)
        plt.close(fig)


def paired(base: List[dict], rows: List[dict]) -> dict:
    """Mean of rows - base over the seeds both finished, with its 95 % CI (Student t)."""
    b = {r["seed"]: r["mIoU"] for r in base}
    d = [r["mIoU"] - b[r["seed"]] for r in rows if r["seed"] in b]
    if not d:
        return {"n": 0}
    mean = statistics.mean(d)
    if len(d) < 2:
        return {"n": 1, "mean": mean}
    from scipy.stats import t

    half = t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return {"n": len(d), "mean": mean, "lo": mean - half, "hi": mean + half}


def per_class_names(metrics: dict) -> List[str]:
    """The class names of a final-output evaluation, in CamVid's class order."""
    from segdistill.data.datasets.camvid import CAMVID_CLASSES

    names = {k[len("sem_seg/IoU-"):] for k in metrics if k.startswith("sem_seg/IoU-")}
    return [c for c in CAMVID_CLASSES if c in names] + sorted(names - set(CAMVID_CLASSES))


def exit_mious(metrics: dict) -> Dict[str, float]:
    return {k.split("/")[0][len("sem_seg_"):]: v for k, v in metrics.items()
            if k.startswith("sem_seg_") and k.endswith("/mIoU") and not k.startswith("sem_seg_teacher")}


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


def describe_clusters(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    parts = []
    for exit_name, info in data["exits"].items():
        groups = " ".join("{" + ", ".join(g) + "}" for g in info["clusters"])
        parts.append(f"{exit_name} (K = {info['num_clusters']}): {groups}")
    return "; ".join(parts)


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
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the periodic checkpoints of finished runs")
    p.add_argument("--table-only", action="store_true", help="only rebuild table.md / table.png from finished runs")
    p.add_argument("--publish", default="", help="also copy table.md, table.png, summary.json and the HS3 plots here")
    p.add_argument("--dry-run", action="store_true", help="list the jobs that would run")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every table training")
    args = p.parse_args(argv)
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
