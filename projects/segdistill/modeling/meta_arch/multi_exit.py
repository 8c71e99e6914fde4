"""``MultiExitSegmentor``: backbone + final head (the deployed path) + training-only exits.

The final path has exactly detectron2's ``SemanticSegmentor`` parameter names
(``backbone.*``, ``sem_seg_head.*``), so :meth:`deploy_state_dict` (exits, final classifier
and objective state removed) loads into the plain baseline config with no missing or
unexpected keys. In ``eval()`` the exits do not run and the output is
``SemanticSegmentor``'s, bit for bit, unless ``eval_exits`` is set (``MODEL.EXITS.EVAL_EXITS``
or the attribute): then each exit's prediction comes back too as ``sem_seg_<exit>``.

In training the backbone, head, exits and final classifier outputs are collected in one
:class:`MultiExitOutputs`; the objective of ``MODEL.EXITS.MODE`` (``ds``, ``sr``, or any
registered with :func:`register_exit_objective`) turns it into named loss terms, next to the
head's own ``loss_sem_seg``.

HS3 (``MODEL.EXITS.MODE hs3``, docs/hs3.md): each exit's class count and class -> cluster
table come from ``MODEL.EXITS.HS3.CLUSTERS_FILE``. With HS3-Fuse (``HS3.FUSE.ENABLED``) the
exits are part of the deployed model: their OCR-refined features (``hs3_fuse``) widen the
head's input, so they run in ``eval()`` too and :meth:`deploy_state_dict` keeps them
(classifiers dropped); such a checkpoint loads into the same hs3-fuse config.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor, build_backbone, build_sem_seg_head
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

from ..backbones.norm import resolve_norm
from ..exits import (
    EXIT_OBJECTIVES, HEAD_FEATURE_PREFIX, ExitObjective, ExitOutput, MultiExitOutputs, MultiLabelClassifier,
    build_exit_heads, exit_size,
)
from ..distill.taps import (
    HEAD_TAPS, SegmentorTaps, StudentTaps, check_tap_head, collect_taps, head_tap_shapes, normalise_inputs,
)
from ..heads.base import head_outputs
from ..losses import self_regulation as _self_regulation  # noqa: F401  (registers "ds" and "sr")

__all__ = ["MultiExitSegmentor", "exit_modes", "head_feature_shapes", "backbone_stage_shapes"]

DEPLOYED_PREFIXES = ("backbone.", "sem_seg_head.")


def exit_modes():
    """Valid ``MODEL.EXITS.MODE`` values: ``none`` plus every registered objective."""
    return ("none",) + tuple(EXIT_OBJECTIVES)


def head_feature_shapes(head: nn.Module) -> Dict[str, ShapeSpec]:
    """Head features exits may attach to: ``head_features`` and the head's ``exposed_features()``."""
    shapes: Dict[str, ShapeSpec] = {}
    predictor = getattr(head, "predictor", None)
    if predictor is not None and hasattr(head, "forward_outputs"):
        shapes[HEAD_FEATURE_PREFIX + "features"] = ShapeSpec(channels=predictor.in_channels, stride=head.common_stride)
    exposed = getattr(head, "exposed_features", None)
    if callable(exposed):
        shapes.update({HEAD_FEATURE_PREFIX + k: v for k, v in exposed().items()})
    return shapes


def backbone_stage_shapes(backbone: nn.Module) -> Dict[str, ShapeSpec]:
    """Every stage a backbone can return (timm backbones: all levels), else its outputs."""
    if hasattr(backbone, "_all_names") and hasattr(backbone, "_out_feature_strides"):  # TimmBackbone
        return {n: ShapeSpec(channels=backbone._out_feature_channels[n], stride=backbone._out_feature_strides[n])
                for n in backbone._all_names}
    if isinstance(getattr(backbone, "_shapes", None), dict):  # HRNetBackbone
        return {n: ShapeSpec(channels=c, stride=s) for n, (c, s) in backbone._shapes.items()}
    return dict(backbone.output_shape())


