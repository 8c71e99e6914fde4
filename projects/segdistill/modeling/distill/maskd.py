"""MasKD: masked distillation with receptive tokens (Huang et al., ICLR 2023).

Segmentation form of the authors' code (hunto/MasKD, ``segmentation/``): the method works on the
logits. ``T`` receptive tokens ``t_1 .. t_T`` (each a K-vector, K classes) turn the frozen
teacher's logits ``Z^T`` (N x K x h x w) into T soft masks by pixel-wise attention::

    M_{n,i,p} = sigmoid(t_i . Z^T_{n,:,p})                                   (the masks)

**Stage 1, the tokens** (``tools/maskd_tokens.py``; :func:`learn_receptive_tokens`), with the
teacher frozen: the masked sum ``sum_i M_i * Z^T`` must still segment the image, and distinct
masks must differ::

    L_tokens = CE(upsample(sum_i M_i * Z^T), y) + DICE_WEIGHT * L_dice
    L_dice = 1 / (N T (T - 1)) * sum_n sum_{i != j} 2 <M_i, M_j> / (|M_i|^2 + |M_j|^2)

(``segmentation/losses/maskd.py`` ``dice_coeff`` and ``MaskModule.forward_train``;
``segmentation/train_mask_module.py`` lines 229-245: CE + Dice with weight 1; lines 54-60: SGD
lr 0.1 poly 0.9, momentum 0.9, weight decay 1e-3, 10k iterations; tokens drawn from
N(0, 0.01^2), ``losses/maskd.py`` line 26; line 175: 8 tokens on the 19 logits). The upsampling
before the CE is bilinear with ``align_corners=False`` here; the authors' ``SegCrossEntropyLoss``
(``segmentation/losses/loss.py`` line 21) uses ``align_corners=True``. The tokens file holds the
T x K tokens.

**Stage 2, the distillation** (this loss, ``loss_maskd``), tokens fixed (``train_maskd.py``
lines 201-207 give the optimizer the student alone), masks from the teacher::

    L_maskd = 1 / (N T K) * sum_{n,i,k} sum_p (M_{n,i,p} (Z^S_{n,k,p} - Z^T_{n,k,p}))^2 / (sum_p M_{n,i,p} + EPS)
    loss_maskd = WEIGHT * L_maskd

(``segmentation/losses/maskd.py`` ``MasKDLoss.forward``: EPS 1e-5, factor 0.5; ``train_maskd.py``
line 259: ``--lambda-kd 1``; so ``WEIGHT`` 0.5). With ``MODEL.DISTILL.EXCLUDE_IGNORE`` the masks
are 0 at ignore pixels. No connector: both models predict the same K classes.

The paper's equations are not cited by number: its text could not be read from this machine.
Searched: the stored public page copies (arXiv, OpenReview, an ICLR 2023 text dump and mirror
pages; each is stored from its beginning only, so they give the abstract and the start of the
introduction), the public-repository index (no copy of the text) and the authors' repository
(README and code, no formulas). The forms above are the authors' segmentation code's, checked
line by line, which the abstract describes (tokens learnt on the frozen teacher with the task
loss and a Dice loss for diverse masks; pixel-wise reconstruction on each mask; the area
normalisation is the code's); take the numbers from the paper (arXiv 2205.14589) before citing
them. Not used by the segmentation code, so not here: the paper's mask
weighting module (detection). Not reproduced: the authors' script also distils the auxiliary
head's logits (x 0.4, ``train_maskd.py`` line 263); the teacher's auxiliary head is not a tap
(it does not run in eval()), so that term is left out; their token stage runs the teacher in
train() mode (``train_mask_module.py`` line 222: BatchNorm on batch statistics, dropout on),
here it runs frozen in eval() as in the distillation.

Without a tokens file the loss is refused (the message names the command), except for a random
teacher (``MODEL.DISTILL.TEACHER.ALLOW_RANDOM`` with no weights: tests, cost benchmarks), where
tokens are drawn as the authors initialise them (seeded by ``SEED``): there is nothing to learn
from such a teacher and the loss costs the same.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch.nn import functional as F

from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from .base import DistillLoss, register_distill_loss
from .taps import LOGITS

__all__ = ["MaskedDistillation", "receptive_masks", "maskd_loss", "mask_diversity", "token_learning_loss",
           "learn_receptive_tokens", "initial_tokens", "save_receptive_tokens", "load_receptive_tokens",
           "TOKENS_COMMAND"]

logger = logging.getLogger(__name__)

TOKENS_COMMAND = "python tools/maskd_tokens.py --config-file <this config> --output <tokens.pth>"


def receptive_masks(tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """T x K tokens, N x K x h x w logits -> N x T x h x w masks ``sigmoid(t_i . z_p)``, the pixel-wise
    attention of the receptive tokens (``losses/maskd.py`` ``MaskModule.forward_mask``, lines 36-43;
    the paper's equation number not read, see the module docstring)."""
    return torch.einsum("tk,nkhw->nthw", tokens.to(logits.dtype), logits).sigmoid()


def maskd_loss(student: torch.Tensor, teacher: torch.Tensor, masks: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``L_maskd`` (module docstring): the mean over images, masks and classes of each mask's
    squared, masked difference, normalised by the mask's sum (``losses/maskd.py`` ``MasKDLoss.forward``,
    lines 66-78, without its factor 0.5, which ``WEIGHT`` carries; the paper's equation number not
    read). The teacher's side is a target."""
    teacher, masks = teacher.detach(), masks.detach()
    diff = (masks[:, :, None] * (student - teacher)[:, None]).pow(2).sum((3, 4))  # N x T x K
    return (diff / (masks.sum((2, 3))[..., None] + eps)).mean()


def mask_diversity(masks: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``L_dice``: the Dice coefficient of every ordered pair of distinct masks, averaged
    (``losses/maskd.py`` ``dice_coeff``, lines 6-19; the paper's equation number not read)."""
    m = masks.flatten(2)  # N x T x P
    inner = m @ m.transpose(1, 2)  # N x T x T
    sq = inner.diagonal(dim1=1, dim2=2) + eps
    dice = 2 * inner / (sq[:, :, None] + sq[:, None, :])
    t = m.shape[1]
    off = ~torch.eye(t, dtype=torch.bool, device=m.device)
    return dice[:, off].mean() if t > 1 else dice.sum() * 0


def token_learning_loss(tokens: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, *,
                        ignore_value: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(CE of the masked sum of the teacher's logits upsampled to the labels, ``L_dice``): the two
    terms of ``L_tokens`` (``train_mask_module.py`` lines 232-239; the paper's equation numbers not
    read)."""
    masks = receptive_masks(tokens, logits.detach())
    masked = (masks[:, :, None] * logits.detach()[:, None]).sum(1)
    masked = F.interpolate(masked, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(masked, labels, ignore_index=ignore_value), mask_diversity(masks)


def initial_tokens(num_tokens: int, num_classes: int, seed: int) -> torch.Tensor:
    """The authors' initialisation, N(0, 0.01^2), from a generator seeded by ``seed``."""
    return torch.randn(num_tokens, num_classes, generator=torch.Generator().manual_seed(int(seed))) * 0.01


def learn_receptive_tokens(batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                           teacher_logits: Callable[[torch.Tensor], torch.Tensor], *, num_tokens: int,
                           num_classes: int, iterations: int, base_lr: float, momentum: float, weight_decay: float,
                           dice_weight: float, ignore_value: int, seed: int, device="cpu",
                           log_period: int = 20) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Stage 1: ``iterations`` SGD steps (poly 0.9 decay) of the tokens on ``L_tokens``.

    ``batches`` yields (images as the teacher expects them, N x H x W labels); ``teacher_logits``
    maps images to the frozen teacher's N x K x h x w logits. Returns the T x K tokens (CPU) and
    the last step's terms.
    """
    tokens = initial_tokens(num_tokens, num_classes, seed).to(device).requires_grad_(True)
    opt = torch.optim.SGD([tokens], lr=base_lr, momentum=momentum, weight_decay=weight_decay)
    it = iter(batches)
    last = {}
    for step in range(int(iterations)):
        images, labels = next(it)
        for group in opt.param_groups:
            group["lr"] = base_lr * (1 - step / iterations) ** 0.9
        with torch.no_grad():
            logits = teacher_logits(images).float()
        ce, dice = token_learning_loss(tokens, logits, labels, ignore_value=ignore_value)
        loss = ce + dice_weight * dice
        opt.zero_grad()
        loss.backward()
        opt.step()
        last = {"ce": float(ce.detach()), "dice": float(dice.detach()), "lr": opt.param_groups[0]["lr"]}
        if log_period and ((step + 1) % log_period == 0 or step + 1 == iterations):
            logger.info("MasKD tokens: iteration %d/%d, CE %.4f, Dice %.4f, lr %.5f", step + 1, iterations,
                        last["ce"], last["dice"], last["lr"])
    return tokens.detach().cpu(), last


def save_receptive_tokens(path: str, tokens: torch.Tensor, **meta) -> str:
    """Write the tokens file: ``{"tokens": T x K tensor, ...}`` (``meta``: plain values)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"tokens": tokens.detach().cpu().float(), **meta}, path)
    return path


def load_receptive_tokens(path: str, *, key: str = "MODEL.DISTILL.MASKD.TOKENS_FILE") -> torch.Tensor:
    """The T x K tokens of a file written by :func:`save_receptive_tokens` or of the authors'
    mask-module file (``{"mask_token": T x K}``), read with ``weights_only=True``."""
    if not path:
        raise ValueError(f"{key} is empty: MasKD's receptive tokens are learnt on the frozen teacher first: "
                         f"{TOKENS_COMMAND}, then set {key} <tokens.pth>.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: {path!r} does not exist. Make it with {TOKENS_COMMAND} (the output path "
                                "being this file).")
    state = torch.load(path, map_location="cpu", weights_only=True)
    tokens = state.get("tokens", state.get("mask_token")) if isinstance(state, dict) else None
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{key}: {path!r} holds no T x K tensor 'tokens' (nor the authors' 'mask_token'); "
                         f"found {found}. Make the file with {TOKENS_COMMAND}.")
    return tokens.float()


@register_distill_loss("maskd")
class MaskedDistillation(DistillLoss):
    """MasKD; ``MODEL.DISTILL.MASKD``."""

    @configurable
    def __init__(self, *, student_tap: str, teacher_tap: str, weight: float, num_tokens: int, tokens_file: str,
                 eps: float, seed: int, allow_random_tokens: bool):
        super().__init__(loss_weight=weight, taps=[(student_tap, teacher_tap)])
        key = "MODEL.DISTILL.MASKD"
        if num_tokens < 1:
            raise ValueError(f"{key}.NUM_TOKENS must be >= 1, got {num_tokens}.")
        if eps < 0:
            raise ValueError(f"{key}.EPS must be >= 0, got {eps}.")
        self.num_tokens, self.eps, self.seed = int(num_tokens), float(eps), int(seed)
        self.tokens_file = tokens_file
        self.loaded: Optional[torch.Tensor] = None
        # fixed during distillation: a buffer (saved with the checkpoint, never in the deployed student), sized in bind()
        self.register_buffer("tokens", torch.zeros(0, 0))
        if tokens_file or not allow_random_tokens:
            self.loaded = load_receptive_tokens(tokens_file)
            if self.loaded.shape[0] != self.num_tokens:
                raise ValueError(f"{key}.TOKENS_FILE {tokens_file!r} holds {self.loaded.shape[0]} tokens but "
                                 f"{key}.NUM_TOKENS is {self.num_tokens}; set NUM_TOKENS {self.loaded.shape[0]}.")

    @classmethod
    def add_config(cls, cfg):
        # MasKD (Huang et al., ICLR 2023), segmentation form of the authors' code (hunto/MasKD
        # segmentation/): receptive tokens learnt beforehand on the frozen teacher's logits
        # (tools/maskd_tokens.py) give soft masks; the student's logits mimic the teacher's on each mask.
        c = cfg.MODEL.DISTILL.MASKD
        c.STUDENT_TAP = LOGITS
        c.TEACHER_TAP = LOGITS
        # 0.5 x the mean over images, masks and classes (losses/maskd.py: the 0.5; train_maskd.py: lambda_kd 1)
        c.WEIGHT = 0.5
        c.NUM_TOKENS = 8
        # the tokens file tools/maskd_tokens.py writes (or the authors' mask-module file); required unless
        # the teacher is random (TEACHER.ALLOW_RANDOM, no weights), when tokens are drawn with SEED
        c.TOKENS_FILE = ""
        # added to each mask's area before dividing (losses/maskd.py)
        c.EPS = 1e-5
        c.SEED = 0
        # Stage 1 (tools/maskd_tokens.py; train_mask_module.py): SGD, poly 0.9, on SOLVER.IMS_PER_BATCH images
        c.TOKENS = CN()
        c.TOKENS.ITERATIONS = 10000
        c.TOKENS.BASE_LR = 0.1
        c.TOKENS.MOMENTUM = 0.9
        c.TOKENS.WEIGHT_DECAY = 1e-3
        c.TOKENS.DICE_WEIGHT = 1.0

    @classmethod
    def from_config(cls, cfg):
        c, t = cfg.MODEL.DISTILL.MASKD, cfg.MODEL.DISTILL.TEACHER
        return {"student_tap": c.STUDENT_TAP, "teacher_tap": c.TEACHER_TAP, "weight": c.WEIGHT,
                "num_tokens": c.NUM_TOKENS, "tokens_file": c.TOKENS_FILE, "eps": c.EPS, "seed": c.SEED,
                "allow_random_tokens": bool(t.ALLOW_RANDOM) and not t.WEIGHTS}

    def bind(self, student, teacher, *, num_classes):
        self.check_same_channels(student, teacher)
        k = teacher[self.taps[0].teacher].channels
        if self.loaded is None:
            logger.warning("MODEL.DISTILL.MASKD: the teacher is random, so are the %d receptive tokens (SEED %d).",
                           self.num_tokens, self.seed)
            tokens = initial_tokens(self.num_tokens, k, self.seed)
        else:
            tokens = self.loaded
            if tokens.shape[1] != k:
                raise ValueError(f"MODEL.DISTILL.MASKD.TOKENS_FILE {self.tokens_file!r}: its tokens have "
                                 f"{tokens.shape[1]} entries but the teacher tap '{self.taps[0].teacher}' has {k} "
                                 f"channels; learn them on this teacher: {TOKENS_COMMAND}.")
        self.tokens = tokens.clone()
        self.loaded = None

    def masks(self, teacher_logits: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        masks = receptive_masks(self.tokens, teacher_logits.detach())
        return masks if valid is None else masks * valid[:, None].to(masks.dtype)

    def forward(self, student_logits, teacher_logits, valid=None):
        """``L_maskd``, unweighted."""
        return maskd_loss(student_logits, teacher_logits, self.masks(teacher_logits, valid), self.eps)

    def distill(self, batch):
        if self.tokens.numel() == 0:
            raise RuntimeError("Distillation loss 'maskd' was not bound to its taps' shapes.")
        s, t = batch.pair(self.taps[0])
        return {"loss_maskd": self.loss_weight * self(s, t, batch.valid(s.shape[-2:]))}

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, eps={self.eps}, " + super().extra_repr()
