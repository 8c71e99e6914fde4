"""IFVD: intra-class feature variation distillation (Wang et al., ECCV 2020).

For each image n and class k present in its labels (nearest-resized to the feature map), the
class prototype is the mean feature of the class's pixels, ``c_{n,k} = sum_{i: y_i = k} f_i /
(|{i: y_i = k}| + 1e-6)``. The intra-class feature variation map holds, at every labelled
pixel i, the cosine similarity of its feature to its class's prototype,
``M_{n,i} = cos(f_i, c_{n,y_i})``; an ignore pixel is its own prototype (``M = 1`` in both
maps, as in the authors' code, so it adds 0). The student's map is matched to the teacher's::

    l_ifv = 1 / (N h w) * sum_n sum_i (M^S_{n,i} - M^T_{n,i})^2                     (loss_ifvd)

(the mean over the valid pixels only with ``MODEL.DISTILL.EXCLUDE_IGNORE``). Student and
teacher may have different channel counts (only their maps meet). The paper's full objective
adds the pixel-wise KD (``pd``) and SKD's holistic adversarial term, built in with
``HOLISTIC_WEIGHT > 0`` (``loss_ifvd_holistic``, ``loss_ifvd_discriminator``; the
discriminator of ``skd.py``, settings ``MODEL.DISTILL.HOLISTIC``). Defaults: the authors' code
(YukangWang/IFVD ``options.py``, ``utils/criterion.py`` ``CriterionIFV``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F


from .base import masked_mean, register_distill_loss
from .skd import WithHolisticTerm, holistic_settings

__all__ = ["class_prototypes", "variation_map", "ifv_loss", "IntraClassFeatureVariationDistillation"]


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """N x K x C mean feature of every class in every image (0 for absent classes)."""
    n, c = features.shape[:2]
    flat = features.flatten(2)  # N x C x hw
    y = labels.flatten(1)
    # a comparison, not F.one_hot (which checks its input's range on the host): ignore pixels
    # (outside [0, K)) match no class
    onehot = (y.unsqueeze(-1) == torch.arange(num_classes, device=y.device)).to(flat.dtype)  # N x hw x K
    sums = torch.bmm(flat, onehot)  # N x C x K
    counts = onehot.sum(dim=1)  # N x K
    return (sums / (counts[:, None, :] + 1e-6)).transpose(1, 2)


def variation_map(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """N x h x w cosine similarity of each pixel's feature to its class prototype (1 at ignore pixels)."""
    protos = class_prototypes(features, labels, num_classes)  # N x K x C
    valid = (labels >= 0) & (labels < num_classes)
    index = labels.clamp(min=0, max=num_classes - 1).flatten(1)  # N x hw
    centre = torch.gather(protos, 1, index[..., None].expand(-1, -1, protos.shape[-1]))  # N x hw x C
    centre = centre.transpose(1, 2).reshape(features.shape)
    centre = torch.where(valid[:, None], centre, features)
    return F.cosine_similarity(features, centre, dim=1, eps=1e-8)


def ifv_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, num_classes: int,
             valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared difference of the student's and the teacher's variation maps."""
    m_s = variation_map(student, labels, num_classes)
    m_t = variation_map(teacher, labels, num_classes)
    return masked_mean((m_s - m_t).pow(2), valid)


@register_distill_loss("ifvd")
class IntraClassFeatureVariationDistillation(WithHolisticTerm):
    """IFVD (+ the holistic term); ``MODEL.DISTILL.IFVD`` and ``MODEL.DISTILL.HOLISTIC``."""

    @classmethod
    def add_config(cls, cfg):
        # IFVD (Wang et al., ECCV 2020): intra-class feature variation maps (cosine of each pixel's
        # feature to its class prototype in the image) matched by MSE (loss_ifvd), plus SKD's holistic
        # term with HOLISTIC_WEIGHT > 0. Defaults: the authors' code (YukangWang/IFVD options.py).
        cfg.MODEL.DISTILL.IFVD.WEIGHT = 200.0
        cfg.MODEL.DISTILL.IFVD.STUDENT_TAP = "head_features"
        cfg.MODEL.DISTILL.IFVD.TEACHER_TAP = "head_features"
        cfg.MODEL.DISTILL.IFVD.HOLISTIC_WEIGHT = 0.001
        cls.add_holistic_config(cfg)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.DISTILL.IFVD
        return {"loss_weight": c.WEIGHT, "student_tap": c.STUDENT_TAP, "teacher_tap": c.TEACHER_TAP,
                "holistic_weight": c.HOLISTIC_WEIGHT, "holistic": holistic_settings(cfg)}

    def forward(self, student_features, teacher_features, labels, num_classes: int, valid=None):
        return ifv_loss(student_features, teacher_features, labels, num_classes, valid)

    def distill(self, batch):
        s, t = batch.pair(self.taps[0])
        size = s.shape[-2:]
        out = {"loss_ifvd": self.loss_weight * self(s, t, batch.labels(size), batch.num_classes, batch.valid(size))}
        return {**out, **self.holistic_terms(batch)}
