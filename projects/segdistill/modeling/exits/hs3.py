"""HS3 (Borse et al., BMVC 2021), model side: the ``hs3`` exit mode and HS3-Fuse.

Objective, paper Eq. 1::

    L_total = sum_i gamma_i * CE(exit i, ground truth mapped class -> cluster of exit i) + L_final

with gamma_i the weight of exit i (``MODEL.EXITS.HS3.WEIGHT``, one per exit or one for all).
The first term is ``loss_hs3`` (one term, summed over exits; per-exit values are logged as
``hs3_ce_<exit>``); ``L_final`` is the head's own ``loss_sem_seg``. Everything the mode
needs comes from ``MODEL.EXITS.HS3.CLUSTERS_FILE`` (Phase 1's output, :mod:`.hs3_clusters`),
read here through the :class:`~.objective.ExitObjective` contract: each exit's class count
(:meth:`HS3Objective.exit_num_classes`), its class -> cluster table (the objective's
``label_luts``), the evaluator's label space of ``sem_seg_<exit>``
(:meth:`HS3Objective.eval_label_spaces`) and, with ``MODEL.EXITS.HS3.FUSE.ENABLED``, the
fuse blocks (:meth:`HS3Objective.build_fusion`).

HS3-Fuse (paper section 3.2, Figure 3): for each exit i (shallowest first), an OCR block on
the exit's segmentation features (``relu(ExitOutput.features)``, what its segmenter reads)::

    3x3 conv-norm-ReLU -> mid_i channels (pixel representations)
    soft object regions = the exit's own K_i-cluster logits (``ExitOutput.seg_logits``)
    ObjectContext (segdistill.modeling.heads.ocr): region representations, pixel-region
    relation in key_i channels, fusion -> mid_i channels

The deepest exit's block has ``mid_channels`` / ``key_channels`` (x ``channel_scale``), each
shallower one half of the next deeper one's. The blocks' outputs are resized to the stride of
the final head's finest input feature (``target``) and concatenated to it, so the head is built
with ``target`` ``sum(mid_i)`` channels wider. Parameter names: ``hs3_fuse.blocks.<exit>.*``.

The offline Phase-1 analysis (split, confusion matrices, clustering, choice of K) is
:mod:`segdistill.hs3`; it writes the clusters file and nothing here imports it.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.layers import ShapeSpec

from ..backbones.norm import resolve_norm
from ..heads.ocr import ObjectContext
from ..heads.psp import conv_norm_relu
from .heads import HEAD_FEATURE_PREFIX, ExitFusion, ExitOutput, MultiExitOutputs, exit_head_kwargs
from .hs3_clusters import HS3Clusters, clusters_fingerprint, load_clusters
from .objective import ExitObjective, put_scalar, register_exit_objective

__all__ = [
    "HS3Objective", "HS3Fuse", "HS3FuseBlock", "fuse_channels", "fuse_target", "model_class_names",
    "load_model_clusters", "exit_weights", "clusters_num_classes", "clusters_label_luts", "clusters_label_spaces",
]


# ----------------------------------------------------------------------------- the clusters file, as the model reads it
def model_class_names(cfg) -> Union[List[str], int]:
    """The training dataset's ``stuff_classes`` when registered and of the head's size, else
    ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` (the count is then all that is checked).

    A derived Phase-1 split (``<name>_hs3_reduced``) is registered by ``train_net.py``'s
    ``setup()`` (``segdistill.hs3.splits``) before the model is built."""
    n = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    train = list(cfg.DATASETS.TRAIN)
    if train:
        from detectron2.data import DatasetCatalog, MetadataCatalog

        if train[0] in DatasetCatalog.list():
            names = MetadataCatalog.get(train[0]).get("stuff_classes", None)
            if names and len(names) == n:
                return list(names)
    return n


def load_model_clusters(cfg, exit_names: Sequence[str]) -> HS3Clusters:
    """``MODEL.EXITS.HS3.CLUSTERS_FILE`` validated against the model's classes and exits
    (``ClustersFileError`` naming the file, the exit and the values otherwise)."""
    return load_clusters(cfg.MODEL.EXITS.HS3.CLUSTERS_FILE, model_class_names(cfg), list(exit_names))


def exit_weights(weights: Sequence[float], exit_names: Sequence[str]) -> Dict[str, float]:
    """``MODEL.EXITS.HS3.WEIGHT`` (the paper's gamma_i): one value for all exits or one per exit."""
    weights = [float(g) for g in weights]
    names = list(exit_names)
    if len(weights) == 1:
        return {n: weights[0] for n in names}
    if len(weights) != len(names):
        raise ValueError(
            f"MODEL.EXITS.HS3.WEIGHT has {len(weights)} values for {len(names)} exits {names}; "
            "give one for all or one per exit."
        )
    return dict(zip(names, weights))


def _label_luts(clusters: HS3Clusters, exit_names: Sequence[str], ignore_value: int) -> Dict[str, torch.Tensor]:
    return {e: torch.as_tensor(clusters.lut(e, ignore_value), dtype=torch.long) for e in exit_names}


# ---- lazy configs (configs/demo/hs3/hs3_r18.py): the same reads as from_config, as callables
def clusters_num_classes(path: str, exit_names: Sequence[str], class_names) -> List[int]:
    """K_i per exit of a validated clusters file (``class_names``: names or count)."""
    c = load_clusters(path, class_names, list(exit_names))
    return [c.num_clusters(e) for e in exit_names]


def clusters_label_luts(path: str, exit_names: Sequence[str], class_names, ignore_value: int) -> Dict[str, torch.Tensor]:
    """{exit: LongTensor class -> cluster} of a validated clusters file."""
    return _label_luts(load_clusters(path, class_names, list(exit_names)), exit_names, ignore_value)


def clusters_label_spaces(path: str, exit_names: Sequence[str], dataset_name: str):
    """The evaluator's ``label_spaces`` for ``sem_seg_<exit>`` (lazy configs' SemSegEvaluator)."""
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(dataset_name)
    c = load_clusters(path, list(meta.stuff_classes), list(exit_names))
    ignore = meta.get("ignore_label", 255)
    return {f"sem_seg_{e}": (c.lut(e, ignore), c.cluster_names(e)) for e in exit_names}


# ----------------------------------------------------------------------------- HS3-Fuse
def fuse_channels(num_exits: int, mid_channels: int, key_channels: int, scale: float) -> List[tuple]:
    """(mid_i, key_i) per exit, shallowest first: the deepest gets ``mid/key x scale``, each
    shallower one half of the next deeper one's (at least 1)."""
    if num_exits < 1:
        raise ValueError("HS3-Fuse needs at least one exit (MODEL.EXITS.IN_FEATURES).")
    if scale <= 0 or mid_channels < 1 or key_channels < 1:
        raise ValueError(
            f"MODEL.EXITS.HS3.FUSE: OCR_MID_CHANNELS ({mid_channels}), OCR_KEY_CHANNELS ({key_channels}) and "
            f"CHANNEL_SCALE ({scale}) must be positive."
        )
    out = []
    for depth in range(num_exits):  # 0 = deepest
        f = scale / 2 ** depth
        out.append((max(1, int(round(mid_channels * f))), max(1, int(round(key_channels * f)))))
    return out[::-1]


def fuse_target(head_in_features: Sequence[str], shapes: Dict[str, ShapeSpec]) -> str:
    """The final head's finest input feature, where the fused features are concatenated."""
    feats = [f for f in head_in_features if f in shapes]
    if not feats:
        raise ValueError(f"HS3-Fuse: MODEL.SEM_SEG_HEAD.IN_FEATURES {list(head_in_features)} are not backbone "
                         f"outputs ({sorted(shapes)}).")
    return min(feats, key=lambda f: shapes[f].stride)


class HS3FuseBlock(nn.Module):
    """One exit's OCR block: pixel conv + object context on the exit's own soft regions."""

    def __init__(self, *, in_channels: int, mid_channels: int, key_channels: int, norm: str):
        super().__init__()
        self.pixel_conv = conv_norm_relu(in_channels, mid_channels, 3, norm)
        self.context = ObjectContext(mid_channels, key_channels, norm, dropout=0.0)

    def forward(self, exit_out: ExitOutput) -> torch.Tensor:
        return self.context(self.pixel_conv(F.relu(exit_out.features)), exit_out.seg_logits)


class HS3Fuse(ExitFusion):
    """Every exit's OCR block; ``forward(features, exits)`` returns the head's input features
    with the blocks' outputs concatenated to ``features[target]``."""

    name = "hs3_fuse"

    def __init__(self, *, exit_channels: Dict[str, int], target: str, target_stride: int, mid_channels: int,
                 key_channels: int, channel_scale: float, norm: str):
        super().__init__()
        self.target = target
        self.target_stride = target_stride
        sizes = fuse_channels(len(exit_channels), mid_channels, key_channels, channel_scale)
        self.blocks = nn.ModuleDict({
            name: HS3FuseBlock(in_channels=c, mid_channels=mid, key_channels=key, norm=norm)
            for (name, c), (mid, key) in zip(exit_channels.items(), sizes)
        })
        self.out_channels = sum(mid for mid, _ in sizes)

    @property
    def exit_names(self) -> List[str]:
        return list(self.blocks)

    def head_input_shapes(self, shapes: Dict[str, ShapeSpec]) -> Dict[str, ShapeSpec]:
        """The backbone's output shapes as the head sees them (``target`` widened)."""
        out = dict(shapes)
        t = out[self.target]
        out[self.target] = ShapeSpec(channels=t.channels + self.out_channels, height=t.height, width=t.width,
                                     stride=t.stride)
        return out

    def forward(self, features: Dict[str, torch.Tensor], exits: Dict[str, ExitOutput]) -> Dict[str, torch.Tensor]:
        base = features[self.target]
        size = base.shape[-2:]
        fused = [base]
        for name, block in self.blocks.items():
            y = block(exits[name])
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            fused.append(y)
        out = dict(features)
        out[self.target] = torch.cat(fused, dim=1)
        return out


# ----------------------------------------------------------------------------- the objective
@register_exit_objective("hs3")
class HS3Objective(ExitObjective):
    """Eq. 1's exit term: ``loss_hs3 = sum_i gamma_i * CE_i`` on each exit's clustered labels."""

    @configurable
    def __init__(self, *, weight: Union[float, Dict[str, float]], ignore_value: int,
                 label_luts: Dict[str, torch.Tensor], clusters_file: str):
        """``weight``: one float for all exits or {exit: gamma_i}; ``label_luts``: {exit: class -> cluster};
        ``clusters_file``: the file they come from (named in errors; its clusters' fingerprint,
        :func:`~.hs3_clusters.clusters_fingerprint`, is saved in checkpoints)."""
        super().__init__(ignore_value=ignore_value, label_luts=label_luts)
        self.weight = weight
        self.clusters_file = clusters_file
        # What the exits are trained on, saved in every checkpoint: loading a checkpoint made
        # with other clusters is an error naming both (fvcore would only warn about the exits'
        # segmenter shapes and drop them).
        tables = [self.label_luts[n] for n in self.label_luts]
        width = max((t.numel() for t in tables), default=0)
        tables = [F.pad(t.long(), (0, width - t.numel()), value=ignore_value) for t in tables]
        self.register_buffer("cluster_tables", torch.stack(tables) if tables else torch.zeros(0, 0, dtype=torch.long))
        sha = (clusters_fingerprint(load_clusters(clusters_file)) if clusters_file and os.path.isfile(clusters_file)
               else "00" * 32)
        self.register_buffer("clusters_sha256", torch.tensor(list(bytes.fromhex(sha)), dtype=torch.uint8))
        self.register_load_state_dict_pre_hook(_check_checkpoint_clusters)

    @classmethod
    def add_config(cls, cfg):
        # HS3 (MODE "hs3"; docs/hs3.md): every exit predicts its own clustered class set.
        # The clusters file of Phase 1 (tools/hs3_analyze.py or tools/hs3_pipeline.py); required
        # with MODE "hs3". Each exit's class count and label table come from it.
        cfg.MODEL.EXITS.HS3.CLUSTERS_FILE = ""
        # gamma_i of Eq. 1 (weight of exit i's clustered cross-entropy), one per exit or one for all.
        cfg.MODEL.EXITS.HS3.WEIGHT = [1.0]
        # HS3-Fuse (paper 3.2): an OCR block on each exit's features (soft regions from the exit's
        # cluster logits), concatenated into the final head's finest input feature. Costs inference.
        cfg.MODEL.EXITS.HS3.FUSE = CN()
        cfg.MODEL.EXITS.HS3.FUSE.ENABLED = False
        # Mid / key channels of the deepest exit's OCR block; each shallower exit's block has half
        # of the next deeper one's.
        cfg.MODEL.EXITS.HS3.FUSE.OCR_MID_CHANNELS = 256
        cfg.MODEL.EXITS.HS3.FUSE.OCR_KEY_CHANNELS = 128
        # Multiplies every OCR block's channels (< 1: the paper's "lighter" HS3-Fuse).
        cfg.MODEL.EXITS.HS3.FUSE.CHANNEL_SCALE = 1.0

    @classmethod
    def from_config(cls, cfg):
        names = list(cfg.MODEL.EXITS.IN_FEATURES)
        ignore = int(cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
        path = cfg.MODEL.EXITS.HS3.CLUSTERS_FILE
        return {"weight": exit_weights(cfg.MODEL.EXITS.HS3.WEIGHT, names), "ignore_value": ignore,
                "label_luts": _label_luts(load_model_clusters(cfg, names), names, ignore), "clusters_file": path}

    @classmethod
    def exit_num_classes(cls, cfg, exit_names: Sequence[str]) -> List[int]:
        """K_i of every exit, from the clusters file (``MODEL.EXITS.NUM_CLASSES`` must be empty or agree)."""
        clusters = load_model_clusters(cfg, exit_names)
        ks = [clusters.num_clusters(e) for e in exit_names]
        explicit = list(cfg.MODEL.EXITS.NUM_CLASSES)
        if explicit and explicit != ks:
            raise ValueError(
                f"MODEL.EXITS.NUM_CLASSES {explicit} contradicts the clusters file "
                f"{cfg.MODEL.EXITS.HS3.CLUSTERS_FILE!r} ({dict(zip(exit_names, ks))}); with MODE 'hs3' leave it empty."
            )
        return ks

    @classmethod
    def build_fusion(cls, cfg, exit_names: Sequence[str], backbone_shapes: Dict[str, ShapeSpec]):
        """HS3-Fuse's OCR blocks (``MODEL.EXITS.HS3.FUSE``) on the exits, fused into the head's finest input."""
        f = cfg.MODEL.EXITS.HS3.FUSE
        if not f.ENABLED:
            return None
        heads = [n for n in exit_names if n.startswith(HEAD_FEATURE_PREFIX)]
        if heads:
            raise ValueError(f"HS3-Fuse feeds the exits into the head, so exits cannot read the head's features "
                             f"{heads}; use backbone stages in MODEL.EXITS.IN_FEATURES.")
        shapes = dict(backbone_shapes)
        target = fuse_target(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES, shapes)
        return HS3Fuse(exit_channels={n: exit_head_kwargs(cfg)["channels"] for n in exit_names}, target=target,
                       target_stride=shapes[target].stride, mid_channels=f.OCR_MID_CHANNELS,
                       key_channels=f.OCR_KEY_CHANNELS, channel_scale=f.CHANNEL_SCALE,
                       norm=resolve_norm(cfg, "head"))

    @classmethod
    def eval_label_spaces(cls, cfg, dataset_name: str) -> Dict[str, tuple]:
        """``{"sem_seg_<exit>": (lut, cluster names)}`` for every exit of the clusters file,
        validated against the dataset's classes and ``MODEL.EXITS.IN_FEATURES``: each exit
        is scored in its own cluster space (ground truth mapped class -> cluster)."""
        from detectron2.data import MetadataCatalog

        meta = MetadataCatalog.get(dataset_name)
        names = meta.get("stuff_classes", None)
        ignore = meta.get("ignore_label", 255)
        exits = list(cfg.MODEL.EXITS.IN_FEATURES)
        clusters = load_clusters(cfg.MODEL.EXITS.HS3.CLUSTERS_FILE, class_names=list(names) if names else None,
                                 exit_names=exits or None)
        return {f"sem_seg_{e}": (clusters.lut(e, ignore), clusters.cluster_names(e)) for e in clusters.exits}

    def exit_weight(self, name: str) -> float:
        """gamma_i of exit ``name``."""
        return float(self.weight[name]) if isinstance(self.weight, dict) else float(self.weight)

    def check_exits(self, exit_num_classes: Dict[str, int], head_num_classes: int) -> None:
        """Every exit needs a label table whose clusters match its class count."""
        missing = [n for n in exit_num_classes if n not in self.label_luts]
        if missing:
            raise ValueError(f"HS3 exits {missing} have no class -> cluster table (MODEL.EXITS.HS3.CLUSTERS_FILE).")
        if isinstance(self.weight, dict) and set(self.weight) != set(exit_num_classes):
            raise ValueError(f"HS3 weights are given for {sorted(self.weight)} but the exits are "
                             f"{list(exit_num_classes)}.")
        for n, k in exit_num_classes.items():
            lut = self.label_luts[n][: head_num_classes]
            if int(lut.max()) + 1 != k:
                raise ValueError(f"HS3 exit {n!r} predicts {k} classes but its table has {int(lut.max()) + 1} clusters.")

    def forward(self, outputs: MultiExitOutputs, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        total, ces = 0.0, {}
        for name, out in outputs.exits.items():
            ces[name] = self.exit_cross_entropy(name, out.seg_logits, targets)
            total = total + self.exit_weight(name) * ces[name]
        if self.training and ces:  # logged with one read of the device for all exits
            for name, value in zip(ces, torch.stack([ce.detach().float() for ce in ces.values()]).tolist()):
                put_scalar(f"hs3_ce_{name}", value)
        return {"loss_hs3": total}


def _check_checkpoint_clusters(module: HS3Objective, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: a checkpoint's class -> cluster tables must be this model's."""
    theirs = state_dict.get(prefix + "cluster_tables")
    if theirs is None:  # a checkpoint from before the tables were saved, or another model's
        return
    ours = module.cluster_tables
    if theirs.shape == ours.shape and torch.equal(theirs.to(ours.device), ours):
        return
    names = list(module.label_luts)
    n = int(max((int((t != module.ignore_value).sum()) for t in module.label_luts.values()), default=0))

    def describe(tables) -> str:
        parts = []
        for name, t in zip(names, tables):
            a = [int(v) for v in t[:n]]
            parts.append(f"{name}: K={max(a) + 1} {a}")
        return "; ".join(parts) if len(tables) == len(names) else f"{len(tables)} exits"

    sha = bytes(state_dict.get(prefix + "clusters_sha256", torch.zeros(0, dtype=torch.uint8)).tolist()).hex()
    raise ValueError(
        f"The checkpoint being loaded was trained with other HS3 clusters (fingerprint "
        f"{sha[:16] or 'unknown'}: {describe(theirs)}) than MODEL.EXITS.HS3.CLUSTERS_FILE {module.clusters_file!r} "
        f"(fingerprint {bytes(module.clusters_sha256.tolist()).hex()[:16]}: {describe(ours)}). Load it with the clusters "
        "file it was trained with (its run's config.yaml names it), or retrain Phase 2 with this one."
    )
