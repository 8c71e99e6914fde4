"""DiffKD: knowledge diffusion for distillation (Huang et al., NeurIPS 2023).

A small noise-predicting network (the *diffusion model*) is trained on the teacher's feature
and then used to denoise the student's feature before the two are compared: the student only
has to match what survives the denoising, not the noise a smaller model cannot avoid.

**Tap.** The student's and the teacher's last backbone stage (``res5`` / ``res5``). The
authors' repository holds classification code (the last stage, ``layer4``, plus the logits), not
segmentation; the first author has since shared a segmentation archive (code, log and checkpoint
of DeepLabV3-R101 -> R18) through a download link in the repository's issue tracker ("Segmentation
Code", 2024-02-21), which could not be read from this machine, so its tap is not known here. The
last stage is the feature that code taps, a dense map in a segmentation
backbone, and the tap of the other 2022-2023 rows built on CIRKD's code (MGD, Af-DCD), which
puts the comparison on equal terms; it is also where the autoencoder pays (2048 channels for
ResNet-101). Any tap pair can be set.

**Parts** (all under ``distill_losses.diffkd``, never in the deployed student):

* ``ae``: a linear autoencoder of the teacher feature, ``E`` (1x1 conv + BN to ``D`` channels)
  and ``Dec`` (1x1 conv back); ``Z = E(T)`` (without gradient) is the target space (``D`` =
  ``AE_CHANNELS``, or half the teacher's channels; ``USE_AE False``: ``Z = T``, ``D = C_T``);
* ``trans``: the student feature to ``D`` channels, ``S' = A(S)`` (1x1 conv with bias);
* ``model``: the noise predictor ``eps_theta(x, t)``: ``x + emb(t)`` (a learned embedding per
  timestep) through two residual bottlenecks (1x1, 3x3, 1x1 with BN; width ``D / 4``) and a
  1x1 conv + BN;
* ``adapter``: the noise adapter, a residual bottleneck (width ``D / 8``), global average
  pooling and a linear map to two logits whose softmax's first entry is ``gamma`` in (0, 1),
  one per image;
* ``proj``: 1x1 conv + BN on the denoised feature.

**Schedule.** ``T = TRAIN_TIMESTEPS`` steps with linear ``beta_t`` from 1e-4 to 0.02 and
``abar_t = prod_{s<=t} (1 - beta_s)`` (the DDPM schedule the authors' scheduler uses).

**Diffusion loss** (loss_diffkd_diff; the paper's loss of the diffusion model trained on the
teacher feature, DDPM's simple objective): per image a timestep ``t ~ U{0..T-1}`` and noise
``eps ~ N(0, I)``::

    L_diff = mean (eps_theta(sqrt(abar_t) Z + sqrt(1 - abar_t) eps, t) - eps)^2

**Denoising the student** (adaptive noise matching, then DDIM). The student feature is taken
as a sample at an intermediate noise level, with noise added in the proportion the adapter
predicts (``eps' ~ N(0, I)``)::

    x = gamma * S' + (1 - gamma) * eps'

and ``STEPS`` deterministic DDIM steps (Song et al., ICLR 2021, Eq. 12 with ``sigma = 0``)
run over the lower half of a ``2 * STEPS``-step schedule, ``t = (STEPS - 1) r, ..., r, 0`` with
``r = T // (2 STEPS)`` (the authors' pipeline: the student is closer to the teacher than pure
noise is)::

    x0 = (x - sqrt(1 - abar_t) eps_theta(x, t)) / sqrt(abar_t)
    x <- sqrt(abar_{t-r}) x0 + sqrt(1 - abar_{t-r}) eps_theta(x, t)      (abar_{<0} = 1)

The refined student feature is ``S_hat = proj(x)``; gradients flow through every step into the
student, ``trans``, the adapter and the diffusion model (as the authors' code).

**KD loss** (loss_diffkd_kd; the paper's distillation loss between the denoised student
feature and the teacher's, mean squared error in the authors' feature setting)::

    L_kd = mean (S_hat - Z)^2

**Autoencoder reconstruction** (loss_diffkd_ae)::

    L_ae = mean (Dec(E(T)) - T)^2

Each term is weighted (``KD_WEIGHT``, ``DIFF_WEIGHT``, ``AE_WEIGHT``, all 1: the authors'
``kd_loss = kd + diff + ae``). The row is ``["pd", "diffkd"]``: the authors' classification
objective also distills the logits (a second, 1x1 diffusion model with KL at temperature 1);
here the logits get the pixel-wise KD (``pd``, temperature 1, weight 1) without the second
diffusion model, one denoiser per row as in the paper's dense-prediction form.

The paper's equations are not cited by number: its text could not be read from this machine.
Searched: the stored public page copies (arXiv, NeurIPS, a NeurIPS 2023 text dump and mirror
pages; each is stored from its beginning only, so they give the abstract and the start of the
introduction), the public-repository index (no copy of the text) and the authors' repositories
(README and code, no formulas). Every term is named by its role and its form taken from the
authors' code, checked line by line (hunto/image_classification_sota
``lib/models/losses/diffkd/diffkd.py`` lines 39-79, ``diffkd_modules.py`` lines 5-153,
``scheduling_ddim.py``; ``kd_loss.py`` lines 75-91 and 148-161): ``inference_steps=5``,
``num_train_timesteps=1000``, ``use_ae=True``, the linear beta schedule, ``eta = 0``; take the
numbers from the paper (arXiv 2305.15712) before citing them. Differences: the time embedding
has ``T`` rows (the code's 1280 rows of which only the first ``T`` are ever read), the DDIM step
uses the predicted noise directly (the code re-derives it from ``x0``, the same value without
clipping). ``AE_CHANNELS 0`` is half the teacher's channels, the default of the code's ``DiffKD``
class (``diffkd.py`` lines 24-25); the code's KD entry point defaults to 1024 (``kd_loss.py``
line 77), as do its ImageNet configs: the same value for a ResNet-101 teacher's 2048 channels.

The random draws (per step: the timesteps, the training noise, the start noise, in that order)
come from a generator on the feature's device seeded by ``SEED``, the process's rank and the
count of steps so far (a buffer): a seeded run is reproducible and ``--resume`` continues it
exactly.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.utils import comm

from .base import CONNECTORS, DistillLoss, build_connector, register_distill_loss, seeded_generator

__all__ = ["DIFFKD_BETAS", "DiffKDBottleneck", "NoisePredictor", "NoiseAdapter", "LinearAutoEncoder",
           "linear_alphas_cumprod", "ddim_timesteps", "ddim_denoise", "KnowledgeDiffusionDistillation"]

DIFFKD_BETAS = (1e-4, 0.02)  # the linear DDPM schedule of the authors' scheduler (beta_start, beta_end)


class DiffKDBottleneck(nn.Module):
    """Residual bottleneck: 1x1 to ``C / reduction``, 3x3, 1x1 back, each with BN (ReLU between)."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        mid = max(1, channels // reduction)
        self.block = nn.Sequential(
            nn.Conv2d(channels, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, channels, 1), nn.BatchNorm2d(channels),
        )

    def forward(self, x):
        return self.block(x) + x


