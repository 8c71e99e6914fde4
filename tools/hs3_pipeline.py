#!/usr/bin/env python
"""HS3 end to end (docs/hs3.md): Phase 1, the analysis, Phase 2 and the comparison, in one command.

    python tools/hs3_pipeline.py --config-file configs/demo/hs3/hs3_r18.yaml [--output DIR]
        [--phase1-weights DS_CHECKPOINT] [--num-gpus N] [--redo-analysis] [--adopt-existing] [KEY VALUE ...]

The config is the Phase-2 (``MODEL.EXITS.MODE hs3``) config; KEY VALUE overrides apply to
every training/evaluation (``HS3_ANALYSIS.*`` ones to the analysis). With
T = DATASETS.TRAIN[0] and V = DATASETS.TEST[0]:

1. phase1/    deep supervision (MODE ds, EVAL_EXITS) trained on T_hs3_reduced (or
              --phase1-weights), evaluated on T_hs3_analysis: confusion_sem_seg*.npy
2. phase1/    the same model evaluated on V (the "ds" column of the table)
3. hs3/       run_hs3_analysis: clusters.json, tradeoff.png, report.md (HS3_ANALYSIS.*)
4. phase2/    MODE hs3 with hs3/clusters.json trained on T, evaluated on V
              (the config's OUTPUT_DIR name when it starts with "phase2", e.g. phase2_fuse/;
              else phase2/, or phase2_fuse/ when MODEL.EXITS.HS3.FUSE.ENABLED)
5. summary.md / summary.json: final and per-exit mIoU, ds vs hs3 (each exit in its own space),
              and the clusters file (path and clusters fingerprint) Phase 2 was trained with

DIR defaults to the folder two levels above MODEL.EXITS.HS3.CLUSTERS_FILE (the demo configs
point it at DIR/hs3/clusters.json), else OUTPUT_DIR. Trainings run ``train_net.py`` as
subprocesses, so their logs and outputs are the usual ones.

Every step records the inputs it was built from in DIR/pipeline_state.json (the SHA-256 of
the training config, the fingerprint of the clusters (class names and assignments, see
``clusters_fingerprint``), the checkpoint an evaluation read, the confusion files the
analysis read). A step whose outputs exist with the same inputs is skipped
("[hs3] skip ..."), so an interrupted pipeline resumes (trainings run with --resume). A step
whose inputs changed is rerun: a training's old folder is moved aside to ``<folder>.stale-N``
(nothing is deleted), so e.g. ``--redo-analysis`` that writes different clusters retrains
Phase 2. A step whose outputs exist without a record (made by an older pipeline, or by hand)
is refused, naming the folder: move it away, or pass ``--adopt-existing`` to record the
current inputs for it.
"""
import hashlib
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
from segdistill.config import config_tool_parser, load_yaml_config  # noqa: E402
from segdistill.hs3 import hs3_split_names  # noqa: E402
from segdistill.hs3.report import k_equals_n_warning, run_hs3_analysis  # noqa: E402
from segdistill.modeling.exits.hs3_clusters import clusters_fingerprint, file_sha256, load_clusters  # noqa: E402

STATE_FILE = "pipeline_state.json"
# HS3_ANALYSIS keys that only the analysis reads (the split keys change Phase 1's data).
ANALYSIS_ONLY_KEYS = ("METHOD", "THETA", "K_GRID", "CLUSTER_SEED", "NORMALIZE", "MANUAL_RATIO")


def say(msg):
    print(f"[hs3] {msg}", flush=True)


