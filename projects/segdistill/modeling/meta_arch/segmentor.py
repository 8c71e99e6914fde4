"""``SemanticSegmentorAnySize``: detectron2's ``SemanticSegmentor`` that gives its head the input size.

detectron2's ``SemanticSegmentor`` calls ``head(features, targets)``; its heads upsample the
logits by their stride and ``sem_seg_postprocess`` crops the padding. Where the input is not a
multiple of the stride, the logits then cover more than the image and the crop keeps a part
of them (each feature keeps the input rows it was computed over), while mmsegmentation and
CIRKD resize the logits to the input size. This meta-architecture is the same model (the
same parameter names, the same checkpoints) that passes the size of the (padded) tensor that
entered the backbone to the head at inference (``output_size``, the head contract of
:class:`~segdistill.modeling.heads.SegHeadMixin`), so that the head can apply either rule:
its ``MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE`` ("stride", the default: detectron2's output bit for
bit; "input": mmsegmentation's). ``sem_seg_postprocess`` then crops the padding and resizes
to the requested output size as before. At sizes that are multiples of the head's stride
both rules give the same output bit for bit (tested). Training is detectron2's: the head's
losses on the padded targets.

It implements the distillation tap contract itself (:class:`~segdistill.modeling.distill.SegmentorTaps`),
as student and as teacher, and :class:`~segdistill.modeling.meta_arch.MultiExitSegmentor`
builds on it.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

from ..distill.taps import (SegmentorTaps, StudentTaps, normalise_inputs, segmentor_tap_shapes, segmentor_tap_student,
                           segmentor_tap_teacher)
from ..heads.base import check_seg_head

__all__ = ["SemanticSegmentorAnySize", "postprocess_sem_seg"]


def postprocess_sem_seg(logits: torch.Tensor, batched_inputs: List[dict], images: ImageList) -> List[torch.Tensor]:
    """Each image's logits (N x K x H x W at the padded input size) cropped to the image and
    resized to its requested ``height`` x ``width``, as detectron2's ``SemanticSegmentor`` does."""
    out = []
    for i, (inp, image_size) in enumerate(zip(batched_inputs, images.image_sizes)):
        out.append(sem_seg_postprocess(logits[i], image_size, inp.get("height", image_size[0]),
                                       inp.get("width", image_size[1])))
    return out


@META_ARCH_REGISTRY.register()
class SemanticSegmentorAnySize(SemanticSegmentor, SegmentorTaps):
    """``SemanticSegmentor`` that passes the input size to its head (see the module docstring)."""

    @configurable
    def __init__(self, *, backbone, sem_seg_head: nn.Module, pixel_mean, pixel_std):
        """
        Args: as ``SemanticSegmentor``; the head must follow segdistill's head contract
            (:class:`SegHeadMixin`), which takes the output size.
        """
        super().__init__(backbone=backbone, sem_seg_head=sem_seg_head, pixel_mean=pixel_mean, pixel_std=pixel_std)
        check_seg_head(
            sem_seg_head, f"{type(self).__name__} passes the input size to its head",
            ", or MODEL.META_ARCHITECTURE 'SemanticSegmentor' (detectron2's, whose heads upsample by their stride)",
        )

    def forward(self, batched_inputs):
        """detectron2's ``SemanticSegmentor.forward``, with the input size passed to the head at inference."""
        images, targets = normalise_inputs(self, batched_inputs)
        features = self.backbone(images.tensor)
        if self.training:
            if targets is None:
                raise ValueError("Training inputs need 'sem_seg' labels.")
            return self.sem_seg_head(features, targets)[1]
        logits = self.sem_seg_head(features, None, output_size=tuple(images.tensor.shape[-2:]))[0]
        return [{"sem_seg": r} for r in postprocess_sem_seg(logits, batched_inputs, images)]

    # ------------------------------------------------------------------ distillation taps
    def tap_shapes(self) -> Dict[str, ShapeSpec]:
        return segmentor_tap_shapes(self)

    def tap_student(self, batched_inputs, taps) -> StudentTaps:
        return segmentor_tap_student(self, batched_inputs, taps)

    def tap_teacher(self, images, taps) -> Dict[str, torch.Tensor]:
        return segmentor_tap_teacher(self, images, taps)

    def tap_classifier(self) -> nn.Conv2d:
        return self.sem_seg_head.predictor

    def tap_normalization(self):
        return self.pixel_mean, self.pixel_std, self.backbone.size_divisibility

    def deploy_state_dict(self) -> Dict[str, torch.Tensor]:
        return dict(self.state_dict())

    def set_training_progress(self, iteration: int, max_iter: int) -> None:
        pass  # no schedule of its own
