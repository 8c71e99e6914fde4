"""Taps: the named outputs a segmentor gives to distillation, and the contract that serves them.

A *tap* is a named tensor a distillation loss reads from the student or the teacher, with a
shape (:class:`~detectron2.layers.ShapeSpec`: channels and stride) known when the model is
built:

* ``logits``: the final head's logits before upsampling, N x K x h x w (K classes);
* ``head_features``: the head's pre-classifier features, N x A x h x w
  (``predictor(head_features) == logits``);
* any backbone stage the backbone returns (``output_shape()``): ``res2`` .. ``res5`` of
  ResNet / MobileNetV2, HRNet's ``stage2_b0`` ... (docs/architecture.md, "Stage names").

The contract is :class:`SegmentorTaps`. The project's meta-architectures
(``SemanticSegmentorAnySize``, what the baseline and teacher configs build, and
``MultiExitSegmentor``) implement it themselves; detectron2's plain ``SemanticSegmentor`` is
served by the adapter :class:`SemanticSegmentorTaps`, chosen by type when the distiller is
built (:func:`segmentor_taps`; other segmentor classes register theirs with
:func:`register_tap_adapter`). A segmentor that neither implements the contract nor has an
adapter is an error at build time naming the class.

Every implementation needs the head to follow segdistill's head contract
(:class:`~segdistill.modeling.heads.SegHeadMixin`: ``forward_outputs`` and a 1x1
``predictor``), which is what exposes ``head_features`` and the classifier; they check it
with :func:`~segdistill.modeling.heads.check_seg_head` when they are built, and then call
``forward_outputs`` directly. The backbone stages a tap names are added to the backbone's
outputs by :func:`~segdistill.modeling.backbones.stages.with_backbone_stages`.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Collection, Dict, List, Optional, Tuple, Type

import torch
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import SemanticSegmentor
from detectron2.structures import ImageList

from ..heads.base import SegHeadMixin, check_seg_head

__all__ = [
    "LOGITS", "HEAD_FEATURES", "HEAD_TAPS", "SegmentorTaps", "StudentTaps", "SemanticSegmentorTaps",
    "segmentor_taps", "register_tap_adapter", "head_tap_shapes", "collect_taps", "backbone_stage_taps",
    "segmentor_tap_shapes", "segmentor_tap_student", "segmentor_tap_teacher",
]

LOGITS = "logits"
HEAD_FEATURES = "head_features"
HEAD_TAPS = (LOGITS, HEAD_FEATURES)


@dataclass
class StudentTaps:
    """One training forward of the student: its own losses, the requested taps, its input."""

    losses: Dict[str, torch.Tensor]  # the student's own loss_* terms (training mode)
    taps: Dict[str, torch.Tensor]  # the requested taps
    images: ImageList  # the normalised, padded batch the backbone saw
    targets: Optional[torch.Tensor]  # N x H x W padded labels (ignore value outside the images), or None


class SegmentorTaps(abc.ABC):
    """The tap contract: what a segmentor gives to distillation, as student or as teacher.

    Shapes are known at build time (:meth:`tap_shapes`); :meth:`tap_student` runs one training
    forward of a student (its own losses included, so that a multi-exit student keeps its exit
    losses); :meth:`tap_teacher` runs a teacher only as far as the requested taps need (the
    backbone alone when no head tap is requested). The distiller calls nothing else.
    """

    @abc.abstractmethod
    def tap_shapes(self) -> Dict[str, ShapeSpec]:
        """Every tap this segmentor can give, with its channels and stride."""

    @abc.abstractmethod
    def tap_student(self, batched_inputs: List[dict], taps: Collection[str]) -> StudentTaps:
        """One training forward on detectron2 inputs; ``taps`` are names from :meth:`tap_shapes`."""

    @abc.abstractmethod
    def tap_teacher(self, images: torch.Tensor, taps: Collection[str]) -> Dict[str, torch.Tensor]:
        """The taps on an already normalised and padded N x 3 x H x W batch (no losses)."""

    @abc.abstractmethod
    def tap_classifier(self) -> nn.Conv2d:
        """The head's 1x1 classifier: ``tap_classifier()(head_features) == logits``."""

    @abc.abstractmethod
    def tap_normalization(self) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """(pixel mean, pixel std, size divisibility) of the inputs :meth:`tap_teacher` expects."""

    @abc.abstractmethod
    def deploy_state_dict(self) -> Dict[str, torch.Tensor]:
        """The weights of the deployed segmentor (what the student-only export writes)."""

    @abc.abstractmethod
    def set_training_progress(self, iteration: int, max_iter: int) -> None:
        """Called before every training step (the segmentor's own schedules)."""


