"""SKD: structured knowledge distillation (Liu et al., CVPR 2019; TPAMI 2020 as "SKD for dense prediction").

**Pair-wise distillation** (SKD section 3.2). The feature map of each image is max-pooled into
M nodes (windows of ``pool_scale`` x the map's size, or of ``pool_kernel`` x ``pool_kernel``
pixels, ``ceil_mode``); with ``a_ij = f_i^T f_j / (||f_i|| ||f_j||)`` the cosine similarity of
nodes i and j::

    l_pa = 1 / N * sum_n 1 / M^2 * sum_i sum_j (a^S_{n,ij} - a^T_{n,ij})^2        (loss_skd_pairwise)

Student and teacher may have different channel counts (only their M x M similarities meet).
``detach_norm`` divides by the norms without gradient through them, as the authors' code
(``utils/utils.py`` ``similarity``) does; off (default) the cosine is differentiated in full.

**Holistic distillation** (SKD section 3.3) is a conditional Wasserstein GAN on the logits: a
discriminator ``D`` (an embedding network: SAGAN-style, four stride-2 4x4 convs with spectral
norm and LeakyReLU 0.1, self-attention after the third and the fourth, a final 4x4 conv; its
input batch-normalised by a plain per-process ``BatchNorm2d``, as the authors' ``preprocess_GAN_mode 1``
in ``networks/sagan_models.py``, whatever ``MODEL.NORM`` says: the gradient penalty differentiates
``D`` twice, and SyncBN has no double backward, so a synchronised norm would crash the first
multi-GPU step) scores a segmentation map,
concatenated with the image (``conditional``, the paper; the authors' code scores the logits
alone). With ``s``/``t`` the student/teacher logits and ``x^ = alpha t + (1 - alpha) s`` for
``alpha ~ U(0, 1)`` per image::

    student:        l_ho = - g_weight * E[D(s)]                                    (loss_skd_holistic)
    discriminator:  l_D  = d_weight * (E[D(s)] - E[D(t)] + gp_weight * E[(||grad_x^ D(x^)||_2 - 1)^2])
                                                                              (loss_skd_discriminator)

(``loss_type="hinge"``, CIRKD/HWD's code: ``l_D = d_weight * (E[relu(1 - D(t))] + E[relu(1 + D(s))])``,
no gradient penalty.)

**How the discriminator trains in the same run.** Both terms are returned by one forward and
summed by the trainer into one backward and one optimizer step, which is exactly the authors'
alternating step (student step, then a discriminator step on the same batch's detached
logits) because neither step reads the other's update:

* ``l_D`` sees the student's logits detached, so it trains ``D`` only;
* ``l_ho`` calls ``D`` through ``torch.func.functional_call`` with ``D``'s parameters
  detached, so it trains the student only;
* in ``l_D``, ``D``'s parameters pass through a gradient-scaling identity (``lr_factor``), so
  the shared SGD step moves ``D`` at ``lr_factor x`` the student's learning rate (the authors
  use 4e-4 for ``D`` against 1e-2 for the student: 0.04). The optimizer's momentum and
  weight decay are the student's (the authors' ``D`` uses SGD in SKD's code, Adam in IFVD's).

``D`` is a submodule of the loss: in DDP (its gradients averaged like the student's), in the
checkpoints, never in the deployed student. The pixel-wise term of the paper is ``pd``.
Defaults: ``MODEL.DISTILL.SKD`` and ``MODEL.DISTILL.HOLISTIC`` (docs/distillation.md).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from .base import DistillLoss, register_distill_loss, run_trainable
from .taps import LOGITS

__all__ = [
    "skd_pool", "pairwise_similarity", "pairwise_loss", "Discriminator", "HolisticDistillation",
    "StructuredKnowledgeDistillation", "HOLISTIC_LOSS_TYPES", "holistic_settings", "WithHolisticTerm",
]

HOLISTIC_LOSS_TYPES = ("wgan-gp", "hinge")
_D_MIN_SIZE = 64  # four stride-2 convs and a 4x4 conv need 64 x 64 inputs


# ------------------------------------------------------------------------------------------
# Pair-wise
# ------------------------------------------------------------------------------------------
def skd_pool(feat: torch.Tensor, pool_scale: float, pool_kernel: int) -> torch.Tensor:
    """Max-pool into nodes: ``pool_kernel`` x ``pool_kernel`` windows, else ``pool_scale`` x the size."""
    h, w = feat.shape[-2:]
    if pool_kernel > 0:
        kernel = (pool_kernel, pool_kernel)
    else:
        kernel = (max(1, int(h * pool_scale)), max(1, int(w * pool_scale)))
    if kernel == (1, 1):
        return feat
    return F.max_pool2d(feat, kernel_size=kernel, stride=kernel, padding=0, ceil_mode=True)


def pairwise_similarity(feat: torch.Tensor, detach_norm: bool) -> torch.Tensor:
    """N x M x M cosine similarities of the M positions of ``feat`` (N x C x h x w)."""
    feat = feat.flatten(2)
    norm = feat.norm(dim=1, keepdim=True) + 1e-8
    if detach_norm:
        norm = norm.detach()
    feat = feat / norm
    return feat.transpose(1, 2) @ feat


def pairwise_loss(student: torch.Tensor, teacher: torch.Tensor, *, pool_scale: float, pool_kernel: int,
                  detach_norm: bool) -> torch.Tensor:
    """SKD's pair-wise term: mean over images of the mean squared difference of the similarities."""
    a_s = pairwise_similarity(skd_pool(student, pool_scale, pool_kernel), detach_norm)
    a_t = pairwise_similarity(skd_pool(teacher, pool_scale, pool_kernel), detach_norm)
    n, m = a_s.shape[:2]
    return (a_s - a_t).pow(2).sum() / (m * m) / n


