"""``MultiExitSegmentor``: backbone + final head (the deployed path) + training-only exits.

The final path has exactly detectron2's ``SemanticSegmentor`` parameter names
(``backbone.*``, ``sem_seg_head.*``), so :meth:`deploy_state_dict` (exits, final classifier
and objective state removed) loads into the plain baseline config with no missing or
unexpected keys. In ``eval()`` the exits do not run and the output is the plain
:class:`~segdistill.modeling.meta_arch.SemanticSegmentorAnySize`'s, bit for bit (the head's
logits resized to the padded input size, at any size), unless ``eval_exits`` is set
(``MODEL.EXITS.EVAL_EXITS`` or the attribute): then each exit's prediction comes back too as
``sem_seg_<exit>``, its logits resized (bilinear) to the same padded input size.

In training the backbone, head, exits and final classifier outputs are collected in one
:class:`~segdistill.modeling.exits.MultiExitOutputs`; the objective of ``MODEL.EXITS.MODE``
(``ds``, ``sr``, ``hs3``, or any registered with ``register_exit_objective``) turns it into
named loss terms, next to the head's own ``loss_sem_seg``. Everything mode-specific (each
exit's class count, label tables, an :class:`~segdistill.modeling.exits.ExitFusion`) comes
from the objective class through its written contract (``segdistill.modeling.exits.objective``).

With ``MODEL.EXITS.PIXEL.TRAIN_THRESHOLD`` > 0 (``pixel_train_threshold``) the training forward
is mask-aware (:mod:`segdistill.modeling.exits.pixel_training`): the stages run one by one,
pixels an exit answers confidently are frozen, later stages run masked on the rest, and later
outputs are trained on the copy-aggregated logits, as ``AnytimeSegmentor`` policy ``pixel``
infers; :meth:`MultiExitSegmentor.pixel_run` is that forward.

With a fusion (HS3-Fuse) the exits are part of the deployed model: their fused features widen
the head's input, so they run in ``eval()`` too and :meth:`deploy_state_dict` keeps them
(classifiers dropped); such a checkpoint loads into the same config.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

from ...convert import DeployableModel
from ..backbones.norm import resolve_norm
from ..backbones.stages import backbone_stage_shapes, with_backbone_stages
from ..exits import (
    EXIT_OBJECTIVES, HEAD_FEATURE_PREFIX, ExitFusion, ExitObjective, ExitOutput, MultiExitOutputs,
    MultiLabelClassifier, build_exit_heads, exit_head_kwargs, exit_modes, exit_size,
)
from ..exits.pixel_cells import check_pixel_cell
from ..exits.pixel_training import PixelRun, PixelTraining, check_train_threshold
from ..distill.taps import HEAD_TAPS, StudentTaps, collect_taps, normalise_inputs
from ..heads.base import SegHeadMixin
from .segmentor import SemanticSegmentorAnySize

__all__ = ["MultiExitSegmentor", "exit_modes", "head_feature_shapes"]

DEPLOYED_PREFIXES = ("backbone.", "sem_seg_head.")


def head_feature_shapes(head: nn.Module) -> Dict[str, ShapeSpec]:
    """Head features exits may attach to: ``head_features``, the pre-classifier features of
    every :class:`SegHeadMixin` head (none for other heads)."""
    if not isinstance(head, SegHeadMixin):
        return {}
    return {HEAD_FEATURE_PREFIX + "features": ShapeSpec(channels=head.predictor.in_channels, stride=head.common_stride)}


def _build_backbone_with_exit_stages(cfg, exit_names):
    """Build the backbone, asking it for the exit stages too (they cost nothing)."""
    stages = [n for n in exit_names if not n.startswith(HEAD_FEATURE_PREFIX)]
    with_stages = with_backbone_stages(cfg, stages)
    if with_stages is cfg:
        return build_backbone(cfg)
    try:
        return build_backbone(with_stages)
    except ValueError:
        valid = list(backbone_stage_shapes(build_backbone(cfg)))
        raise ValueError(
            f"Unknown MODEL.EXITS.IN_FEATURES {[n for n in stages if n not in valid]} for backbone "
            f"{cfg.MODEL.TIMM.NAME}; valid choices: {valid} and the head's features {HEAD_FEATURE_PREFIX}features."
        ) from None


@META_ARCH_REGISTRY.register()
class MultiExitSegmentor(SemanticSegmentorAnySize, DeployableModel):
    """SemanticSegmentorAnySize with exits on intermediate stages (deep supervision, Self-Regulation, HS3, ...)."""

    @configurable
    def __init__(
        self,
        *,
        backbone,
        sem_seg_head: nn.Module,
        pixel_mean,
        pixel_std,
        exits: Optional[Dict[str, nn.Module]],
        final_classifier: Optional[nn.Module],
        objective: Optional[ExitObjective],
        eval_exits: bool,
        fusion: Optional[ExitFusion],
        pixel_train_threshold: float = 0.0,
        pixel_cell: int = 1,
    ):
        """
        Args:
            backbone, sem_seg_head, pixel_mean, pixel_std: as ``SemanticSegmentorAnySize`` (the
                head is one of segdistill's heads, :class:`SegHeadMixin`).
            exits: exit name (a backbone output, or ``head_features``) -> exit head
                (:class:`~segdistill.modeling.exits.ExitHeadBase`: ``sr`` or ``rh``),
                shallowest first (see :func:`build_exit_heads`); None/empty = plain training.
            final_classifier: multi-label classifier on the head's features (MEA / SR-L), or None.
            objective: turns :class:`MultiExitOutputs` into loss terms; required with exits.
            eval_exits: in eval(), also return ``sem_seg_<exit>`` for every exit.
            fusion: an :class:`ExitFusion` feeding the exits into the head (HS3-Fuse), or None;
                ``sem_seg_head`` must have been built for its ``head_input_shapes``. Kept as
                the attribute ``fusion.name`` (its parameters' prefix, e.g. ``hs3_fuse``).
            pixel_train_threshold: ``MODEL.EXITS.PIXEL.TRAIN_THRESHOLD``: 0 = off (the plain
                training forward); in (0, 1]: mask-aware training with that top-probability
                threshold after every exit (:class:`PixelTraining`).
            pixel_cell: ``MODEL.EXITS.PIXEL.CELL``: mask-aware training freezes ``c x c``
                cells of the input together (1: each pixel on its own), as policy ``pixel``.
        """
        super().__init__(backbone=backbone, sem_seg_head=sem_seg_head, pixel_mean=pixel_mean, pixel_std=pixel_std)
        self.exits = nn.ModuleDict(dict(exits or {}))
        self.final_classifier = final_classifier
        self.exit_objective = objective
        self.eval_exits = eval_exits
        self._fusion_name = None
        if fusion is not None:
            if set(fusion.exit_names) != set(self.exits) or any(n.startswith(HEAD_FEATURE_PREFIX) for n in self.exits):
                raise ValueError(
                    f"{type(fusion).__name__} needs one block per exit, on backbone stages only; exits "
                    f"{list(self.exits)}, blocks {list(fusion.exit_names)}."
                )
            self._fusion_name = fusion.name
            self.add_module(fusion.name, fusion)
        self.pixel_training: Optional[PixelTraining] = None
        check_pixel_cell(pixel_cell)
        if check_train_threshold(pixel_train_threshold) > 0:
            self.pixel_training = PixelTraining(pixel_train_threshold, pixel_cell)
            self.pixel_training.check(backbone, self.exits, sem_seg_head, fused=fusion is not None)
        if not self.exits:
            return
        if objective is None:
            raise ValueError("A MultiExitSegmentor with exits needs an objective (MODEL.EXITS.MODE 'ds', 'sr', ...).")
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
        objective.set_class_weights(sem_seg_head.class_weights)  # one setting for the head and the exits
        self._uses_head_features = any(n.startswith(HEAD_FEATURE_PREFIX) for n in self.exits)

    @property
    def fusion(self) -> Optional[ExitFusion]:
        """The :class:`ExitFusion` feeding the exits into the head, or None."""
        return getattr(self, self._fusion_name) if self._fusion_name else None

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.EXITS
        mode = c.MODE
        if mode not in exit_modes():
            raise ValueError(f"Unknown MODEL.EXITS.MODE {mode!r}; choose from {list(exit_modes())}.")
        names = list(c.IN_FEATURES) if mode != "none" else []
        backbone = _build_backbone_with_exit_stages(cfg, names)
        objective_cls = EXIT_OBJECTIVES.get(mode)
        fusion = objective_cls.build_fusion(cfg, names, backbone.output_shape()) if objective_cls else None
        head = build_sem_seg_head(cfg, fusion.head_input_shapes(backbone.output_shape()) if fusion
                                  else backbone.output_shape())
        ret = {
            "backbone": backbone, "sem_seg_head": head,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
            "eval_exits": c.EVAL_EXITS, "fusion": fusion, "pixel_train_threshold": c.PIXEL.TRAIN_THRESHOLD,
            "pixel_cell": c.PIXEL.CELL,
            "exits": None, "final_classifier": None, "objective": None,
        }
        if objective_cls is None:
            return ret
        exit_classes = objective_cls.exit_num_classes(cfg, names)
        shapes = {**backbone_stage_shapes(backbone), **dict(backbone.output_shape()), **head_feature_shapes(head)}
        objective = objective_cls(cfg)
        exits = build_exit_heads(
            input_shape=shapes, in_features=names, num_classes=exit_classes, **exit_head_kwargs(cfg),
            common_stride=c.COMMON_STRIDE, norm=resolve_norm(cfg, "head"),
            with_classifier=objective.needs_classifiers, max_downsample=c.MAX_DOWNSAMPLE,
        )
        ret.update(exits=exits, objective=objective)
        if objective.needs_classifiers:
            ret["final_classifier"] = MultiLabelClassifier(
                in_channels=head_feature_shapes(head)[HEAD_FEATURE_PREFIX + "features"].channels,
                num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            )
        return ret

    # ------------------------------------------------------------------ training schedule
    def set_training_progress(self, iteration: int, max_iter: int) -> None:
        """Called by TrainingProgressHook before every step (warm-up, schedules)."""
        if self.exit_objective is not None:
            self.exit_objective.set_training_progress(iteration, max_iter)

    # ------------------------------------------------------------------ deployment
    def deploy_state_dict(self) -> Dict[str, torch.Tensor]:
        """The weights of the plain ``SemanticSegmentorAnySize``: exits, classifier and objective state removed.

        With a fusion (HS3-Fuse): also the fusion's parameters, the exits' parts it reads
        (``ExitFusion.exit_parts``) and the objective's buffers (HS3: the clusters the exits were
        trained on, checked when the checkpoint loads); it loads into the same config."""
        keep = DEPLOYED_PREFIXES
        fusion = self.fusion
        if fusion is not None:
            keep = keep + (f"{fusion.name}.", "exit_objective.") + tuple(
                f"exits.{n}.{p}." for n, ex in self.exits.items() for p in (fusion.exit_parts or ex.inference_parts))
        return {k: v for k, v in self.state_dict().items() if k.startswith(keep)}

    # ------------------------------------------------------------------ forward
    def _images(self, batched_inputs) -> ImageList:
        images = [x["image"].to(self.device) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        return ImageList.from_tensors(images, self.backbone.size_divisibility,
                                      padding_constraints=self.backbone.padding_constraints)

    def _targets(self, batched_inputs) -> torch.Tensor:
        targets = [x["sem_seg"].to(self.device, non_blocking=True).long() for x in batched_inputs]
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
        fusion = self.fusion
        if fusion is not None:  # exits first, their fused features widen the head's input
            exits = {n: ex(features[n], size) for n, ex in self.exits.items()}
            head_out = self.sem_seg_head.forward_outputs(fusion(features, exits))
        else:
            head_out = self.sem_seg_head.forward_outputs(features)
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

    def pixel_run(self, x: torch.Tensor) -> PixelRun:
        """The mask-aware forward of a padded, normalised batch ``x`` (in ``train()`` or ``eval()``;
        needs ``pixel_train_threshold`` > 0): :meth:`PixelTraining.run` on this model's parts."""
        if self.pixel_training is None:
            raise RuntimeError("pixel_run needs mask-aware training: MODEL.EXITS.PIXEL.TRAIN_THRESHOLD > 0.")
        return self.pixel_training.run(backbone=self.backbone, exits=self.exits, head=self.sem_seg_head,
                                       final_classifier=self.final_classifier, x=x)

    def _training_step(self, x: torch.Tensor, targets: torch.Tensor):
        """(backbone features, outputs, losses) of a training step on the padded batch ``x``."""
        if self.pixel_training is None:
            features = self.backbone(x)
            outputs = self.forward_outputs(features, tuple(x.shape[-2:]))
            return features, outputs, self._training_losses(outputs, targets)
        run = self.pixel_run(x)
        head_losses = PixelTraining.head_losses(self.sem_seg_head, run, targets)
        return run.outputs.backbone, run.outputs, self._training_losses(run.outputs, targets, head_losses)

    def _training_losses(self, outputs: MultiExitOutputs, targets: torch.Tensor,
                         head_losses: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """The head's own losses (``loss_sem_seg`` scaled by the objective's ``final_loss_weight``;
        ``head_losses`` when given, else the head's ``losses``) and the objective's terms."""
        losses = self.sem_seg_head.losses(outputs.head, targets) if head_losses is None else head_losses
        weight = self.exit_objective.final_loss_weight
        if weight != 1.0:
            losses["loss_sem_seg"] = weight * losses["loss_sem_seg"]
        losses.update(self.exit_objective(outputs, targets))
        return losses

    # ------------------------------------------------------------------ distillation taps
    # The tap contract (segdistill.modeling.distill.SegmentorTaps, the rest as
    # SemanticSegmentorAnySize): a distilled multi-exit student keeps its exit losses; as a
    # teacher it runs the deployed path only.
    def tap_student(self, batched_inputs, taps) -> StudentTaps:
        images, targets = normalise_inputs(self, batched_inputs)
        image_hw = tuple(images.tensor.shape[-2:])
        if self.exits and self.training:
            if targets is None:
                raise ValueError("Training inputs need 'sem_seg' labels.")
            features, outputs, losses = self._training_step(images.tensor, targets)
            head = outputs.head
        else:
            features = self.backbone(images.tensor)
            head = self.sem_seg_head.forward_outputs(self._head_input(features, image_hw)[0])
            losses = self.sem_seg_head.losses(head, targets) if self.training and targets is not None else {}
        return StudentTaps(losses, collect_taps(taps, features, head), images, targets)

    def tap_teacher(self, images, taps):
        features = self.backbone(images)
        head = None
        if set(taps) & set(HEAD_TAPS):
            head = self.sem_seg_head.forward_outputs(self._head_input(features, tuple(images.shape[-2:]))[0])
        return collect_taps(taps, features, head)

    def _head_input(self, features, image_hw, with_classifier: bool = False):
        """(the head's input features, exit outputs or None): with a fusion the exits run and
        their fused features widen the input; otherwise the backbone features as they are."""
        fusion = self.fusion
        if fusion is None:
            return features, None
        size = exit_size(image_hw, self.common_stride)
        exits = {n: ex(features[n], size, with_classifier=with_classifier) for n, ex in self.exits.items()}
        return fusion(features, exits), exits

    def forward(self, batched_inputs):
        if self.fusion is None and (not self.exits or (not self.training and not self.eval_exits)):
            return super().forward(batched_inputs)
        images = self._images(batched_inputs)
        if self.training:
            if "sem_seg" not in batched_inputs[0]:
                raise ValueError("Training inputs need 'sem_seg' labels.")
            return self._training_step(images.tensor, self._targets(batched_inputs))[2]
        return self._inference_with_exits(batched_inputs, images, self.backbone(images.tensor))

    def _inference_with_exits(self, batched_inputs, images: ImageList, features):
        input_hw = tuple(images.tensor.shape[-2:])
        head_in, fused_exits = self._head_input(features, input_hw)
        # the deployed path, exactly as SemanticSegmentorAnySize
        results, _ = self.sem_seg_head(head_in, None, output_size=input_hw)
        exit_logits = {}
        if fused_exits is not None:  # fusion: the exits already ran
            raw = {n: o.seg_logits for n, o in fused_exits.items()} if self.eval_exits else {}
        else:
            head_out = self.sem_seg_head.forward_outputs(features) if self._uses_head_features else None
            sources = self._exit_sources(features, head_out)
            size = exit_size(input_hw, self.common_stride)
            raw = {n: ex(sources[n], size, with_classifier=False).seg_logits for n, ex in self.exits.items()}
        for name, logits in raw.items():  # as the exits' losses resize them (align_corners False)
            exit_logits[name] = F.interpolate(logits, size=input_hw, mode="bilinear", align_corners=False)
        processed = []
        for i, (inp, image_size) in enumerate(zip(batched_inputs, images.image_sizes)):
            height = inp.get("height", image_size[0])
            width = inp.get("width", image_size[1])
            out = {"sem_seg": sem_seg_postprocess(results[i], image_size, height, width)}
            for name, logits in exit_logits.items():
                out[f"sem_seg_{name}"] = sem_seg_postprocess(logits[i], image_size, height, width)
            processed.append(out)
        return processed