# ------------------------------------------------------------------------------------------
# Helpers shared by the implementations
# ------------------------------------------------------------------------------------------
def head_tap_shapes(head: SegHeadMixin) -> Dict[str, ShapeSpec]:
    """``logits`` and ``head_features`` of a head with segdistill's head contract."""
    predictor = head.predictor
    return {
        LOGITS: ShapeSpec(channels=predictor.out_channels, stride=head.common_stride),
        HEAD_FEATURES: ShapeSpec(channels=predictor.in_channels, stride=head.common_stride),
    }


def collect_taps(taps: Collection[str], backbone_features: Dict[str, torch.Tensor],
                 head_outputs: Optional[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The requested taps out of the backbone's features and the head's ``forward_outputs``."""
    out = {}
    for name in taps:
        if name == LOGITS:
            out[name] = head_outputs["logits"]
        elif name == HEAD_FEATURES:
            out[name] = head_outputs["features"]
        else:
            out[name] = backbone_features[name]
    return out


def backbone_stage_taps(taps: Collection[str]) -> List[str]:
    """The taps that are backbone stages (everything but the head's taps), in order."""
    return [t for t in dict.fromkeys(taps) if t not in HEAD_TAPS]


def _normalise(model: SemanticSegmentor, batched_inputs: List[dict]) -> ImageList:
    images = [(x["image"].to(model.device, non_blocking=True) - model.pixel_mean) / model.pixel_std
              for x in batched_inputs]
    return ImageList.from_tensors(images, model.backbone.size_divisibility,
                                  padding_constraints=model.backbone.padding_constraints)


def padded_targets(model: SemanticSegmentor, batched_inputs: List[dict]) -> Optional[torch.Tensor]:
    """N x H x W labels padded like the images (ignore value outside), or None without labels."""
    if "sem_seg" not in batched_inputs[0]:
        return None
    # the mapper keeps labels small (uint8) for the copy; the losses index with int64
    targets = [x["sem_seg"].to(model.device, non_blocking=True).long() for x in batched_inputs]
    return ImageList.from_tensors(targets, model.backbone.size_divisibility, model.sem_seg_head.ignore_value,
                                  model.backbone.padding_constraints).tensor


def normalise_inputs(model: SemanticSegmentor, batched_inputs: List[dict]) -> Tuple[ImageList, Optional[torch.Tensor]]:
    """(normalised padded images, padded targets or None), as ``SemanticSegmentor.forward`` does."""
    return _normalise(model, batched_inputs), padded_targets(model, batched_inputs)


# ------------------------------------------------------------------------------------------
# detectron2's SemanticSegmentor
# ------------------------------------------------------------------------------------------
def segmentor_tap_shapes(model: SemanticSegmentor) -> Dict[str, ShapeSpec]:
    """The taps of a backbone + head segmentor (detectron2's ``SemanticSegmentor`` and the
    project's ``SemanticSegmentorAnySize``): the backbone's outputs and the head's taps."""
    return {**dict(model.backbone.output_shape()), **head_tap_shapes(model.sem_seg_head)}


def segmentor_tap_student(model: SemanticSegmentor, batched_inputs, taps) -> StudentTaps:
    """A backbone + head segmentor's training step as its forward takes it (the head's losses
    on the padded targets), with ``taps`` collected on the way."""
    images, targets = normalise_inputs(model, batched_inputs)
    features = model.backbone(images.tensor)
    head_out = model.sem_seg_head.forward_outputs(features)
    losses = model.sem_seg_head.losses(head_out, targets) if model.training and targets is not None else {}
    return StudentTaps(losses, collect_taps(taps, features, head_out), images, targets)


def segmentor_tap_teacher(model: SemanticSegmentor, images: torch.Tensor, taps) -> Dict[str, torch.Tensor]:
    """``taps`` of a backbone + head segmentor on already normalised ``images`` (the head runs
    only when a head tap is asked for)."""
    features = model.backbone(images)
    head_out = model.sem_seg_head.forward_outputs(features) if set(taps) & set(HEAD_TAPS) else None
    return collect_taps(taps, features, head_out)


class SemanticSegmentorTaps(SegmentorTaps):
    """The tap contract for detectron2's ``SemanticSegmentor`` (the same steps as its forward).

    Refuses, at construction, a subclass that overrides ``forward`` (its own training losses
    would be lost: such a class implements :class:`SegmentorTaps` itself) and a head without
    segdistill's head contract.
    """

    def __init__(self, model: SemanticSegmentor):
        if type(model).forward is not SemanticSegmentor.forward:
            raise TypeError(
                f"{type(model).__name__} overrides SemanticSegmentor.forward, so distilling it through "
                "SemanticSegmentor's steps would drop its own losses: implement segdistill's tap contract "
                "(segdistill.modeling.distill.SegmentorTaps) in the class, as MultiExitSegmentor does."
            )
        check_seg_head(model.sem_seg_head, f"{type(model).__name__} cannot give distillation taps")
        self.model = model

    def tap_shapes(self) -> Dict[str, ShapeSpec]:
        return segmentor_tap_shapes(self.model)

    def tap_student(self, batched_inputs, taps) -> StudentTaps:
        return segmentor_tap_student(self.model, batched_inputs, taps)

    def tap_teacher(self, images, taps) -> Dict[str, torch.Tensor]:
        return segmentor_tap_teacher(self.model, images, taps)

    def tap_classifier(self) -> nn.Conv2d:
        return self.model.sem_seg_head.predictor

    def tap_normalization(self):
        m = self.model
        return m.pixel_mean, m.pixel_std, m.backbone.size_divisibility

    def deploy_state_dict(self):
        return dict(self.model.state_dict())

    def set_training_progress(self, iteration: int, max_iter: int) -> None:
        pass  # a plain SemanticSegmentor has no schedule of its own


# ------------------------------------------------------------------------------------------
# Selection by type
# ------------------------------------------------------------------------------------------
_ADAPTERS: Dict[type, Callable[[nn.Module], SegmentorTaps]] = {SemanticSegmentor: SemanticSegmentorTaps}


def register_tap_adapter(model_class: Type[nn.Module]):
    """Class decorator: serve the tap contract for ``model_class`` (and its subclasses) through
    the decorated ``SegmentorTaps`` class, built as ``adapter(model)``."""

    def deco(adapter):
        _ADAPTERS[model_class] = adapter
        return adapter

    return deco


def segmentor_taps(model: nn.Module) -> SegmentorTaps:
    """The tap contract of ``model``: itself when it implements it, else its class's adapter."""
    if isinstance(model, SegmentorTaps):
        return model
    for cls in type(model).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls](model)
    raise TypeError(
        f"{type(model).__name__} cannot be distilled: it neither implements segdistill's tap contract "
        f"(segdistill.modeling.distill.SegmentorTaps) nor is one of {sorted(c.__name__ for c in _ADAPTERS)}."
    )
