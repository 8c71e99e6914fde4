"""A backbone's stages as its consumers ask for them: more outputs, and every stage it has.

Exits (``MODEL.EXITS.IN_FEATURES``) and distillation taps read backbone stages that the
head does not, so the backbone must also return them. :func:`with_backbone_stages` is the
one place that asks for that, for YAML configs (the builder's out-features key) and lazy
ones (the backbone's ``out_features``). Extra stages change no parameter (timm and
detectron2 ResNets compute every stage anyway), so a model built with them loads the
weights of the same config without them, and the other way round.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

from torch import nn

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from ..stagewise import StagewiseBackbone

__all__ = ["OUT_FEATURES_KEYS", "with_backbone_stages", "backbone_outputs", "backbone_stage_shapes"]

# Where each backbone builder reads the stages it returns (a config key that lists them).
OUT_FEATURES_KEYS = {
    "build_timm_backbone": ("TIMM", "OUT_FEATURES"),
    "build_resnet_backbone": ("RESNETS", "OUT_FEATURES"),
}


def backbone_stage_shapes(backbone: nn.Module) -> Dict[str, ShapeSpec]:
    """Every stage a backbone can return: a :class:`StagewiseBackbone`'s ``stage_shapes()``
    (segdistill's timm backbones: all levels), any other backbone's ``output_shape()``."""
    if isinstance(backbone, StagewiseBackbone):
        return dict(backbone.stage_shapes())
    return dict(backbone.output_shape())


def backbone_outputs(cfg: CfgNode) -> List[str]:
    """The stages the backbone of a YAML ``cfg`` returns; [] when its builder lists them in no
    config key. An empty list in the key means the builder's default (a timm backbone's last
    stage, HRNet's four final branches): it is read from a backbone built without weights."""
    key = OUT_FEATURES_KEYS.get(cfg.MODEL.BACKBONE.NAME)
    if key is None:
        return []
    current = list(getattr(getattr(cfg.MODEL, key[0]), key[1]))
    if current:
        return current
    probe = cfg.clone()
    probe.defrost()
    if key[0] == "TIMM":
        probe.MODEL.TIMM.CHECKPOINT = ""  # the outputs do not depend on the weights
    return list(build_backbone(probe).output_shape())


def with_backbone_stages(cfg, stages: Sequence[str]):
    """``cfg`` whose backbone also returns ``stages`` (after the stages it returns already).

    ``cfg`` is a YAML config (a copy is returned when stages are added; the builder's
    out-features key of :data:`OUT_FEATURES_KEYS`) or a lazy config's model (changed in place:
    its ``backbone.out_features``). A backbone that lists its stages nowhere is left as it is:
    a stage it lacks is then an error naming the stages it gives, where they are read.
    """
    if not stages:
        return cfg
    if not isinstance(cfg, CfgNode):  # a lazy config's model
        backbone = cfg.get("backbone", None)
        if backbone is None or "out_features" not in backbone:
            return cfg
        current = list(backbone.out_features)
        backbone.out_features = current + [s for s in stages if s not in current]
        return cfg
    key = OUT_FEATURES_KEYS.get(cfg.MODEL.BACKBONE.NAME)
    if key is None:
        return cfg
    current = backbone_outputs(cfg)
    missing = [s for s in dict.fromkeys(stages) if s not in current]
    if not missing:
        return cfg
    cfg = cfg.clone()
    cfg.defrost()
    setattr(getattr(cfg.MODEL, key[0]), key[1], current + missing)
    return cfg