# ------------------------------------------------------------------------------------------
# Holistic: the discriminator
# ------------------------------------------------------------------------------------------
class SpectralNormConv2d(nn.Conv2d):
    """A conv whose weight is divided by its largest singular value (one power iteration per
    training forward, the estimate ``u`` kept as a buffer), as SAGAN's spectral norm."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        u = torch.randn(self.out_channels)
        self.register_buffer("u", u / (u.norm() + 1e-12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.flatten(1)
        with torch.no_grad():
            v = F.normalize(w.t() @ self.u, dim=0, eps=1e-12)
            u = F.normalize(w @ v, dim=0, eps=1e-12)
            if self.training:
                self.u.copy_(u)
        sigma = torch.dot(u, w @ v)
        return F.conv2d(x, self.weight / sigma, self.bias, self.stride, self.padding)


class SelfAttention(nn.Module):
    """SAGAN's self-attention: ``gamma * attention(x) + x`` (gamma starts at 0)."""

    def __init__(self, channels: int):
        super().__init__()
        self.query = nn.Conv2d(channels, max(1, channels // 8), 1)
        self.key = nn.Conv2d(channels, max(1, channels // 8), 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # N x hw x c'
        k = self.key(x).flatten(2)  # N x c' x hw
        attention = torch.softmax(q @ k, dim=-1)  # N x hw x hw
        out = (self.value(x).flatten(2) @ attention.transpose(1, 2)).view(n, c, h, w)
        return self.gamma * out + x


class Discriminator(nn.Module):
    """SKD's embedding network: score maps (+ image) -> N x 1 x h' x w' scores.

    Its only norm is the input's plain ``BatchNorm2d`` (per-process statistics, as under the
    authors' DataParallel): never SyncBN, which has no double backward for the gradient
    penalty, and never the model's norm (a GroupNorm would not even fit K + 3 channels)."""

    def __init__(self, in_channels: int, *, conv_dim: int):
        super().__init__()
        self.preprocess = nn.BatchNorm2d(in_channels)
        layers, c = [], in_channels
        for i in range(4):
            layers.append(SpectralNormConv2d(c, conv_dim * 2 ** i, 4, 2, 1))
            layers.append(nn.LeakyReLU(0.1))
            c = conv_dim * 2 ** i
            if i >= 2:
                layers.append(SelfAttention(c))
        self.body = nn.Sequential(*layers)
        self.last = nn.Conv2d(c, 1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if min(h, w) < _D_MIN_SIZE:  # tiny maps (tests, the demo): upsampled to the smallest size D takes
            scale = _D_MIN_SIZE / min(h, w)
            x = F.interpolate(x, size=(max(_D_MIN_SIZE, round(h * scale)), max(_D_MIN_SIZE, round(w * scale))),
                              mode="bilinear", align_corners=False)
        return self.last(self.body(self.preprocess(x)))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``factor`` backward."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class HolisticDistillation(nn.Module):
    """The holistic term and its discriminator (see the module docstring)."""

    def __init__(self, num_classes: int, *, g_weight: float, d_weight: float, loss_type: str, gp_weight: float,
                 lr_factor: float, conditional: bool, conv_dim: int):
        super().__init__()
        if loss_type not in HOLISTIC_LOSS_TYPES:
            raise ValueError(
                f"MODEL.DISTILL.HOLISTIC.LOSS_TYPE must be one of {HOLISTIC_LOSS_TYPES}, got {loss_type!r}."
            )
        if lr_factor <= 0:
            raise ValueError(f"MODEL.DISTILL.HOLISTIC.LR_FACTOR must be > 0, got {lr_factor}.")
        self.g_weight, self.d_weight, self.gp_weight = float(g_weight), float(d_weight), float(gp_weight)
        self.loss_type = loss_type
        self.lr_factor = float(lr_factor)
        self.conditional = bool(conditional)
        self.discriminator = Discriminator(num_classes + (3 if conditional else 0), conv_dim=conv_dim)

    def extra_repr(self) -> str:
        return (f"loss_type={self.loss_type!r}, g_weight={self.g_weight}, d_weight={self.d_weight}, "
                f"gp_weight={self.gp_weight}, lr_factor={self.lr_factor}, conditional={self.conditional}")

    def _d(self, x: torch.Tensor, params: Dict[str, torch.Tensor]) -> torch.Tensor:
        return run_trainable(lambda inp: torch.func.functional_call(self.discriminator, params, (inp,)), x)

    def _input(self, logits: torch.Tensor, image: Optional[torch.Tensor]) -> torch.Tensor:
        return logits if image is None else torch.cat([logits, image], dim=1)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                images: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """{"student": the student's term, "discriminator": the discriminator's term}."""
        image = None
        if self.conditional:
            image = F.interpolate(images.to(student_logits.dtype), size=student_logits.shape[-2:], mode="area")
        params = dict(self.discriminator.named_parameters())
        frozen = {k: p.detach() for k, p in params.items()}
        scaled = {k: _ScaleGrad.apply(p, self.lr_factor) for k, p in params.items()}
        # the student's term: gradients to the student only
        g = -self._d(self._input(student_logits, image), frozen).mean()
        # the discriminator's term: gradients to D only
        fake = self._input(student_logits.detach(), image)
        real = self._input(teacher_logits.detach(), image)
        d_fake, d_real = self._d(fake, scaled), self._d(real, scaled)
        if self.loss_type == "hinge":
            d = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
        else:
            alpha = torch.rand(fake.shape[0], 1, 1, 1, device=fake.device, dtype=fake.dtype)
            mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
            with torch.enable_grad():
                grad, = torch.autograd.grad(self._d(mixed, scaled).sum(), mixed, create_graph=True)
            gp = (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
            d = d_fake.mean() - d_real.mean() + self.gp_weight * gp
        return {"student": self.g_weight * g, "discriminator": self.d_weight * d}


class WithHolisticTerm(DistillLoss):
    """What SKD and IFVD share: a loss on one (student tap, teacher tap) pair plus, with
    ``holistic_weight > 0``, the holistic term on the logits (its pair is the last of
    :attr:`taps`), whose discriminator is built at bind time; and its config section
    ``MODEL.DISTILL.HOLISTIC`` (:meth:`add_holistic_config`). Subclasses give ``from_config``."""

    @configurable
    def __init__(self, *, loss_weight: float, student_tap: str, teacher_tap: str, holistic_weight: float,
                 holistic: dict):
        taps = [(student_tap, teacher_tap)] + ([(LOGITS, LOGITS)] if holistic_weight > 0 else [])
        super().__init__(loss_weight=loss_weight, taps=taps)
        self.holistic_weight = float(holistic_weight)
        self.holistic_settings = dict(holistic)
        self.holistic: Optional[HolisticDistillation] = None  # built in bind()

    @staticmethod
    def add_holistic_config(cfg) -> None:
        """``MODEL.DISTILL.HOLISTIC``, added by whichever of SKD and IFVD comes first."""
        if "HOLISTIC" in cfg.MODEL.DISTILL:
            return
        # The holistic distillation's discriminator (SKD section 3.3), shared by SKD and IFVD: trained
        # in the same step as the student, in the same optimizer (its gradient scaled by LR_FACTOR),
        # from the student's detached logits (docs/distillation.md).
        cfg.MODEL.DISTILL.HOLISTIC = CN()
        # "wgan-gp" (paper and SKD/IFVD authors' code) or "hinge" (CIRKD/HWD code, no gradient penalty).
        cfg.MODEL.DISTILL.HOLISTIC.LOSS_TYPE = "wgan-gp"
        cfg.MODEL.DISTILL.HOLISTIC.GP_WEIGHT = 10.0  # lambda_gp
        cfg.MODEL.DISTILL.HOLISTIC.D_WEIGHT = 0.1  # lambda_d: weight of the discriminator's loss
        # Discriminator learning rate / SOLVER.BASE_LR (authors: 4e-4 for D, 1e-2 for the student).
        cfg.MODEL.DISTILL.HOLISTIC.LR_FACTOR = 0.04
        # Condition the discriminator on the image (paper); off: logits alone (the authors' code).
        cfg.MODEL.DISTILL.HOLISTIC.CONDITIONAL = True
        # Width of the first of the discriminator's four stride-2 convs (SAGAN-style, doubling).
        cfg.MODEL.DISTILL.HOLISTIC.CONV_DIM = 64

    def bind(self, student, teacher, *, num_classes):
        w = self.holistic_weight
        self.holistic = HolisticDistillation(num_classes, g_weight=w, **self.holistic_settings) if w > 0 else None

    def trainable_parts(self):
        return {} if self.holistic is None else {"discriminator": self.holistic.discriminator}

    def holistic_terms(self, batch) -> Dict[str, torch.Tensor]:
        """{"loss_<name>_holistic", "loss_<name>_discriminator"} (nothing without the term)."""
        if self.holistic is None:
            return {}
        terms = self.holistic(*batch.pair(self.taps[-1]), batch.images)
        return {f"loss_{self.name}_holistic": terms["student"],
                f"loss_{self.name}_discriminator": terms["discriminator"]}


def holistic_settings(cfg) -> dict:
    """The discriminator's settings of ``MODEL.DISTILL.HOLISTIC`` (shared by SKD and IFVD)."""
    h = cfg.MODEL.DISTILL.HOLISTIC
    return {"d_weight": h.D_WEIGHT, "loss_type": h.LOSS_TYPE, "gp_weight": h.GP_WEIGHT, "lr_factor": h.LR_FACTOR,
            "conditional": h.CONDITIONAL, "conv_dim": h.CONV_DIM}


# ------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------
@register_distill_loss("skd")
class StructuredKnowledgeDistillation(WithHolisticTerm):
    """SKD's pair-wise term (+ the holistic term); ``MODEL.DISTILL.SKD`` and ``MODEL.DISTILL.HOLISTIC``."""

    @configurable
    def __init__(self, *, pairwise_weight: float, student_tap: str, teacher_tap: str, pool_scale: float,
                 pool_kernel: int, detach_norm: bool, holistic_weight: float, holistic: dict):
        super().__init__(loss_weight=pairwise_weight, student_tap=student_tap, teacher_tap=teacher_tap,
                         holistic_weight=holistic_weight, holistic=holistic)
        if pairwise_weight <= 0 and holistic_weight <= 0:
            raise ValueError("SKD with MODEL.DISTILL.SKD.PAIRWISE_WEIGHT and HOLISTIC_WEIGHT both 0 does nothing.")
        if not 0 < pool_scale <= 1 or pool_kernel < 0:
            raise ValueError(f"MODEL.DISTILL.SKD.POOL_SCALE must be in (0, 1] and POOL_KERNEL >= 0, got "
                             f"{pool_scale}, {pool_kernel}.")
        self.pool_scale, self.pool_kernel, self.detach_norm = float(pool_scale), int(pool_kernel), bool(detach_norm)

    @classmethod
    def add_config(cls, cfg):
        # SKD (Liu et al., CVPR 2019): pair-wise similarity distillation on max-pooled features
        # (loss_skd_pairwise) and, with HOLISTIC_WEIGHT > 0, the holistic adversarial term
        # (loss_skd_holistic for the student, loss_skd_discriminator for the discriminator, see
        # MODEL.DISTILL.HOLISTIC). The paper's pixel-wise term is "pd". Defaults: the authors' code
        # (irfanICMLL/structure_knowledge_distillation run_train_val.sh, utils/train_options.py).
        cfg.MODEL.DISTILL.SKD.PAIRWISE_WEIGHT = 0.5
        cfg.MODEL.DISTILL.SKD.STUDENT_TAP = "head_features"
        cfg.MODEL.DISTILL.SKD.TEACHER_TAP = "head_features"
        # Nodes: max-pooling windows of POOL_SCALE x the map's size (0.5: 2x2 nodes, the authors' code)
        # or, when POOL_KERNEL > 0, of POOL_KERNEL x POOL_KERNEL pixels (CIRKD/HWD code: 2).
        cfg.MODEL.DISTILL.SKD.POOL_SCALE = 0.5
        cfg.MODEL.DISTILL.SKD.POOL_KERNEL = 0
        # Divide by the feature norms without gradient through them (the authors' code); off: the
        # paper's cosine similarity, differentiated in full.
        cfg.MODEL.DISTILL.SKD.DETACH_NORM = False
        # Weight of the holistic (adversarial) term for the student; 0 = no discriminator.
        cfg.MODEL.DISTILL.SKD.HOLISTIC_WEIGHT = 0.1
        cls.add_holistic_config(cfg)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.DISTILL.SKD
        return {"pairwise_weight": c.PAIRWISE_WEIGHT, "student_tap": c.STUDENT_TAP, "teacher_tap": c.TEACHER_TAP,
                "pool_scale": c.POOL_SCALE, "pool_kernel": c.POOL_KERNEL, "detach_norm": c.DETACH_NORM,
                "holistic_weight": c.HOLISTIC_WEIGHT, "holistic": holistic_settings(cfg)}

    def forward(self, student_features, teacher_features):
        """The pair-wise term (unweighted)."""
        return pairwise_loss(student_features, teacher_features, pool_scale=self.pool_scale,
                             pool_kernel=self.pool_kernel, detach_norm=self.detach_norm)

    def distill(self, batch):
        out = {"loss_skd_pairwise": self.loss_weight * self(*batch.pair(self.taps[0]))} if self.loss_weight > 0 else {}
        return {**out, **self.holistic_terms(batch)}
