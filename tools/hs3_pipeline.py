#!/usr/bin/env python
"""HS3 end to end (docs/hs3.md): Phase 1, the analysis, Phase 2 and the comparison, in one command.

    python tools/hs3_pipeline.py --config-file configs/demo/hs3/hs3_r18.yaml [--output DIR]
        [--phase1-weights DS_CHECKPOINT] [--num-gpus N] [KEY VALUE ...]

The config is the Phase-2 (``MODEL.EXITS.MODE hs3``) config; KEY VALUE overrides apply to
every training/evaluation. With T = DATASETS.TRAIN[0] and V = DATASETS.TEST[0]:

1. phase1/    deep supervision (MODE ds, EVAL_EXITS) trained on T_hs3_reduced (or
              --phase1-weights), evaluated on T_hs3_analysis: confusion_sem_seg*.npy
2. phase1/    the same model evaluated on V (the "ds" column of the table)
3. hs3/       run_hs3_analysis: clusters.json, tradeoff.png, report.md (MODEL.EXITS.HS3.*)
4. phase2/    MODE hs3 with hs3/clusters.json trained on T, evaluated on V
              (the config's OUTPUT_DIR name when it starts with "phase2", e.g. phase2_fuse/;
              else phase2/, or phase2_fuse/ when MODEL.EXITS.HS3.FUSE.ENABLED)
5. summary.md / summary.json: final and per-exit mIoU, ds vs hs3 (each exit in its own space)

DIR defaults to the folder two levels above MODEL.EXITS.HS3.CLUSTERS_FILE (the demo configs
point it at DIR/hs3/clusters.json), else OUTPUT_DIR. A step whose output exists is skipped
("[hs3] skip ..." lines), so an interrupted pipeline resumes; trainings run with --resume.
Trainings run ``train_net.py`` as subprocesses, so their logs and outputs are the usual ones.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))

from tabulate import tabulate  # noqa: E402

import segdistill  # noqa: E402,F401
from detectron2.config import get_cfg  # noqa: E402
from segdistill import add_segdistill_config  # noqa: E402
from segdistill.hs3.analysis import hs3_split_names  # noqa: E402
from segdistill.hs3.report import run_hs3_analysis  # noqa: E402


def say(msg):
    print(f"[hs3] {msg}", flush=True)


def tup(name):
    return f'("{name}",)'


class Pipeline:
    def __init__(self, args):
        self.args = args
        cfg = get_cfg()
        add_segdistill_config(cfg)
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(list(args.opts))
        if cfg.MODEL.EXITS.MODE != "hs3":
            raise SystemExit(f"{args.config_file}: MODEL.EXITS.MODE is {cfg.MODEL.EXITS.MODE!r}; give the Phase-2 "
                             "(MODE hs3) config, e.g. configs/demo/hs3/hs3_r18.yaml.")
        self.cfg = cfg
        cf = cfg.MODEL.EXITS.HS3.CLUSTERS_FILE
        self.out = os.path.abspath(args.output or (os.path.dirname(os.path.dirname(cf)) if cf else cfg.OUTPUT_DIR))
        self.train, self.test = cfg.DATASETS.TRAIN[0], cfg.DATASETS.TEST[0]
        self.reduced, self.analysis = hs3_split_names(self.train)
        self.exits = list(cfg.MODEL.EXITS.IN_FEATURES)
        self.phase1 = os.path.join(self.out, "phase1")
        self.hs3 = os.path.join(self.out, "hs3")
        self.clusters = os.path.join(self.hs3, "clusters.json")
        own = os.path.basename(os.path.normpath(cfg.OUTPUT_DIR))  # e.g. phase2_fuse_lighter in the configs
        default = "phase2_fuse" if cfg.MODEL.EXITS.HS3.FUSE.ENABLED else "phase2"
        self.phase2 = os.path.join(self.out, own if own.startswith("phase2") else default)

    def train_net(self, extra, eval_only=False):
        cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", os.path.abspath(self.args.config_file),
               "--num-gpus", str(self.args.num_gpus)]
        cmd += ["--eval-only"] if eval_only else ["--resume"]
        cmd += list(self.args.opts) + extra
        say("run: " + " ".join(cmd[1:]))
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "projects") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)

    def confusions(self, out_dir, dataset, exits=True):
        folder = os.path.join(out_dir, "inference", dataset)
        keys = ["sem_seg"] + ([f"sem_seg_{e}" for e in self.exits] if exits else [])
        return folder, [os.path.join(folder, f"confusion_{k}.json") for k in keys]

    def have(self, paths):
        return all(os.path.isfile(p) for p in paths)

    def phase1_opts(self, dataset):
        return ["MODEL.EXITS.MODE", "ds", "MODEL.EXITS.EVAL_EXITS", "True", "MODEL.EXITS.HS3.FUSE.ENABLED", "False",
                "DATASETS.TRAIN", tup(self.reduced), "DATASETS.TEST", tup(dataset), "OUTPUT_DIR", self.phase1]

    def run(self):
        t0 = time.time()
        weights1 = os.path.join(self.phase1, "model_final.pth")
        analysis_dir, analysis_files = self.confusions(self.phase1, self.analysis)
        # 1. Phase 1: deep supervision on the reduced set, evaluated on the analysis set
        if self.args.phase1_weights:
            weights1 = os.path.abspath(self.args.phase1_weights)
            say(f"1/5 phase 1: given DS checkpoint {weights1}")
        elif os.path.isfile(weights1):
            say(f"1/5 skip phase-1 training: {weights1} exists")
        else:
            say(f"1/5 phase 1: deep supervision on {self.reduced}, evaluated on {self.analysis}")
            self.train_net(self.phase1_opts(self.analysis))
        if self.have(analysis_files):
            say(f"1/5 skip phase-1 evaluation on {self.analysis}: confusion files exist in {analysis_dir}")
        else:
            self.train_net(self.phase1_opts(self.analysis) + ["MODEL.WEIGHTS", weights1], eval_only=True)
        # 2. the DS model on the test set (the table's "ds" column)
        test1_dir, test1_files = self.confusions(self.phase1, self.test)
        if self.have(test1_files):
            say(f"2/5 skip phase-1 test evaluation: confusion files exist in {test1_dir}")
        else:
            say(f"2/5 phase-1 model evaluated on {self.test}")
            self.train_net(self.phase1_opts(self.test) + ["MODEL.WEIGHTS", weights1], eval_only=True)
        # 3. analysis -> clusters file
        h = self.cfg.MODEL.EXITS.HS3
        if os.path.isfile(self.clusters) and not self.args.redo_analysis:
            say(f"3/5 skip analysis: {self.clusters} exists (--redo-analysis redoes it)")
        else:
            say(f"3/5 analysis of {analysis_dir} -> {self.hs3}")
            run_hs3_analysis(analysis_dir, self.hs3, method=h.METHOD, theta=None if h.THETA < 0 else h.THETA,
                             k_grid=h.K_GRID, seed=h.SEED, normalize=h.NORMALIZE, exits=self.exits,
                             ratio=h.MANUAL_RATIO)
        # 4. Phase 2: HS3 on the full training set
        weights2 = os.path.join(self.phase2, "model_final.pth")
        opts2 = ["MODEL.EXITS.HS3.CLUSTERS_FILE", self.clusters, "MODEL.EXITS.EVAL_EXITS", "True", "OUTPUT_DIR", self.phase2]
        test2_dir, test2_files = self.confusions(self.phase2, self.test)
        if os.path.isfile(weights2):
            say(f"4/5 skip phase-2 training: {weights2} exists")
        else:
            say(f"4/5 phase 2: hs3 on {self.train} with {self.clusters}")
            self.train_net(opts2)
        if self.have(test2_files):
            say(f"4/5 skip phase-2 evaluation on {self.test}: confusion files exist in {test2_dir}")
        else:
            self.train_net(opts2 + ["MODEL.WEIGHTS", weights2], eval_only=True)
        # 5. the table
        self.summary(test1_files, test2_files)
        say(f"done in {(time.time() - t0) / 60:.1f} min: {self.out}")

    def summary(self, ds_files, hs3_files):
        def read(path):
            with open(path) as f:
                d = json.load(f)
            return d["metrics"]["mIoU"], len(d["classes"])

        rows, data = [], []
        for label, a, b in zip(["final"] + [f"exit {e}" for e in self.exits], ds_files, hs3_files):
            (m1, k1), (m2, k2) = read(a), read(b)
            rows.append([label, f"{m1:.1f} ({k1})", f"{m2:.1f} ({k2})"])
            data.append({"output": label, "ds_mIoU": m1, "ds_classes": k1, "hs3_mIoU": m2, "hs3_classes": k2})
        table = tabulate(rows, headers=[f"{self.test} mIoU (classes)", "ds (phase 1)", "hs3 (phase 2)"])
        note = (f"ds: deep supervision trained on {self.reduced}; hs3: trained on {self.train} with "
                f"{self.clusters}. Each exit is scored in its own label space.")
        print("\n" + table + "\n" + note, flush=True)
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write(table + "\n\n" + note + "\n")
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump({"test_dataset": self.test, "rows": data, "phase1": self.phase1, "phase2": self.phase2,
                       "clusters": self.clusters}, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="the Phase-2 config (MODEL.EXITS.MODE hs3)")
    p.add_argument("--output", default="", help="pipeline folder (default: see above)")
    p.add_argument("--phase1-weights", default="", help="a trained DS checkpoint: skip Phase-1 training")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per training (train_net.py --num-gpus)")
    p.add_argument("--redo-analysis", action="store_true", help="rerun the analysis even if clusters.json exists")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every phase")
    args = p.parse_args(argv)
    Pipeline(args).run()


if __name__ == "__main__":
    main()
