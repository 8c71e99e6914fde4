"""CIRKD: cross-image relational knowledge distillation (Yang et al., CVPR 2022).

Embeddings are L2-normalised along the channels: the teacher's ``f^T`` and the student's
``f^S``; for the memory terms the student's go first through a trainable projection head
``g`` (1x1 conv, norm, ReLU, 1x1 conv: student channels -> teacher channels), ``z = g(f^S)``.

**Pixel-to-pixel across the images of the batch** (loss_cirkd_batch). For every ordered pair
of images (a, b) of the batch, pixel i of a gets a distribution over the pixels j of b,
``p_{ab,i}(j) = softmax_j(f_{a,i} . f_{b,j} / tau)``, and::

    l_batch = 1 / B^2 * sum_{a,b} 1 / (h w) * sum_i KL(p^T_{ab,i} || p^S_{ab,i})

Each process uses its own images (the authors' code, where the gather is commented out; the
default). With ``gather`` the batch is the global one (the paper's definition): each process
takes its own images as ``a`` and every process's as ``b`` (gathered with their gradient,
which flows back to the process that owns them), and divides by ``B_local * B_global``, so
the gradients DDP averages are those of ``l_batch`` over the global batch. Maps of 256 x 256
or more are average-pooled 4 x 4 first, as in the authors' code. The term is computed by
chunks of rows, each checkpointed, so its memory does not grow with the batch
(:func:`batch_relation_loss`).

**Pixel-to-pixel and pixel-to-region against memories** (loss_cirkd_pixel_memory,
loss_cirkd_region_memory). Two class-wise queues of teacher embeddings, filled from the
global batch (gathered from every process) *before* each step's loss, as the authors' code:

* region memory (K x R x D): for each image and each class k in it, the normalised mean of the
  class's teacher embeddings enters class k's queue at its pointer (modulo R);
* pixel memory (K x P x D): ``min(n_k, update_freq)`` of the class's n_k pixels, drawn at
  random (``variant="paper"``; ``"code"`` draws among the first n_k pixels of the image in
  raster order, as the authors' code indexes them), enter class k's queue at its pointer; when
  they would reach the end, the last ``min(n_k, update_freq)`` entries are overwritten and the
  pointer returns to 0 (the authors' rule).

Each step contrasts with ``contrast_size // K + 1`` entries per class (the same random entries
for every class): for every labelled pixel i of the local batch, with ``X`` the contrasted
entries, ``q^T_i = softmax(f^T_i . X / tau)`` and ``q^S_i = softmax(z_i . X / tau)`` (each at
``kd_temperature``), and ``l_memory = kd_T^2 * mean_i KL(q^T_i || q^S_i)``.

The memories, their pointers and the draw counter are buffers: saved with the checkpoint,
restored by ``--resume``, and identical on every process (same gathered data, same seeded
draws). Defaults: the authors' code (winycg/CIRKD ``train_cirkd.py``,
``losses/cirkd_mini_batch.py``, ``losses/cirkd_memory.py``); the paper's full objective adds
the pixel-wise KD, ``pd``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from detectron2.config import configurable
from detectron2.layers import get_norm

from ..backbones.norm import resolve_norm
from .base import DistillLoss, as_float, masked_mean, register_distill_loss, run_trainable

__all__ = ["batch_relation_loss", "memory_relation_loss", "ClassMemory", "CrossImageRelationalDistillation",
           "CIRKD_VARIANTS", "all_gather_with_grad", "all_gather_no_grad"]

# Which pixels of a class enter the pixel memory: "paper" (the class's own) or "code" (the authors' indexing).
CIRKD_VARIANTS = ("paper", "code")
_POOL_MIN_SIZE, _POOL_KERNEL = 256, 4  # the authors' code pools maps of 256 x 256 or more by 4 x 4


# ------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------
def _world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_same_shape(x: torch.Tensor, what: str) -> None:
    shape = torch.tensor(list(x.shape), device=x.device)
    shapes = [torch.zeros_like(shape) for _ in range(_world()[1])]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError(f"CIRKD gathers {what} across processes, which needs the same shape on every process; "
                         f"got {[tuple(s.tolist()) for s in shapes]} (use fixed-size crops, INPUT.CROP).")


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Every process's ``x`` concatenated along dim 0, in rank order (no gradient)."""
    rank, world = _world()
    if world == 1:
        return x
    _check_same_shape(x, "tensors")
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        rank, world = _world()
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        ctx.rank, ctx.n = rank, x.shape[0]
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every process's loss depends on every process's features
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """As :func:`all_gather_no_grad`, with the summed gradient flowing back to each slice's owner."""
    if _world()[1] == 1:
        return x
    _check_same_shape(x, "the student's embeddings")
    return _AllGatherWithGrad.apply(x)


