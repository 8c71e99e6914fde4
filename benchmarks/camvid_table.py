#!/usr/bin/env python
"""The CamVid evidence table (docs/results.md): every method against its baseline, several seeds.

    python benchmarks/camvid_table.py                         # all blocks, 3 seeds, 2 jobs at once
    python benchmarks/camvid_table.py --blocks sr --seeds 1   # one block, one seed
    python benchmarks/camvid_table.py --table-only            # rebuild table.md / table.png
    python benchmarks/camvid_table.py --data-root /data/camvid --output DIR [KEY VALUE ...]

Blocks (each row a run of ``train_net.py`` with a config of configs/camvid/table/):

* ``sr``: baseline, DS, MEA, MEA+SR-L, MEA+SR-F, SR (Self-Regulation, Table 1 ablation).
* ``hs3``: baseline, DS, HS3, HS3-Fuse (HS3, Tables 1 and 6). Its Phase 1 runs once first:
  DS on ``camvid_train_hs3_reduced``, confusions on ``camvid_train_hs3_analysis``, then the
  analysis (``--hs3-method``, default the paper's spectral clustering and trade-off rule)
  writes the clusters file every HS3 run uses.
* ``distill``: a teacher (trained once, seed 0, twice the schedule), the student alone, PD,
  CWD, FAKD-CWD, FAKD-PD, HWD and HWD + FAKD-PD (FAKD Tables 3-4, HWD Tables II-III), and the
  papers' comparison rows SKD, IFVD, CIRKD, MGD, DIST, FitNet and AT (each with its full
  objective, e.g. PD + SKD; docs/distillation.md).

A row's baseline is the block's first method (the distillation rows compare with the student
alone). Runs shared by blocks (baseline, DS) train once. Every finished run keeps its
``result.json`` under ``OUTPUT/runs/<method>/seed<k>/``, so an interrupted or partial
invocation resumes: finished runs are skipped and an interrupted training continues from its
last checkpoint (``--resume``). ``--jobs`` trainings run at once, each with
``--threads`` torch threads; their logs are the usual ``log.txt`` in the run folder. KEY VALUE
overrides apply to every training (the test runs the script with a handful of iterations).

Output: ``OUTPUT/table.md`` (mean and standard deviation of the final mIoU over seeds, the
difference to the block's baseline, exits' mean mIoU where the model has exits, seconds per
training iteration), ``OUTPUT/table.png`` (mIoU per method, one dot per seed) and
``OUTPUT/results.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "camvid", "table")
TRAIN, VAL = "camvid_train", "camvid_val"


def say(msg: str) -> None:
    print(f"[table] {msg}", flush=True)


@dataclass
class Method:
    """One row of the table: a config of configs/camvid/table/ and its overrides."""

    name: str
    label: str
    config: str
    opts: List[str] = field(default_factory=list)
    needs: List[str] = field(default_factory=list)  # "teacher" or "hs3_clusters"
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
]}
# block -> (title, methods; the first is the baseline of the others)
BLOCKS = {
    "sr": ("Self-Regulation (SR Table 1 ablation)", ["baseline", "ds", "mea", "mea_srl", "mea_srf", "sr"]),
    "hs3": ("HS3 (HS3 Tables 1 and 6)", ["baseline", "ds", "hs3", "hs3_fuse"]),
    "distill": ("Distillation (FAKD Tables 3-4, HWD Tables II-III)",
                ["student", "teacher", "pd", "cwd", "fakd_cwd", "fakd_pd", "hwd", "hwd_fakd_pd",
                 "skd", "ifvd", "cirkd", "mgd", "dist", "fitnet", "at"]),
}


@dataclass
class Job:
    """A training to run: a method at one seed, or the HS3 Phase 1."""

    key: str
    folder: str
    cmd: List[str]
    needs: List[str]
    method: Optional[Method] = None
    seed: int = 0
    proc: Optional[subprocess.Popen] = None
    started: float = 0.0


class Table:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.output)
        self.runs = os.path.join(self.out, "runs")
        self.clusters_dir = os.path.join(self.out, "hs3_clusters")
        self.clusters = os.path.join(self.clusters_dir, "hs3", "clusters.json")
        self.teacher_weights = os.path.join(self.runs, "teacher", "seed0", "model_final.pth")
        self.blocks = args.blocks
        self.seeds = list(range(args.seeds))

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
            names += [n for n in BLOCKS[b][1] if n not in names]
        return [METHODS[n] for n in names]

    def env(self) -> Dict[str, str]:
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "projects") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env["OMP_NUM_THREADS"] = str(self.args.threads)
        env["MKL_NUM_THREADS"] = str(self.args.threads)
        if self.args.data_root:
            env["SEGDISTILL_CAMVID_ROOT"] = os.path.abspath(self.args.data_root)
        return env

    def train_cmd(self, config: str, opts: Sequence[str], folder: str, seed: int) -> List[str]:
        cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", os.path.join(CONFIGS, config), "--resume"]
        return cmd + ["SEED", str(seed), "OUTPUT_DIR", folder] + list(opts) + list(self.args.opts)

    def jobs(self) -> List[Job]:
        jobs = []
        methods = self.wanted()
        if any("hs3_clusters" in m.needs for m in methods) and not os.path.isfile(self.clusters):
            folder = os.path.join(self.clusters_dir, "phase1")
            reduced, analysis = f"{TRAIN}_hs3_reduced", f"{TRAIN}_hs3_analysis"
            opts = ["DATASETS.TRAIN", f'("{reduced}",)', "DATASETS.TEST", f'("{analysis}",)']
            jobs.append(Job("hs3_clusters", folder, self.train_cmd("ds.yaml", opts, folder, 0), []))
        for m in methods:
            for seed in self.method_seeds(m):
                if os.path.isfile(self.result_path(m.name, seed)):
                    continue
                folder = self.folder(m.name, seed)
                opts = list(m.opts)
                if "teacher" in m.needs:
                    opts += ["MODEL.DISTILL.TEACHER.WEIGHTS", self.teacher_weights]
                if "hs3_clusters" in m.needs:
                    opts += ["MODEL.EXITS.HS3.CLUSTERS_FILE", self.clusters]
                jobs.append(Job(f"{m.name}/seed{seed}", folder, self.train_cmd(m.config, opts, folder, seed),
                                list(m.needs), m, seed))
        # what other runs wait for goes first
        jobs.sort(key=lambda j: 0 if j.key in ("hs3_clusters", "teacher/seed0") else 1)
        return jobs

    def ready(self, job: Job) -> bool:
        for need in job.needs:
            if need == "teacher" and not os.path.isfile(self.result_path("teacher", 0)):
                return False
            if need == "hs3_clusters" and not os.path.isfile(self.clusters):
                return False
        return True

    def run(self) -> None:
        pending = self.jobs()
        total = len(pending)
        if not total:
            say("every run of the requested blocks is finished")
            return
        say(f"{total} trainings to run ({self.args.jobs} at once, {self.args.threads} thread(s) each) under {self.out}")
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
                say(f"start {j.key} (log: {os.path.relpath(j.folder, os.getcwd())}/log.txt)")
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

    # ------------------------------------------------------- after a run
    def finish(self, job: Job, secs: float) -> str:
        if job.key == "hs3_clusters":
            return self.analyse_phase1(job.folder)
        metrics = last_eval(os.path.join(job.folder, "metrics.json"))
        result = {
            "method": job.method.name, "seed": job.seed, "mIoU": metrics["sem_seg/mIoU"],
            "exits": {k.split("/")[0][len("sem_seg_"):]: v for k, v in metrics.items()
                      if k.startswith("sem_seg_") and k.endswith("/mIoU") and not k.startswith("sem_seg_teacher")},
            "metrics": metrics, "seconds": secs, "sec_per_iter": train_time(os.path.join(job.folder, "metrics.json")),
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

    def analyse_phase1(self, folder: str) -> str:
        sys.path.insert(0, os.path.join(ROOT, "projects"))
        from segdistill.hs3.report import run_hs3_analysis

        confusions = os.path.join(folder, "inference", f"{TRAIN}_hs3_analysis")
        out = os.path.dirname(self.clusters)
        if os.path.isdir(out):
            shutil.rmtree(out)  # a half-written analysis of an earlier, interrupted invocation
        run_hs3_analysis(confusions, out, method=self.args.hs3_method, ratio=self.args.hs3_ratio,
                         exits=["res2", "res3", "res4"])
        with open(self.clusters) as f:
            clusters = json.load(f)
        sizes = {e: c["num_clusters"] for e, c in clusters["exits"].items()}
        return f"clusters per exit {sizes} ({os.path.relpath(self.clusters, os.getcwd())})"

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

    def write_table(self) -> str:
        results = self.collect()
        lines = [f"CamVid val (101 images), final mIoU % over seeds {self.seeds} "
                 f"(mean ± standard deviation; n = finished seeds). Output: {self.out}", ""]
        for b in self.blocks:
            title, names = BLOCKS[b]
            base = results.get(names[0], [])
            base_mean = statistics.mean(r["mIoU"] for r in base) if base else float("nan")
            lines += [f"### {title}", "",
                      f"| method | mIoU | Δ vs {METHODS[names[0]].label} | n | exits mIoU (res2 / res3 / res4) | s / iter (shared machine) |",
                      "|---|---|---|---|---|---|"]
            for n in names:
                rs = results.get(n, [])
                if not rs:
                    lines.append(f"| {METHODS[n].label} | (not run) | | 0 | | |")
                    continue
                vals = [r["mIoU"] for r in rs]
                mean = statistics.mean(vals)
                std = statistics.stdev(vals) if len(vals) > 1 else 0.0
                delta = "" if n == names[0] or n == "teacher" else f"{mean - base_mean:+.1f}"
                exits = ""
                if rs[0].get("exits"):
                    exits = " / ".join(f"{statistics.mean(r['exits'][e] for r in rs):.1f}" for e in sorted(rs[0]["exits"]))
                spi = statistics.mean(r["sec_per_iter"] for r in rs if r.get("sec_per_iter")) if any(
                    r.get("sec_per_iter") for r in rs) else float("nan")
                lines.append(f"| {METHODS[n].label} | {mean:.1f} ± {std:.1f} | {delta} | {len(vals)} | {exits} | {spi:.2f} |")
            lines.append("")
        if "hs3" in self.blocks and os.path.isfile(self.clusters):
            lines += [f"HS3 clusters: {describe_clusters(self.clusters)}", ""]
        text = "\n".join(lines)
        with open(os.path.join(self.out, "table.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump({"seeds": self.seeds, "blocks": {b: BLOCKS[b][1] for b in self.blocks}, "results": results}, f,
                      indent=1)
        self.plot(results)
        return text

    def plot(self, results: Dict[str, List[dict]]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(self.blocks), figsize=(4.2 * len(self.blocks), 4.0), squeeze=False)
        for ax, b in zip(axes[0], self.blocks):
            title, names = BLOCKS[b]
            names = [n for n in names if n != "teacher"]
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
            lo = min([r["mIoU"] for n in names for r in results.get(n, [])] or [0.0])
            ax.set_ylim(max(0.0, lo - 5), None)
        fig.tight_layout()
        fig.savefig(os.path.join(self.out, "table.png"), dpi=120)
        plt.close(fig)


def last_eval(metrics_path: str) -> dict:
    """The last evaluation in a detectron2 metrics.json (the one at the end of training)."""
    found = None
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                line = line.strip()
                if line and '"sem_seg/mIoU"' in line:
                    found = json.loads(line)
    if found is None:
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
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per method (the teacher: seed 0 only)")
    p.add_argument("--jobs", type=int, default=2, help="trainings at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training")
    p.add_argument("--data-root", default="", help="CamVid folder (default: $SEGDISTILL_CAMVID_ROOT, "
                   "else $DETECTRON2_DATASETS/camvid)")
    p.add_argument("--output", default="output/camvid_table", help="folder of the runs and the table")
    p.add_argument("--hs3-method", default="spectral", choices=("spectral", "manual"),
                   help="HS3 analysis: the paper's trade-off rule (spectral) or a constant ratio (manual)")
    p.add_argument("--hs3-ratio", type=float, default=0.5, help="classes kept per stage with --hs3-method manual")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the periodic checkpoints of finished runs")
    p.add_argument("--table-only", action="store_true", help="only rebuild table.md / table.png from finished runs")
    p.add_argument("--dry-run", action="store_true", help="list the trainings that would run")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every training")
    args = p.parse_args(argv)
    args.blocks = [b.strip() for b in args.blocks.split(",") if b.strip()]
    bad = [b for b in args.blocks if b not in BLOCKS]
    if bad or not args.blocks:
        p.error(f"unknown block(s) {bad}; choose from {list(BLOCKS)}")
    if args.seeds < 1 or args.jobs < 1 or args.threads < 1:
        p.error("--seeds, --jobs and --threads must be at least 1")
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