def _build_backbone_with_exit_stages(cfg, exit_names):
    """Build the backbone, asking timm backbones for the exit stages too (they cost nothing)."""
    stages = [n for n in exit_names if not n.startswith(HEAD_FEATURE_PREFIX)]
    if cfg.MODEL.BACKBONE.NAME != "build_timm_backbone" or not stages:
        return build_backbone(cfg)
    wanted = list(cfg.MODEL.TIMM.OUT_FEATURES) or []
    missing = [n for n in stages if n not in wanted]
    if not missing:
        return build_backbone(cfg)
    cfg2 = cfg.clone()
    cfg2.defrost()
    if not wanted:  # empty = the last stage only; keep it for the head
        wanted = [backbone_stage_shapes(build_backbone(cfg)).popitem()[0]]
    cfg2.MODEL.TIMM.OUT_FEATURES = wanted + missing
    try:
        return build_backbone(cfg2)
    except ValueError:
        valid = list(backbone_stage_shapes(build_backbone(cfg)))
        raise ValueError(
            f"Unknown MODEL.EXITS.IN_FEATURES {[n for n in stages if n not in valid]} for backbone "
            f"{cfg.MODEL.TIMM.NAME}; valid choices: {valid} and the head's features {HEAD_FEATURE_PREFIX}features."
        ) from None


def _build_hs3_fuse(cfg, backbone, exit_names):
    """HS3-Fuse's OCR blocks (``MODEL.EXITS.HS3.FUSE``) on the exits, fused into the head's finest input."""
    from ..hs3_fuse import HS3Fuse, fuse_target

    heads = [n for n in exit_names if n.startswith(HEAD_FEATURE_PREFIX)]
    if heads:
        raise ValueError(f"HS3-Fuse feeds the exits into the head, so exits cannot read the head's features {heads}; "
                         "use backbone stages in MODEL.EXITS.IN_FEATURES.")
    f = cfg.MODEL.EXITS.HS3.FUSE
    shapes = dict(backbone.output_shape())
    target = fuse_target(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES, shapes)
    return HS3Fuse({n: cfg.MODEL.EXITS.CHANNELS for n in exit_names}, target, shapes[target].stride,
                   mid_channels=f.OCR_MID_CHANNELS, key_channels=f.OCR_KEY_CHANNELS, channel_scale=f.CHANNEL_SCALE,
                   norm=cfg.MODEL.EXITS.NORM or resolve_norm(cfg, "head"))


