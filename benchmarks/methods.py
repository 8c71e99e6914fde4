"""The methods the benchmarks compare, one catalogue under one name each.

A method is a *family* (the kind of model it trains, which names the config each benchmark
builds it from: ``configs/camvid/table/<family>.yaml`` for the CamVid table, a demo config for
the overhead benchmark) plus the overrides that make it that method, and what it needs before
it can run. ``benchmarks/camvid_table.py`` (its rows, ``BLOCKS``) and ``benchmarks/overhead.py``
(its rows) both read :data:`METHODS`; the names are those of the published table
(docs/results/camvid/summary.json).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

__all__ = ["Method", "METHODS", "BLOCKS", "HISTORY_ROWS", "FAMILIES", "SR_OFF", "CIRKD_SMALL", "BUDGET",
           "EQUAL_COMPUTE", "TUNED", "TUNE_KEYS", "TUNE_GRID", "TUNED_VALUE", "DISTILL_ROWS", "BF16", "variant"]

# The kinds of model, each a config of every benchmark that builds it.
FAMILIES = ("baseline", "ds", "sr", "hs3", "hs3_fuse", "teacher", "student", "distill")


@dataclass(frozen=True)
class Method:
    """One method: ``family`` + ``opts`` (KEY VALUE strings); ``label``: its row in the table;
    ``baseline``: the method it is compared with (None: it is a baseline itself); ``needs``:
    "teacher" (a trained or random teacher), "hs3_clusters" / "hs3_manual" (an HS3 clusters
    file: the trade-off rule's / a constant ratio's), "maskd_tokens" (MasKD's receptive tokens,
    learnt on that teacher by tools/maskd_tokens.py; a random teacher draws them); ``seeds``: the table's seeds (None: every
    seed of the invocation)."""

    name: str
    label: str
    family: str
    opts: Tuple[str, ...] = ()
    baseline: Optional[str] = None
    needs: Tuple[str, ...] = ()
    seeds: Optional[Sequence[int]] = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: unknown family {self.family!r}; choose from {FAMILIES}")


SR_OFF = ("MODEL.EXITS.SR.F_WEIGHT", "0.0", "MODEL.EXITS.SR.L_WEIGHT", "0.0")
# CIRKD's memories at the benchmarks' scale (the authors' 20000 / 2000 entries per class are sized
# for 40k Cityscapes iterations, and would make every checkpoint ~200 MB here)
CIRKD_SMALL = ("MODEL.DISTILL.CIRKD.PIXEL_MEMORY_SIZE", "2000", "MODEL.DISTILL.CIRKD.REGION_MEMORY_SIZE", "200")


def _distill(name: str, label: str, losses: Sequence[str], extra: Tuple[str, ...] = (),
             needs: Tuple[str, ...] = ()) -> Method:
    """A distillation method: the student taught by the teacher through ``losses``; ``needs``:
    what it needs besides the teacher."""
    value = "[" + ", ".join(f'"{loss}"' for loss in losses) + "]"
    return Method(name, label, "distill", ("MODEL.DISTILL.LOSSES", value) + extra, baseline="student",
                  needs=("teacher",) + tuple(needs))


METHODS: Dict[str, Method] = {m.name: m for m in [
    Method("baseline", "baseline", "baseline"),
    # multi-exit training (SR Table 1's ablation) against the same model without exits
    Method("ds", "DS", "ds", baseline="baseline"),
    Method("mea", "MEA", "sr", SR_OFF, baseline="baseline"),
    Method("mea_srl", "MEA+SR-L", "sr", ("MODEL.EXITS.SR.F_WEIGHT", "0.0"), baseline="baseline"),
    Method("mea_srf", "MEA+SR-F", "sr", ("MODEL.EXITS.SR.L_WEIGHT", "0.0"), baseline="baseline"),
    Method("sr", "SR", "sr", baseline="baseline"),
    # the per-pixel anytime models' variants (the held-out regime, docs/anytime.md): DS with ADP-C's
    # RH exits in place of SR's exit heads, and DS trained mask-aware at ADP-C's confidence
    # threshold 0.998 (its training and test threshold; no value seen on val)
    Method("ds_rh", "DS (RH exits)", "ds", ("MODEL.EXITS.HEAD", "rh"), baseline="baseline"),
    Method("ds_pixel", "DS (mask-aware, t 0.998)", "ds", ("MODEL.EXITS.PIXEL.TRAIN_THRESHOLD", "0.998"),
           baseline="baseline"),
    # HS3 (its Tables 1, 2 and 6)
    Method("hs3", "HS3", "hs3", baseline="baseline", needs=("hs3_clusters",)),
    Method("hs3_manual", "HS3 (manual ratio)", "hs3", baseline="baseline", needs=("hs3_manual",)),
    Method("hs3_fuse", "HS3-Fuse", "hs3_fuse", baseline="baseline", needs=("hs3_clusters",)),
    # distillation (FAKD Tables 3-4, HWD Tables II-III)
    Method("teacher", "teacher (R18, ASPP 256)", "teacher", seeds=(0,)),
    Method("student", "student (MBV2) alone", "student"),
    _distill("pd", "PD", ["pd"]),
    _distill("cwd", "CWD", ["cwd"]),
    _distill("fakd_cwd", "FAKD-CWD", ["fakd_cwd"]),
    _distill("fakd_pd", "FAKD-PD", ["fakd_pd"]),
    _distill("hwd", "HWD", ["hwd"]),
    _distill("hwd_fakd_pd", "HWD + FAKD-PD", ["hwd", "fakd_pd"]),
    # the comparison rows of FAKD Tables 1-3 / HWD Tables II-III, each with its paper's full objective
    _distill("skd", "SKD", ["pd", "skd"]),
    _distill("ifvd", "IFVD", ["pd", "ifvd"]),
    _distill("cirkd", "CIRKD", ["pd", "cirkd"], CIRKD_SMALL),
    _distill("mgd", "MGD", ["mgd", "cwd"]),
    _distill("dist", "DIST", ["dist"]),
    _distill("fitnet", "FitNet", ["pd", "fitnet"]),
    _distill("at", "AT", ["pd", "at"]),
    # AT's code-form loss scales as 1 / (H W) of the tapped map and CIRKD's weight 1e4 is tuned for
    # 64x128 maps (512x1024 crops at stride 8); here head_features are 6x8: 1e4 * 48 / 8192
    _distill("at_scaled", "AT (weight x HW/8192)", ["pd", "at"], ("MODEL.DISTILL.AT.WEIGHT", "58.6")),
    # the comparison rows of the 2023 papers, each with its paper's full objective
    # Af-DCD's CamVid code contrasts the unpooled map (it crops it instead, losses/ocmgd.py lines
    # 79-82); pooled 4x4, the table's 6x8 res5 maps would keep 1x2 positions
    _distill("afdcd", "Af-DCD", ["pd", "afdcd"], ("MODEL.DISTILL.AFDCD.POOL", "0")),
    _distill("diffkd", "DiffKD", ["pd", "diffkd"]),
    # its tokens file first, learnt on the row's teacher (tools/maskd_tokens.py; camvid_table.py's
    # maskd_tokens job); a random teacher (overhead.py, step_cost.py) draws them
    _distill("maskd", "MasKD", ["maskd"], needs=("maskd_tokens",)),
]}

# Rows kept out of the table's body (docs/results.md, History): each was added after its default
# failed on val, so it is a diagnosis seen on val, not a row a reader can rerun as a protocol; the
# weight-tuning protocol (TUNED) replaces them. ``camvid_table.py --methods at_scaled`` still runs it.
HISTORY_ROWS = ("at_scaled",)

# The distillation rows of the table (the block's body after the student and the teacher)
DISTILL_ROWS = ("pd", "cwd", "fakd_cwd", "fakd_pd", "hwd", "hwd_fakd_pd", "skd", "ifvd", "cirkd", "mgd", "dist",
                "fitnet", "at", "afdcd", "diffkd", "maskd")

# The equal-compute block's budget: camvid_table.py replaces this value of SOLVER.BUDGET by the
# FLOPs of --budget-steps steps of --budget-reference (the student alone, 300 steps: its own row).
BUDGET = "<table budget>"


def variant(base: Method, tag: str, label: str, opts: Tuple[str, ...], baseline: Optional[str] = None) -> Method:
    """``base`` with more overrides, as its own row ``<name>@<tag>``."""
    return Method(f"{base.name}@{tag}", f"{base.label} {label}", base.family, base.opts + tuple(opts),
                  baseline=baseline if baseline is not None else base.baseline, needs=base.needs, seeds=base.seeds)


_BASE = dict(METHODS)
# Every distillation method at one training budget in FLOPs (SOLVER.BUDGET): a costlier step gets
# fewer iterations. The student alone at that budget is its own 300-iteration row.
EQUAL_COMPUTE = [variant(_BASE[n], "ec", "(equal compute)", ("SOLVER.BUDGET", BUDGET)) for n in DISTILL_ROWS]

# The weights each tuned row scales by one grid factor (the method's own term; PD's weight stays
# where a method adds its term to PD): picked on camvid_train_hs3_analysis by camvid_table.py's
# tuning protocol (x0.1, x0.3, x1, x3 of the default).
TUNE_KEYS = {
    "pd": ("MODEL.DISTILL.PD.WEIGHT",), "cwd": ("MODEL.DISTILL.CWD.WEIGHT",),
    "fakd_cwd": ("MODEL.DISTILL.FAKD_CWD.WEIGHT",), "fakd_pd": ("MODEL.DISTILL.FAKD_PD.WEIGHT",),
    "hwd": ("MODEL.DISTILL.HWD.WEIGHT",),
    "skd": ("MODEL.DISTILL.SKD.PAIRWISE_WEIGHT", "MODEL.DISTILL.SKD.HOLISTIC_WEIGHT"),
    "ifvd": ("MODEL.DISTILL.IFVD.WEIGHT",),
    "cirkd": ("MODEL.DISTILL.CIRKD.BATCH_WEIGHT", "MODEL.DISTILL.CIRKD.PIXEL_MEMORY_WEIGHT",
              "MODEL.DISTILL.CIRKD.REGION_MEMORY_WEIGHT"),
    "mgd": ("MODEL.DISTILL.MGD.WEIGHT",), "dist": ("MODEL.DISTILL.DIST.WEIGHT",),
    "fitnet": ("MODEL.DISTILL.FITNET.WEIGHT",), "at": ("MODEL.DISTILL.AT.WEIGHT",),
    "afdcd": ("MODEL.DISTILL.AFDCD.FD_WEIGHT", "MODEL.DISTILL.AFDCD.CTR_WEIGHT"),
    "diffkd": ("MODEL.DISTILL.DIFFKD.KD_WEIGHT",), "maskd": ("MODEL.DISTILL.MASKD.WEIGHT",),
}
TUNE_GRID = (0.1, 0.3, 1.0, 3.0)
TUNED_VALUE = "<tuned>"  # replaced by default x the pick's factor when camvid_table.py builds the run
TUNED = [variant(_BASE[n], "tuned", "(weight tuned on the analysis split)",
                 tuple(x for k in TUNE_KEYS[n] for x in (k, TUNED_VALUE))) for n in DISTILL_ROWS if n in TUNE_KEYS]
# The same trainings in bf16 autocast (SOLVER.AMP.ENABLED on the CPU; the optimizer, the
# checkpoints and the evaluation stay float32, the teacher's forward follows the step): each against
# its own float32 row, paired by seed, to show that the accuracy is unchanged within the interval.
BF16 = [variant(_BASE[n], "bf16", "in bf16", ("SOLVER.AMP.ENABLED", "True"), baseline=n) for n in ("student", "pd")]
METHODS.update({m.name: m for m in EQUAL_COMPUTE + TUNED + BF16})

# The CamVid table's blocks: block -> (title with the papers, methods; the first is the baseline of the others)
BLOCKS = {
    "sr": ("Self-Regulation (SR Table 1 ablation)", ["baseline", "ds", "mea", "mea_srl", "mea_srf", "sr"]),
    "anytime_exits": ("Anytime exits (trained without the analysis split): SR vs RH exit heads, mask-aware DS",
                      ["baseline", "ds", "sr", "ds_rh", "ds_pixel"]),
    "hs3": ("HS3 (HS3 Tables 1, 2 and 6)", ["baseline", "ds", "hs3", "hs3_manual", "hs3_fuse"]),
    "distill": ("Distillation (FAKD Tables 3-4, HWD Tables II-III)", ["student", "teacher", *DISTILL_ROWS]),
    "equal_compute": ("Distillation at equal compute (the student alone's 300 steps: FLOPs or CPU time, budget.json)",
                      ["student", "teacher"] + [m.name for m in EQUAL_COMPUTE]),
    "tuned": ("Distillation with each loss weight tuned on the analysis split (never on val)",
              ["student", "teacher"] + [m.name for m in TUNED]),
    # one block per float32 row, since a block's first row is the baseline of its others
    "bf16_student": ("Mixed precision: the student alone trained in bf16 against float32", ["student", "student@bf16"]),
    "bf16_pd": ("Mixed precision: PD trained in bf16 against float32 (the same float32 teacher)",
                ["pd", "pd@bf16", "teacher"]),
}