def tup(name):
    return f'("{name}",)'


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class Pipeline:
    def __init__(self, args):
        self.args = args
        cfg = self.load_cfg([])
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
        self.state_path = os.path.join(self.out, STATE_FILE)
        self.state = {}
        if os.path.isfile(self.state_path):
            with open(self.state_path) as f:
                self.state = json.load(f)

    # ---------------------------------------------------------------- configs and records
    def load_cfg(self, extra):
        return load_yaml_config(self.args.config_file, list(self.args.opts) + list(extra))

    def training_config(self, extra) -> str:
        """The config a training step runs with, as text, without what does not change its
        outcome (output folder, test sets, the analysis-only keys)."""
        cfg = self.load_cfg(extra)
        cfg.OUTPUT_DIR = ""
        cfg.DATASETS.TEST = ()
        for k in ANALYSIS_ONLY_KEYS:
            cfg.HS3_ANALYSIS[k] = get_cfg_default(k)
        return cfg.dump()

    def save_state(self):
        os.makedirs(self.out, exist_ok=True)
        tmp = f"{self.state_path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1, sort_keys=True)
        os.replace(tmp, self.state_path)

    def record(self, step, inputs):
        self.state[step] = {"inputs": inputs, "fingerprint": fingerprint(inputs),
                            "recorded": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.save_state()

    def check(self, step, inputs, outputs_exist, folder, what):
        """"skip" (outputs made from these inputs), "run" (no outputs), or "rerun" (inputs
        changed: ``folder`` moved aside first). Outputs without a record are refused."""
        if not outputs_exist:
            return "run"
        rec = self.state.get(step)
        if rec is None:
            if self.args.adopt_existing:
                say(f"adopt {what} in {folder}: recording the current inputs for it (--adopt-existing)")
                self.record(step, inputs)
                return "skip"
            raise SystemExit(
                f"[hs3] {folder} holds {what} but {self.state_path} has no record of the inputs it was built from "
                "(made by an older pipeline or by hand). Move the folder away to redo it, or rerun with "
                "--adopt-existing to trust it as built from the current inputs."
            )
        if rec["fingerprint"] == fingerprint(inputs):
            return "skip"
        changed = sorted(k for k in set(inputs) | set(rec["inputs"]) if inputs.get(k) != rec["inputs"].get(k))
        stale = self.move_aside(folder)
        say(f"{what}: its inputs changed ({', '.join(changed)}) since it was built: redo it "
            f"(the old outputs are kept in {stale})")
        return "rerun"

    @staticmethod
    def move_aside(folder):
        n = 1
        while os.path.exists(f"{folder}.stale-{n}"):
            n += 1
        os.replace(folder, f"{folder}.stale-{n}")
        return f"{folder}.stale-{n}"

    # ---------------------------------------------------------------- steps
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

    @staticmethod
    def have(paths):
        return all(os.path.isfile(p) for p in paths)

    def phase1_opts(self, dataset):
        return ["MODEL.EXITS.MODE", "ds", "MODEL.EXITS.EVAL_EXITS", "True", "MODEL.EXITS.HS3.FUSE.ENABLED", "False",
                "DATASETS.TRAIN", tup(self.reduced), "DATASETS.TEST", tup(dataset), "OUTPUT_DIR", self.phase1]

    def training(self, step, folder, opts, what, eval_step, eval_dataset):
        """Train into ``folder`` unless its model_final.pth was trained from the same config.
        The training's own final evaluation (on ``eval_dataset``) is recorded as ``eval_step``."""
        weights = os.path.join(folder, "model_final.pth")
        inputs = {"config_sha256": hashlib.sha256(self.training_config(opts).encode()).hexdigest()}
        if step == "phase2":  # what it trains on: the clusters (not the file's date or notes)
            inputs.update(clusters_file=self.clusters, clusters_sha256=clusters_fingerprint(load_clusters(self.clusters)))
        action = self.check(step, inputs, os.path.isfile(weights), folder, what)
        if action == "skip":
            say(f"skip {what}: {weights} was trained from the same inputs")
        else:
            self.train_net(opts)
            self.record(step, inputs)
            if self.have(self.confusions(folder, eval_dataset)[1]):
                self.record(eval_step, {"weights_sha256": file_sha256(weights), "dataset": eval_dataset})
        return weights

    def evaluation(self, step, out_dir, dataset, opts, weights, what):
        folder, files = self.confusions(out_dir, dataset)
        inputs = {"weights_sha256": file_sha256(weights), "dataset": dataset}
        action = self.check(step, inputs, self.have(files), folder, what)
        if action == "skip":
            say(f"skip {what}: confusion files of the same checkpoint exist in {folder}")
        else:
            self.train_net(opts + ["MODEL.WEIGHTS", weights], eval_only=True)
            self.record(step, inputs)
        return files

    def run(self):
        t0 = time.time()
        # 1. Phase 1: deep supervision on the reduced set, evaluated on the analysis set
        if self.args.phase1_weights:
            weights1 = os.path.abspath(self.args.phase1_weights)
            say(f"1/5 phase 1: given DS checkpoint {weights1}")
        else:
            weights1 = self.training("phase1", self.phase1, self.phase1_opts(self.analysis),
                                     f"1/5 phase 1 (deep supervision on {self.reduced})",
                                     f"phase1_eval/{self.analysis}", self.analysis)
        analysis_files = self.evaluation(f"phase1_eval/{self.analysis}", self.phase1, self.analysis,
                                         self.phase1_opts(self.analysis), weights1,
                                         f"1/5 phase-1 evaluation on {self.analysis}")
        analysis_dir = os.path.dirname(analysis_files[0])
        # 2. the DS model on the test set (the table's "ds" column)
        test1_files = self.evaluation(f"phase1_eval/{self.test}", self.phase1, self.test, self.phase1_opts(self.test),
                                      weights1, f"2/5 phase-1 evaluation on {self.test}")
        # 3. analysis -> clusters file
        self.analyse(analysis_dir)
        # 4. Phase 2: HS3 on the full training set, with the clusters file as it is now
        opts2 = ["MODEL.EXITS.HS3.CLUSTERS_FILE", self.clusters, "MODEL.EXITS.EVAL_EXITS", "True",
                 "OUTPUT_DIR", self.phase2]
        weights2 = self.training("phase2", self.phase2, opts2, f"4/5 phase 2 (hs3 on {self.train} with {self.clusters})",
                                 f"phase2_eval/{self.test}", self.test)
        test2_files = self.evaluation(f"phase2_eval/{self.test}", self.phase2, self.test, opts2, weights2,
                                      f"4/5 phase-2 evaluation on {self.test}")
        # 5. the table
        self.summary(test1_files, test2_files)
        say(f"done in {(time.time() - t0) / 60:.1f} min: {self.out}")

    def analyse(self, analysis_dir):
        h = self.cfg.HS3_ANALYSIS
        settings = {k: h[k] for k in ANALYSIS_ONLY_KEYS}
        inputs = {"confusions": {os.path.basename(p): file_sha256(p) for p in sorted(self.confusions(
                  self.phase1, self.analysis)[1])}, "settings": settings, "exits": self.exits}
        rec = self.state.get("analysis")
        if os.path.isfile(self.clusters) and not self.args.redo_analysis:
            if rec is None or rec["fingerprint"] == fingerprint(inputs):
                say(f"3/5 skip analysis: {self.clusters} exists (--redo-analysis redoes it)")
                return
            say("3/5 analysis: its inputs changed (confusion files or HS3_ANALYSIS) since the clusters were made")
        say(f"3/5 analysis of {analysis_dir} -> {self.hs3}")
        run_hs3_analysis(analysis_dir, self.hs3, method=h.METHOD, theta=None if h.THETA < 0 else h.THETA,
                         k_grid=h.K_GRID, seed=h.CLUSTER_SEED, normalize=h.NORMALIZE, exits=self.exits,
                         ratio=h.MANUAL_RATIO)
        self.record("analysis", inputs)
        warning = k_equals_n_warning(load_clusters(self.clusters))
        if warning:
            say("warning: " + warning)

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
        used = self.state["phase2"]["inputs"]
        table = tabulate(rows, headers=[f"{self.test} mIoU (classes)", "ds (phase 1)", "hs3 (phase 2)"])
        note = (f"ds: deep supervision trained on {self.reduced}; hs3: trained on {self.train} with the clusters "
                f"file {used['clusters_file']} (clusters fingerprint {used['clusters_sha256'][:16]}). "
                "Each exit is scored in its own label space.")
        warning = k_equals_n_warning(load_clusters(used["clusters_file"]))
        if warning:
            note += "\n\nWarning: " + warning
        print("\n" + table + "\n" + note, flush=True)
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write(table + "\n\n" + note + "\n")
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump({"test_dataset": self.test, "rows": data, "phase1": self.phase1, "phase2": self.phase2,
                       "clusters": used["clusters_file"], "clusters_sha256": used["clusters_sha256"]}, f, indent=1)


def get_cfg_default(key):
    cfg = get_cfg()
    add_segdistill_config(cfg)
    return cfg.HS3_ANALYSIS[key]


def main(argv=None):
    p = config_tool_parser(__doc__, "the Phase-2 config (MODEL.EXITS.MODE hs3)", "KEY VALUE overrides for every phase")
    p.add_argument("--output", default="", help="pipeline folder (default: see above)")
    p.add_argument("--phase1-weights", default="", help="a trained DS checkpoint: skip Phase-1 training")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per training (train_net.py --num-gpus)")
    p.add_argument("--redo-analysis", action="store_true",
                   help="rerun the analysis even if clusters.json exists (what changed is recomputed; "
                        "Phase 2 is retrained when the clusters file changes)")
    p.add_argument("--adopt-existing", action="store_true",
                   help="outputs without a record in pipeline_state.json are trusted as built from the current inputs")
    args = p.parse_args(argv)
    Pipeline(args).run()


if __name__ == "__main__":
    main()