# ------------------------------------------------------------------------------------------
# The batch term
# ------------------------------------------------------------------------------------------
def _pool(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    if h >= _POOL_MIN_SIZE and w >= _POOL_MIN_SIZE:
        return F.avg_pool2d(x, _POOL_KERNEL, _POOL_KERNEL, ceil_mode=True)
    return x


# Similarity-map elements one chunk of the batch term holds (64 MiB in float32): a chunk is
# ``r`` rows of image a against every pixel of every image b, ``r x B_b x hw``.
BATCH_CHUNK_ELEMENTS = 1 << 24


def _rows_kl(s_rows: torch.Tensor, t_rows: torch.Tensor, s_all: torch.Tensor, t_all: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """``sum_i sum_b KL(p^T_{b,i} || p^S_{b,i})`` for the rows i (r x C) against the images b
    (C x B_b x hw). The products may run in the autocast dtype; the softmax and KL in float32."""
    r, (c, nb, hw) = s_rows.shape[0], s_all.shape
    log_ps = F.log_softmax(as_float(s_rows @ s_all.reshape(c, nb * hw)).view(r, nb, hw) / temperature, dim=2)
    log_pt = F.log_softmax(as_float(t_rows @ t_all.reshape(t_all.shape[0], nb * hw)).view(r, nb, hw) / temperature,
                           dim=2)
    return (log_pt.exp() * (log_pt - log_ps)).sum()


def batch_relation_loss(student: torch.Tensor, teacher: torch.Tensor, student_all: torch.Tensor,
                        teacher_all: torch.Tensor, temperature: float, *,
                        chunk_elements: int = BATCH_CHUNK_ELEMENTS) -> torch.Tensor:
    """``1 / (B_a B_b) * sum_{a,b} mean_i KL(p^T_{ab,i} || p^S_{ab,i})`` for the images a of
    ``student``/``teacher`` against the images b of ``student_all``/``teacher_all`` (all
    already normalised, N x C x h x w).

    The B_a x B_b maps of hw x hw similarities are never held at once: the rows of each image a
    go by chunks of about ``chunk_elements`` map entries, each chunk checkpointed (its maps
    recomputed in the backward), so the memory is a few chunks' maps whatever the batch, at the
    price of one more forward of the term. The value and the gradients are those of the
    unchunked sum."""
    s, t = student.flatten(2).transpose(1, 2), teacher.detach().flatten(2).transpose(1, 2)  # Ba x hw x C
    s_all = student_all.flatten(2).transpose(0, 1)  # C x Bb x hw
    t_all = teacher_all.detach().flatten(2).transpose(0, 1)
    n_b, hw = s_all.shape[1], s.shape[1]
    rows = max(1, chunk_elements // (n_b * s_all.shape[2]))
    recompute = torch.is_grad_enabled() and (student.requires_grad or student_all.requires_grad)
    total = s.new_zeros((), dtype=as_float(s).dtype)
    for a in range(s.shape[0]):
        for i in range(0, hw, rows):
            args = (s[a, i:i + rows], t[a, i:i + rows], s_all, t_all, temperature)
            if recompute:
                total = total + checkpoint(_rows_kl, *args, use_reentrant=False, preserve_rng_state=False)
            else:
                total = total + _rows_kl(*args)
    return total / (hw * s.shape[0] * n_b)


# ------------------------------------------------------------------------------------------
# The memories
# ------------------------------------------------------------------------------------------
class ClassMemory(nn.Module):
    """CIRKD's class-wise pixel and region queues of teacher embeddings (see the module docstring)."""

    def __init__(self, num_classes: int, dim: int, *, pixel_size: int, region_size: int, update_freq: int,
                 variant: str, seed: int):
        super().__init__()
        if variant not in CIRKD_VARIANTS:
            raise ValueError(f"MODEL.DISTILL.CIRKD.VARIANT must be one of {CIRKD_VARIANTS}, got {variant!r}.")
        if min(pixel_size, region_size, update_freq) < 1 or update_freq > pixel_size:
            raise ValueError(f"CIRKD memories need 1 <= PIXEL_UPDATE_FREQ ({update_freq}) <= PIXEL_MEMORY_SIZE "
                             f"({pixel_size}) and REGION_MEMORY_SIZE >= 1 ({region_size}).")
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.update_freq, self.variant, self.seed = int(update_freq), variant, int(seed)
        g = torch.Generator().manual_seed(self.seed)
        queue = lambda size: F.normalize(torch.randn(num_classes, size, dim, generator=g), dim=2)  # noqa: E731
        self.register_buffer("pixel_queue", queue(pixel_size))
        self.register_buffer("pixel_ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("region_queue", queue(region_size))
        self.register_buffer("region_ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))  # enqueue calls so far (seeds the draws)
        self._host: Optional[dict] = None  # the buffers above as Python ints (_host_state)
        self.register_load_state_dict_post_hook(ClassMemory._forget_host)

    def extra_repr(self) -> str:
        return (f"classes={self.num_classes}, dim={self.dim}, pixel={self.pixel_queue.shape[1]}, "
                f"region={self.region_queue.shape[1]}, update_freq={self.update_freq}, variant={self.variant!r}")

    @staticmethod
    def _forget_host(module, incompatible_keys) -> None:
        module._host = None

    def _host_state(self) -> dict:
        """The pointers and the draw counter as Python ints (read from the buffers once, after
        building or loading): the update plans its writes on the host without reading the device."""
        if self._host is None:
            self._host = {"pixel": self.pixel_ptr.tolist(), "region": self.region_ptr.tolist(),
                          "draws": int(self.draws)}
        return self._host

    def generator(self, device) -> torch.Generator:
        """The generator of this step's draws, on ``device``: the same on every process, continued
        by ``--resume`` (its stream depends on the device type)."""
        return torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + self._host_state()["draws"])

    @torch.no_grad()
    def update(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Enqueue the normalised teacher embeddings ``keys`` (N x D x h x w) with their ``labels``
        (N x h x w, ignore outside [0, K)); ``keys``/``labels`` are already the global batch.

        The groups (image, class) are visited in order, image by image and class by class: one
        sort on the device puts the pixels in group order, each group in a random order (so its
        first ``min(n_k, update_freq)`` are a uniform draw); the group sizes are the one value
        read on the host, which plans every queue slot (a later write to a slot replaces an
        earlier one, as sequential writes would); one index copy to the device, then the writes."""
        g = self.generator(keys.device)
        host = self._host_state()
        host["draws"] += 1
        n, d = keys.shape[:2]
        hw, k_cls, device = keys[0, 0].numel(), self.num_classes, keys.device
        pixel_size, region_size = self.pixel_queue.shape[1], self.region_queue.shape[1]
        feat = keys.reshape(n, d, hw).transpose(1, 2).reshape(n * hw, d)
        label = labels.reshape(n, hw).long()
        valid = (label >= 0) & (label < k_cls)
        group = torch.where(valid, label + k_cls * torch.arange(n, device=device)[:, None], n * k_cls).flatten()
        rank = torch.randperm(n * hw, generator=g, device=device)
        order = torch.sort(group * (n * hw) + rank).indices  # by group, randomly inside each
        sizes = torch.zeros(n * k_cls + 1, dtype=torch.long, device=device).index_add_(0, group, torch.ones_like(group))
        sums = torch.zeros(n * k_cls + 1, d, dtype=feat.dtype, device=device).index_add_(0, group, feat)
        means = F.normalize(sums[:-1] / sizes[:-1].clamp(min=1).to(feat.dtype)[:, None], dim=1)
        counts = sizes[:-1].tolist()  # the one read of the device
        pixel, region, start = {}, {}, 0  # queue row -> source (sorted position / group)
        for gi, n_k in enumerate(counts):
            if n_k:
                k = gi % k_cls
                slot = host["region"][k]
                region[k * region_size + slot] = gi
                host["region"][k] = (slot + 1) % region_size
                count, ptr = min(n_k, self.update_freq), host["pixel"][k]
                if ptr + count >= pixel_size:  # the authors' rule: the last entries, pointer back to 0
                    first, host["pixel"][k] = pixel_size - count, 0
                else:
                    first, host["pixel"][k] = ptr, ptr + count
                for j in range(count):
                    pixel[k * pixel_size + first + j] = start + j
            start += n_k
        plan = torch.tensor([*pixel, *pixel.values(), *region, *region.values(), *host["pixel"], *host["region"],
                             host["draws"]], dtype=torch.long).to(device, non_blocking=True)
        pixel_dst, pixel_src, region_dst, region_src, pointers = plan.split(
            [len(pixel), len(pixel), len(region), len(region), 2 * k_cls + 1])
        chosen = order[pixel_src]
        if self.variant == "code":  # the class's j-th drawn pixel -> pixel (its rank in the class) of the image
            onehot = F.one_hot(label.clamp(0, k_cls - 1), k_cls) * valid[..., None]
            raster_rank = (onehot.cumsum(dim=1) - 1).gather(2, label.clamp(0, k_cls - 1)[..., None]).flatten()
            chosen = torch.div(chosen, hw, rounding_mode="floor") * hw + raster_rank[chosen]
        dtype = self.pixel_queue.dtype
        self.pixel_queue.view(-1, d).index_copy_(0, pixel_dst, F.normalize(feat[chosen], dim=1).to(dtype))
        self.region_queue.view(-1, d).index_copy_(0, region_dst, means[region_src].to(dtype))
        self.pixel_ptr.copy_(pointers[:k_cls])
        self.region_ptr.copy_(pointers[k_cls:2 * k_cls])
        self.draws.copy_(pointers[-1])


def sample_memory(queue: torch.Tensor, per_class: int) -> torch.Tensor:
    """``per_class`` random entries of every class's queue (the same entries for all), (K * n) x D."""
    index = torch.randperm(queue.shape[1], device=queue.device)[:per_class]
    return queue[:, index].reshape(-1, queue.shape[-1])


def memory_relation_loss(student: torch.Tensor, teacher: torch.Tensor, contrast: torch.Tensor, *,
                         temperature: float, kd_temperature: float,
                         valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``kd_T^2 * mean_i KL(softmax(t_i . X / tau / kd_T) || softmax(s_i . X / tau / kd_T))``
    over the anchors (rows of ``student``/``teacher``, normalised; those where ``valid``, 0 when
    none is) and the contrast set ``X``."""
    s_logits = student @ contrast.t() / temperature
    t_logits = teacher.detach() @ contrast.t() / temperature  # the teacher's side is a target
    log_ps = F.log_softmax(s_logits / kd_temperature, dim=1)
    log_pt = F.log_softmax(t_logits / kd_temperature, dim=1)
    return masked_mean((log_pt.exp() * (log_pt - log_ps)).sum(dim=1), valid) * kd_temperature ** 2


# ------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------
@register_distill_loss("cirkd")
class CrossImageRelationalDistillation(DistillLoss):
    """CIRKD; ``MODEL.DISTILL.CIRKD``."""

    @configurable
    def __init__(self, *, student_tap: str, teacher_tap: str, batch_weight: float, pixel_memory_weight: float,
                 region_memory_weight: float, temperature: float, kd_temperature: float, pixel_memory_size: int,
                 region_memory_size: int, pixel_contrast_size: int, region_contrast_size: int,
                 pixel_update_freq: int, gather: bool, variant: str, seed: int, norm: str):
        super().__init__(loss_weight=batch_weight, taps=[(student_tap, teacher_tap)])
        if temperature <= 0 or kd_temperature <= 0:
            raise ValueError(f"MODEL.DISTILL.CIRKD.TEMPERATURE and KD_TEMPERATURE must be > 0, got "
                             f"{temperature}, {kd_temperature}.")
        if variant not in CIRKD_VARIANTS:
            raise ValueError(f"MODEL.DISTILL.CIRKD.VARIANT must be one of {CIRKD_VARIANTS}, got {variant!r}.")
        self.pixel_memory_weight, self.region_memory_weight = float(pixel_memory_weight), float(region_memory_weight)
        self.temperature, self.kd_temperature = float(temperature), float(kd_temperature)
        self.memory_settings = dict(pixel_size=int(pixel_memory_size), region_size=int(region_memory_size),
                                    update_freq=int(pixel_update_freq), variant=variant, seed=int(seed))
        self.pixel_contrast_size, self.region_contrast_size = int(pixel_contrast_size), int(region_contrast_size)
        self.gather = bool(gather)
        self.norm = norm
        self.projection: Optional[nn.Module] = None  # built in bind()
        self.memory: Optional[ClassMemory] = None

    @classmethod
    def add_config(cls, cfg):
        # CIRKD (Yang et al., CVPR 2022): pixel-to-pixel distillation across the images of the batch
        # (loss_cirkd_batch), pixel-to-pixel and pixel-to-region distillation against class-wise
        # memories of teacher embeddings (loss_cirkd_pixel_memory, loss_cirkd_region_memory). The
        # student's embeddings go through a projection head (1x1 conv, norm, ReLU, 1x1 conv) to the
        # teacher's channels. Defaults: the authors' code (winycg/CIRKD train_cirkd.py).
        cfg.MODEL.DISTILL.CIRKD.STUDENT_TAP = "head_features"
        cfg.MODEL.DISTILL.CIRKD.TEACHER_TAP = "head_features"
        cfg.MODEL.DISTILL.CIRKD.BATCH_WEIGHT = 1.0
        cfg.MODEL.DISTILL.CIRKD.PIXEL_MEMORY_WEIGHT = 0.1
        cfg.MODEL.DISTILL.CIRKD.REGION_MEMORY_WEIGHT = 0.1
        # Temperature of the similarity distributions, and of their KL (x T^2).
        cfg.MODEL.DISTILL.CIRKD.TEMPERATURE = 0.1
        cfg.MODEL.DISTILL.CIRKD.KD_TEMPERATURE = 1.0
        # Memory per class (entries) and how many of them one step contrasts with (all classes
        # together: TOTAL // NUM_CLASSES + 1 per class); pixels a class adds per image and step.
        cfg.MODEL.DISTILL.CIRKD.PIXEL_MEMORY_SIZE = 20000
        cfg.MODEL.DISTILL.CIRKD.REGION_MEMORY_SIZE = 2000
        cfg.MODEL.DISTILL.CIRKD.PIXEL_CONTRAST_SIZE = 4096
        cfg.MODEL.DISTILL.CIRKD.REGION_CONTRAST_SIZE = 1024
        cfg.MODEL.DISTILL.CIRKD.PIXEL_UPDATE_FREQ = 16
        # The batch term over each process's own images (the authors' code, whose gather is
        # commented out, so their reported numbers come without it; B_local^2 image pairs per
        # process); True: over the global batch, gathered across processes (the paper's
        # definition; B_local x B_global pairs, world-size times the compute). The memories always
        # take the global batch.
        cfg.MODEL.DISTILL.CIRKD.GATHER = False
        # Pixels a class enqueues: drawn among that class's pixels ("paper") or, as the authors' code
        # indexes them, among the first n pixels of the image in raster order, n = the class's pixel
        # count ("code").
        cfg.MODEL.DISTILL.CIRKD.VARIANT = "paper"
        # Seed of the memories' random draws (identical on every process, so the memories stay equal).
        cfg.MODEL.DISTILL.CIRKD.SEED = 0

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.DISTILL.CIRKD
        return {"student_tap": c.STUDENT_TAP, "teacher_tap": c.TEACHER_TAP, "batch_weight": c.BATCH_WEIGHT,
                "pixel_memory_weight": c.PIXEL_MEMORY_WEIGHT, "region_memory_weight": c.REGION_MEMORY_WEIGHT,
                "temperature": c.TEMPERATURE, "kd_temperature": c.KD_TEMPERATURE,
                "pixel_memory_size": c.PIXEL_MEMORY_SIZE, "region_memory_size": c.REGION_MEMORY_SIZE,
                "pixel_contrast_size": c.PIXEL_CONTRAST_SIZE, "region_contrast_size": c.REGION_CONTRAST_SIZE,
                "pixel_update_freq": c.PIXEL_UPDATE_FREQ, "gather": c.GATHER, "variant": c.VARIANT, "seed": c.SEED,
                "norm": resolve_norm(cfg, "head")}

    def bind(self, student, teacher, *, num_classes):
        p = self.taps[0]
        cs, ct = student[p.student].channels, teacher[p.teacher].channels
        self.projection = nn.Sequential(
            nn.Conv2d(cs, ct, 1, bias=False), get_norm(self.norm, ct) or nn.Identity(), nn.ReLU(inplace=True),
            nn.Conv2d(ct, ct, 1, bias=False),
        )
        self.memory = ClassMemory(num_classes, ct, **self.memory_settings)

    def trainable_parts(self):
        return {"projection": self.projection}

    def memory_terms(self, s_proj: torch.Tensor, t_norm: torch.Tensor, labels: torch.Tensor) -> List[torch.Tensor]:
        """(pixel-memory, region-memory) terms over the labelled pixels, after the enqueue."""
        self.memory.update(all_gather_no_grad(t_norm.detach()), all_gather_no_grad(labels))
        k = self.memory.num_classes
        # every pixel is an anchor, the labelled ones weighted 1 and the others 0 (a boolean
        # selection would read its size on the host; no labelled pixel gives zero terms that
        # keep the projection in the graph)
        valid = ((labels >= 0) & (labels < k)).flatten()
        s = s_proj.permute(0, 2, 3, 1).reshape(-1, s_proj.shape[1])
        t = t_norm.permute(0, 2, 3, 1).reshape(-1, t_norm.shape[1])
        out = []
        for queue, total in ((self.memory.pixel_queue, self.pixel_contrast_size),
                             (self.memory.region_queue, self.region_contrast_size)):
            contrast = sample_memory(queue, total // k + 1)
            out.append(memory_relation_loss(s, t, contrast, temperature=self.temperature,
                                            kd_temperature=self.kd_temperature, valid=valid))
        return out

    def distill(self, batch):
        if self.memory is None:
            raise RuntimeError("Distillation loss 'cirkd' was not bound to its taps' shapes.")
        s, t = batch.pair(self.taps[0])
        labels = batch.labels(s.shape[-2:])
        s_norm, t_norm = F.normalize(_pool(s), dim=1), F.normalize(_pool(t), dim=1)
        if self.gather:
            s_all, t_all = all_gather_with_grad(s_norm), all_gather_no_grad(t_norm)
        else:
            s_all, t_all = s_norm, t_norm
        out = {"loss_cirkd_batch": self.loss_weight * batch_relation_loss(s_norm, t_norm, s_all, t_all,
                                                                          self.temperature)}
        s_proj = F.normalize(run_trainable(self.projection, s), dim=1)
        pixel, region = self.memory_terms(s_proj, F.normalize(t, dim=1), labels)
        out["loss_cirkd_pixel_memory"] = self.pixel_memory_weight * pixel
        out["loss_cirkd_region_memory"] = self.region_memory_weight * region
        return out