class NoisePredictor(nn.Module):
    """``eps_theta(x, t)``: the light diffusion model (two bottlenecks and a 1x1 conv + BN on
    ``x`` plus a learned embedding of the timestep)."""

    def __init__(self, channels: int, timesteps: int):
        super().__init__()
        self.time_embedding = nn.Embedding(timesteps, channels)
        self.pred = nn.Sequential(DiffKDBottleneck(channels, 4), DiffKDBottleneck(channels, 4),
                                  nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``eps_theta(x, t)`` (``diffkd_modules.py`` lines 55-61); ``t``: one timestep (0-d) or one per image (N)."""
        emb = self.time_embedding(t.long()).to(x.dtype)
        emb = emb.view(1, -1, 1, 1) if emb.dim() == 1 else emb[:, :, None, None]
        return self.pred(x + emb)


class NoiseAdapter(nn.Module):
    """``gamma`` per image in (0, 1): how much of the student feature the start sample keeps, the
    adaptive noise matching (``diffkd_modules.py`` lines 5-26, used at lines 113-116; the paper's
    equation number not read, see the module docstring)."""

    def __init__(self, channels: int):
        super().__init__()
        self.feat = nn.Sequential(DiffKDBottleneck(channels, 8), nn.AdaptiveAvgPool2d(1))
        self.pred = nn.Linear(channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pred(self.feat(x).flatten(1)).softmax(1)[:, 0]


class LinearAutoEncoder(nn.Module):
    """``E``: 1x1 conv + BN to the latent channels; ``Dec``: 1x1 conv back."""

    def __init__(self, channels: int, latent: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(channels, latent, 1), nn.BatchNorm2d(latent))
        self.decoder = nn.Conv2d(latent, channels, 1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(x)
        return hidden, self.decoder(hidden)


def linear_alphas_cumprod(timesteps: int, beta_start: float = DIFFKD_BETAS[0],
                          beta_end: float = DIFFKD_BETAS[1]) -> torch.Tensor:
    """``abar_t = prod_{s <= t} (1 - beta_s)``, ``beta`` linear over ``timesteps`` (float64)."""
    betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(train_timesteps: int, steps: int) -> Tuple[List[int], int]:
    """The timesteps the student is denoised through, and the stride ``r`` between them: the
    last ``steps`` of a ``2 * steps``-step DDIM schedule, ``(steps - 1) r, ..., r, 0``."""
    r = train_timesteps // (2 * steps)
    return [i * r for i in reversed(range(steps))], r


def ddim_denoise(model: nn.Module, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: List[int],
                 stride: int) -> torch.Tensor:
    """Deterministic DDIM (``sigma = 0``; Song et al., ICLR 2021, Eq. 12) from ``x`` through ``timesteps``,
    ``abar_{<0} = 1`` (``diffkd_modules.py`` lines 120-131, ``scheduling_ddim.py`` ``step``)."""
    for t in timesteps:
        a_t = alphas_cumprod[t].to(x.dtype)
        a_prev = alphas_cumprod[t - stride].to(x.dtype) if t - stride >= 0 else x.new_tensor(1.0)
        eps = model(x, torch.tensor(t, device=x.device))
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


@register_distill_loss("diffkd")
class KnowledgeDiffusionDistillation(DistillLoss):
    """DiffKD; ``MODEL.DISTILL.DIFFKD``."""

    @configurable
    def __init__(self, *, student_tap: str, teacher_tap: str, kd_weight: float, diff_weight: float,
                 ae_weight: float, use_ae: bool, ae_channels: int, steps: int, train_timesteps: int,
                 connector: str, seed: int):
        super().__init__(loss_weight=kd_weight, taps=[(student_tap, teacher_tap)])
        key = "MODEL.DISTILL.DIFFKD"
        if steps < 1:
            raise ValueError(f"{key}.STEPS must be >= 1, got {steps}.")
        if train_timesteps < 2 * steps:
            raise ValueError(f"{key}.TRAIN_TIMESTEPS ({train_timesteps}) must be at least 2 x STEPS ({2 * steps}).")
        if ae_channels < 0:
            raise ValueError(f"{key}.AE_CHANNELS must be >= 0 (0: half the teacher tap's channels), got {ae_channels}.")
        if connector not in CONNECTORS:
            raise ValueError(f"{key}.CONNECTOR must be one of {CONNECTORS}, got {connector!r}.")
        self.diff_weight, self.ae_weight = float(diff_weight), float(ae_weight)
        self.use_ae, self.ae_channels = bool(use_ae), int(ae_channels)
        self.steps, self.train_timesteps = int(steps), int(train_timesteps)
        self.connector_kind = connector
        self.seed = int(seed)
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))  # steps drawn so far (seeds the next)
        # a function of the config: moves with the module, never saved
        self.register_buffer("alphas_cumprod", linear_alphas_cumprod(self.train_timesteps), persistent=False)
        self.ae: Optional[LinearAutoEncoder] = None  # built in bind()
        self.trans: Optional[nn.Module] = None
        self.model: Optional[NoisePredictor] = None
        self.adapter: Optional[NoiseAdapter] = None
        self.proj: Optional[nn.Module] = None

    @classmethod
    def add_config(cls, cfg):
        # DiffKD (Huang et al., NeurIPS 2023): a light diffusion model trained on the (autoencoded)
        # teacher feature (loss_diffkd_diff) denoises the student's feature, which then mimics the
        # teacher's (loss_diffkd_kd); the autoencoder learns to reconstruct the teacher feature
        # (loss_diffkd_ae). The row adds "pd" on the logits. Defaults: the authors' code
        # (hunto/image_classification_sota lib/models/losses/diffkd/).
        c = cfg.MODEL.DISTILL.DIFFKD
        c.STUDENT_TAP = "res5"
        c.TEACHER_TAP = "res5"
        c.KD_WEIGHT = 1.0
        c.DIFF_WEIGHT = 1.0
        c.AE_WEIGHT = 1.0
        # compress the teacher feature to AE_CHANNELS (0: half its channels) and diffuse there
        c.USE_AE = True
        c.AE_CHANNELS = 0
        # DDIM steps denoising the student; timesteps of the training schedule (linear betas 1e-4 .. 0.02)
        c.STEPS = 5
        c.TRAIN_TIMESTEPS = 1000
        # student -> diffusion channels (the authors' 1x1 conv with bias, built even when the counts match)
        c.CONNECTOR = "conv1x1_bias"
        # seed of the timesteps and noises (with the process's rank and the steps so far, saved with the checkpoint)
        c.SEED = 0

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.DISTILL.DIFFKD
        return {"student_tap": c.STUDENT_TAP, "teacher_tap": c.TEACHER_TAP, "kd_weight": c.KD_WEIGHT,
                "diff_weight": c.DIFF_WEIGHT, "ae_weight": c.AE_WEIGHT, "use_ae": c.USE_AE,
                "ae_channels": c.AE_CHANNELS, "steps": c.STEPS, "train_timesteps": c.TRAIN_TIMESTEPS,
                "connector": c.CONNECTOR, "seed": c.SEED}

    def bind(self, student, teacher, *, num_classes):
        p = self.taps[0]
        cs, ct = student[p.student].channels, teacher[p.teacher].channels
        latent = ct
        if self.use_ae:
            latent = self.ae_channels or max(1, ct // 2)
            self.ae = LinearAutoEncoder(ct, latent)
        self.trans = build_connector(self.connector_kind, cs, latent, owner="MODEL.DISTILL.DIFFKD.CONNECTOR")
        self.model = NoisePredictor(latent, self.train_timesteps)
        self.adapter = NoiseAdapter(latent)
        self.proj = nn.Sequential(nn.Conv2d(latent, latent, 1), nn.BatchNorm2d(latent))

    def generator(self, device) -> torch.Generator:
        """This step's generator, on ``device``: the seed, the process's rank and the steps so far."""
        return seeded_generator(self.seed, comm.get_rank(), self.draws, device)

    def draw(self, n: int, shape, *, device, dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(timesteps N, training noise, start noise), each N x ``shape`` noise standard normal."""
        g = self.generator(device)
        self.draws += 1
        timesteps = torch.randint(0, self.train_timesteps, (n,), generator=g, device=device)
        noise = torch.randn((n, *shape), generator=g, device=device, dtype=dtype)
        start = torch.randn((n, *shape), generator=g, device=device, dtype=dtype)
        return timesteps, noise, start

    def target(self, teacher_feature: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(``Z``, the target space without gradient; ``L_ae`` or None without the autoencoder)."""
        if self.ae is None:
            return teacher_feature.detach(), None
        hidden, rec = self.ae(teacher_feature.detach())
        return hidden.detach(), F.mse_loss(rec, teacher_feature.detach())

    def diffusion_loss(self, z: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``L_diff`` (module docstring), DDPM's simple objective on the target space (``diffkd.py``
        lines 67-79; the paper's equation number not read, see the module docstring)."""
        a = self.alphas_cumprod.to(z.dtype)[timesteps][:, None, None, None]
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        return F.mse_loss(self.model(noisy, timesteps), noise)

    def denoise(self, student_feature: torch.Tensor, start_noise: torch.Tensor) -> torch.Tensor:
        """``S_hat``: the student feature, mapped, noised by the adapter's ``gamma``, DDIM-denoised, projected."""
        s = self.trans(student_feature)
        gamma = self.adapter(s)[:, None, None, None]
        x = gamma * s + (1 - gamma) * start_noise
        timesteps, stride = ddim_timesteps(self.train_timesteps, self.steps)
        return self.proj(ddim_denoise(self.model, x, self.alphas_cumprod, timesteps, stride))

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor, timesteps: torch.Tensor,
                noise: torch.Tensor, start_noise: torch.Tensor):
        """(L_kd, L_diff, L_ae or None), unweighted, with the given draws (``diffkd.py`` lines 39-65 and
        ``kd_loss.py`` lines 136-161: ``L_kd`` the MSE of the denoised student and ``Z``)."""
        z, ae = self.target(teacher_feature)
        kd = F.mse_loss(self.denoise(student_feature, start_noise), z)
        return kd, self.diffusion_loss(z, timesteps, noise), ae

    def distill(self, batch):
        if self.model is None:
            raise RuntimeError("Distillation loss 'diffkd' was not bound to its taps' shapes.")
        s, t = batch.pair(self.taps[0])
        n, _, h, w = s.shape
        latent = self.model.time_embedding.embedding_dim
        kd, diff, ae = self(s, t, *self.draw(n, (latent, h, w), device=s.device, dtype=s.dtype))
        out = {"loss_diffkd_kd": self.loss_weight * kd, "loss_diffkd_diff": self.diff_weight * diff}
        if ae is not None:
            out["loss_diffkd_ae"] = self.ae_weight * ae
        return out

    def extra_repr(self) -> str:
        return (f"diff_weight={self.diff_weight}, ae_weight={self.ae_weight}, use_ae={self.use_ae}, "
                f"ae_channels={self.ae_channels}, steps={self.steps}, train_timesteps={self.train_timesteps}, "
                + super().extra_repr())