@META_ARCH_REGISTRY.register()
class MultiExitSegmentor(SemanticSegmentor, SegmentorTaps):
    """SemanticSegmentor with exits on intermediate stages (deep supervision, Self-Regulation, ...)."""

    @configurable
    def __init__(
        self,
        *,
        backbone,
        sem_seg_head: nn.Module,
        pixel_mean,
        pixel_std,
        exits: Optional[Dict[str, nn.Module]] = None,
        final_classifier: Optional[nn.Module] = None,
        objective: Optional[ExitObjective] = None,
        eval_exits: bool = False,
        hs3_fuse: Optional[nn.Module] = None,
    ):
        """
        Args:
            backbone, sem_seg_head, pixel_mean, pixel_std: as ``SemanticSegmentor``; the head
                must follow segdistill's head contract (``forward_outputs``, ``predictor``, ``losses``).
            exits: exit name (a backbone output, or ``head_<name>``) -> :class:`ExitHead`,
                shallowest first (see :func:`build_exit_heads`); None/empty = plain training.
            final_classifier: multi-label classifier on the head's features (MEA / SR-L).
            objective: turns :class:`MultiExitOutputs` into loss terms; required with exits.
            eval_exits: in eval(), also return ``sem_seg_<exit>`` for every exit.
            hs3_fuse: :class:`~segdistill.modeling.hs3_fuse.HS3Fuse` over the exits (HS3-Fuse);
                ``sem_seg_head`` must have been built for its widened input.
        """
        super().__init__(backbone=backbone, sem_seg_head=sem_seg_head, pixel_mean=pixel_mean, pixel_std=pixel_std)
        self.exits = nn.ModuleDict(dict(exits or {}))
        self.final_classifier = final_classifier
        self.exit_objective = objective
        self.eval_exits = eval_exits
        self.hs3_fuse = hs3_fuse
        if hs3_fuse is not None:
            if set(hs3_fuse.blocks) != set(self.exits) or any(n.startswith(HEAD_FEATURE_PREFIX) for n in self.exits):
                raise ValueError(
                    f"HS3-Fuse needs one OCR block per exit, on backbone stages only; exits {list(self.exits)}, "
                    f"blocks {list(hs3_fuse.blocks)}."
                )
        if not self.exits:
            return
        if objective is None:
            raise ValueError("A MultiExitSegmentor with exits needs an objective (MODEL.EXITS.MODE 'ds', 'sr', ...).")
        if not all(hasattr(sem_seg_head, a) for a in ("forward_outputs", "predictor", "losses")):
            raise TypeError(
                f"{type(sem_seg_head).__name__} does not expose its features, classifier and losses "
                "(forward_outputs / predictor / losses), which exits need: use one of segdistill's heads "
                "(SegHeadMixin) as MODEL.SEM_SEG_HEAD.NAME, or MODEL.EXITS.MODE 'none'."
            )
        available = {**dict(backbone.output_shape()), **head_feature_shapes(sem_seg_head)}
        missing = [n for n in self.exits if n not in available]
        if missing:
            raise ValueError(
                f"Exits {missing} have no input: the backbone returns {list(backbone.output_shape())} and the head "
                f"exposes {list(head_feature_shapes(sem_seg_head))}. Add the stages to the backbone's out_features."
            )
        strides = {ex.common_stride for ex in self.exits.values()}
        if len(strides) != 1:
            raise ValueError(f"All exits must share one common stride, got {sorted(strides)}.")
        self.common_stride = strides.pop()
        if objective.needs_classifiers:
            lacking = [n for n, ex in self.exits.items() if ex.classifier is None]
            if lacking or final_classifier is None:
                raise ValueError(
                    f"Objective {type(objective).__name__} reads class logits but exits {lacking} "
                    f"{'and the final head ' if final_classifier is None else ''}have no classifier."
                )
        objective.check_exits({n: ex.num_classes for n, ex in self.exits.items()}, sem_seg_head.predictor.out_channels)
        self._uses_head_features = any(n.startswith(HEAD_FEATURE_PREFIX) for n in self.exits)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.EXITS
        mode = c.MODE
        if mode not in exit_modes():
            raise ValueError(f"Unknown MODEL.EXITS.MODE {mode!r}; choose from {list(exit_modes())}.")
        names = list(c.IN_FEATURES) if mode != "none" else []
        backbone = _build_backbone_with_exit_stages(cfg, names)
        fuse = _build_hs3_fuse(cfg, backbone, names) if mode == "hs3" and c.HS3.FUSE.ENABLED else None
        head = build_sem_seg_head(cfg, fuse.widened_shapes(backbone.output_shape()) if fuse else backbone.output_shape())
        ret = {
            "backbone": backbone, "sem_seg_head": head,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
            "eval_exits": c.EVAL_EXITS, "hs3_fuse": fuse,
        }
        if mode == "none":
            return ret
        head_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        exit_classes, objective_args = list(c.NUM_CLASSES) or head_classes, {}
        if mode == "hs3":  # HS3: each exit's class count and class -> cluster table from the clusters file
            from ...hs3.model import hs3_exit_classes

            exit_classes, objective_args["label_luts"] = hs3_exit_classes(cfg, names)
        shapes = {**backbone_stage_shapes(backbone), **dict(backbone.output_shape()), **head_feature_shapes(head)}
        objective = EXIT_OBJECTIVES[mode](cfg, **objective_args)
        exits = build_exit_heads(
            shapes, names, exit_classes, channels=c.CHANNELS, common_stride=c.COMMON_STRIDE,
            norm=c.NORM or resolve_norm(cfg, "head"), with_classifier=objective.needs_classifiers,
            max_downsample=c.MAX_DOWNSAMPLE,
        )
        ret.update(exits=exits, objective=objective)
        if objective.needs_classifiers:
            ret["final_classifier"] = MultiLabelClassifier(
                head_feature_shapes(head)[HEAD_FEATURE_PREFIX + "features"].channels, head_classes
            )
        return ret

    # ------------------------------------------------------------------ training schedule
    def set_training_progress(self, iteration: int, max_iter: int) -> None:
        """Called by TrainingProgressHook before every step (warm-up, schedules)."""
        if self.exit_objective is not None:
            self.exit_objective.set_training_progress(iteration, max_iter)

    # ------------------------------------------------------------------ deployment
    def deploy_state_dict(self) -> Dict[str, torch.Tensor]:
        """The weights of the plain ``SemanticSegmentor``: exits, classifier and objective state removed.

        HS3-Fuse: also ``hs3_fuse.*`` and the exits' parts the fusion reads (reduce, feature,
        segmenter); it loads into the same hs3-fuse config."""
        keep = DEPLOYED_PREFIXES
        if self.hs3_fuse is not None:
            keep = keep + ("hs3_fuse.",) + tuple(f"exits.{n}.{p}." for n in self.exits
                                                 for p in ("reduce", "feature", "segmenter"))
        return {k: v for k, v in self.state_dict().items() if k.startswith(keep)}

    # ------------------------------------------------------------------ forward
    def _images(self, batched_inputs) -> ImageList:
        images = [x["image"].to(self.device) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        return ImageList.from_tensors(images, self.backbone.size_divisibility,
                                      padding_constraints=self.backbone.padding_constraints)

    def _targets(self, batched_inputs) -> torch.Tensor:
        targets = [x["sem_seg"].to(self.device) for x in batched_inputs]
        return ImageList.from_tensors(targets, self.backbone.size_divisibility, self.sem_seg_head.ignore_value,
                                      self.backbone.padding_constraints).tensor

    def _exit_sources(self, features, head_out) -> Dict[str, torch.Tensor]:
        sources = dict(features)
        if head_out is not None:
            sources.update({HEAD_FEATURE_PREFIX + k: v for k, v in head_out.items()})
        return sources

    def forward_outputs(self, features: Dict[str, torch.Tensor], image_hw) -> MultiExitOutputs:
        """Head, exits and classifiers on backbone ``features`` of a (padded) ``image_hw`` input."""
        size = exit_size(image_hw, self.common_stride)
        if self.hs3_fuse is not None:  # HS3-Fuse: exits first, their OCR features widen the head's input
            exits = {n: ex(features[n], size) for n, ex in self.exits.items()}
            head_out = head_outputs(self.sem_seg_head, self.hs3_fuse(features, exits))
        else:
            head_out = head_outputs(self.sem_seg_head, features)
            sources = self._exit_sources(features, head_out)
            exits = {n: ex(sources[n], size) for n, ex in self.exits.items()}
        feats = head_out["features"]
        final = ExitOutput(
            feats, head_out["logits"],
            self.final_classifier(feats) if self.final_classifier is not None else None,
            self.sem_seg_head.common_stride,
        )
        return MultiExitOutputs(exits=exits, final=final, head=head_out, backbone=features,
                                image_size=tuple(image_hw))

    # ------------------------------------------------------------------ distillation taps
    # The tap contract (segdistill.modeling.distill.SegmentorTaps): a distilled multi-exit
    # student keeps its exit losses; as a teacher it runs the deployed path only.
    def tap_shapes(self):
        check_tap_head(self.sem_seg_head, type(self).__name__)
        return {**dict(self.backbone.output_shape()), **head_tap_shapes(self.sem_seg_head)}

    def tap_student(self, batched_inputs, taps) -> StudentTaps:
        images, targets = normalise_inputs(self, batched_inputs)
        features = self.backbone(images.tensor)
        image_hw = tuple(images.tensor.shape[-2:])
        if self.exits and self.training:
            if targets is None:
                raise ValueError("Training inputs need 'sem_seg' labels.")
            outputs = self.forward_outputs(features, image_hw)
            head = outputs.head
            losses = {**self.sem_seg_head.losses(head, targets), **self.exit_objective(outputs, targets)}
        else:
            head = head_outputs(self.sem_seg_head, self._head_input(features, image_hw)[0])
            losses = self.sem_seg_head.losses(head, targets) if self.training and targets is not None else {}
        return StudentTaps(losses, collect_taps(taps, features, head), images, targets)

    def tap_teacher(self, images, taps):
        features = self.backbone(images)
        head = None
        if set(taps) & set(HEAD_TAPS):
            head = head_outputs(self.sem_seg_head, self._head_input(features, tuple(images.shape[-2:]))[0])
        return collect_taps(taps, features, head)

    def tap_classifier(self):
        return self.sem_seg_head.predictor

    def tap_normalization(self):
        return self.pixel_mean, self.pixel_std, self.backbone.size_divisibility

    def _head_input(self, features, image_hw, with_classifier: bool = False):
        """(the head's input features, exit outputs or None): with HS3-Fuse the exits run and
        their fused features widen the input; otherwise the backbone features as they are."""
        if self.hs3_fuse is None:
            return features, None
        size = exit_size(image_hw, self.common_stride)
        exits = {n: ex(features[n], size, with_classifier=with_classifier) for n, ex in self.exits.items()}
        return self.hs3_fuse(features, exits), exits

    def forward(self, batched_inputs):
        if self.hs3_fuse is None and (not self.exits or (not self.training and not self.eval_exits)):
            return super().forward(batched_inputs)
        images = self._images(batched_inputs)
        features = self.backbone(images.tensor)
        image_hw = tuple(images.tensor.shape[-2:])
        if self.training:
            if "sem_seg" not in batched_inputs[0]:
                raise ValueError("Training inputs need 'sem_seg' labels.")
            targets = self._targets(batched_inputs)
            outputs = self.forward_outputs(features, image_hw)
            losses = self.sem_seg_head.losses(outputs.head, targets)
            losses.update(self.exit_objective(outputs, targets))
            return losses
        return self._inference_with_exits(batched_inputs, images, features)

    def _inference_with_exits(self, batched_inputs, images: ImageList, features):
        head_in, fused_exits = self._head_input(features, tuple(images.tensor.shape[-2:]))
        results, _ = self.sem_seg_head(head_in, None)  # the deployed path, exactly as SemanticSegmentor
        exit_logits = {}
        if fused_exits is not None:  # HS3-Fuse: the exits already ran
            raw = {n: o.seg_logits for n, o in fused_exits.items()} if self.eval_exits else {}
        else:
            head_out = head_outputs(self.sem_seg_head, features) if self._uses_head_features else None
            sources = self._exit_sources(features, head_out)
            size = exit_size(images.tensor.shape[-2:], self.common_stride)
            raw = {n: ex(sources[n], size, with_classifier=False).seg_logits for n, ex in self.exits.items()}
        for name, logits in raw.items():
            exit_logits[name] = F.interpolate(logits, size=images.tensor.shape[-2:], mode="bilinear", align_corners=False)
        processed = []
        for i, (inp, image_size) in enumerate(zip(batched_inputs, images.image_sizes)):
            height = inp.get("height", image_size[0])
            width = inp.get("width", image_size[1])
            out = {"sem_seg": sem_seg_postprocess(results[i], image_size, height, width)}
            for name, logits in exit_logits.items():
                out[f"sem_seg_{name}"] = sem_seg_postprocess(logits[i], image_size, height, width)
            processed.append(out)
        return processed
