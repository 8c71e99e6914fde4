"""Self-Regulation (``MODEL.EXITS.MODE sr``): MEA, SR-F and SR-L, their functional forms and
the objective.

Self-Regulation (Zhang et al., ICCV 2021), Eq. 5::

    L_SR = lambda1 * L_mea_cls + lambda2 * L_mea_seg + lambda3 * L_SR-F + L_SR-L

* ``loss_mea_cls``: multi-label BCE of every classifier (exits and final head) against the
  image's class presence (ignore pixels never count);
* ``loss_mea_seg``: pixel cross-entropy of every exit's segmenter (ignore respected); the
  final head's own cross-entropy is its ``loss_sem_seg`` at weight 1 (this project's reading
  of the paper, the default). The authors' code (``trainval.py`` of dongzhang89/SR-SS, the
  line ``loss = Lambda1*loss1_classification + Lambda2*loss2_segmentation + ...``, where
  ``loss2_segmentation = get_seg_loss(out, label)`` sums the CE of every output, the final
  one ``out[0]`` included) puts the final output inside lambda2 as well:
  ``seg_weight_includes_final=True`` (``MODEL.EXITS.SR.SEG_WEIGHT_INCLUDES_FINAL``) scales
  ``loss_sem_seg`` by ``seg_weight`` to reproduce it (docs/multi_exit.md);
* ``loss_sr_f`` (Eq. 1-3): the shallowest exit's feature map teaches every deeper exit's:
  ``-tau^2 * mean_pixels sum_c softmax(t/tau)_c * log softmax(s/tau)_c``, summed over students.
  The paper writes ``sigma(t)^(1/tau)`` renormalised, which is exactly ``softmax(t/tau)``;
* ``loss_sr_l`` (Eq. 4): the final head's classifier logits teach every exit's classifier
  logits, same form (mean over images).

The authors' released code differs; ``variant="code"`` reproduces it: SR-F is the
cross-entropy of every deeper exit's (and the final head's) segmentation logits towards the
argmax of the shallowest exit's, SR-L is the BCE of every exit's sigmoid towards the final
classifier's sigmoid. The temperature is not used there.

Adaptive temperature (section 5): ``tau`` starts at 1 and is multiplied by 1.05 whenever the
max-min spread of the tempered teacher feature map of any image in the minibatch exceeds 0.5
(one update per step, agreed across processes). It is a buffer, so checkpoints keep it.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence

import numpy as np

import torch
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.utils import comm

from .heads import MultiExitOutputs
from .objective import ExitObjective, put_scalar, register_exit_objective, seg_cross_entropy

__all__ = [
    "class_presence", "multilabel_bce", "seg_cross_entropy", "tempered_soft_ce", "sr_f_loss", "sr_l_loss",
    "sr_f_code_loss", "sr_l_code_loss", "teacher_spread", "anneal_temperature",
    "SelfRegulationObjective", "SR_VARIANTS",
]

logger = logging.getLogger(__name__)

SR_VARIANTS = ("paper", "code")


# ----------------------------------------------------------------------------- functional forms
def class_presence(targets: torch.Tensor, num_classes: int, ignore_value: int = 255) -> torch.Tensor:
    """N x K float: 1 where class k occurs in image n's labels (ignore pixels never count)."""
    n = targets.shape[0]
    flat = targets.reshape(n, -1)
    valid = flat != ignore_value
    outside = valid & ((flat >= num_classes) | (flat < 0))
    if bool(outside.any()):
        bad = flat[outside].unique().tolist()
        raise ValueError(
            f"Label values {bad[:10]} are neither a class in [0, {num_classes}) nor the ignore value {ignore_value}."
        )
    # ignore pixels go to one extra column, dropped after (no boolean indexing, no bincount:
    # both read sizes on the host)
    idx = torch.where(valid, flat, torch.full_like(flat, num_classes)).long()
    presence = torch.zeros(n, num_classes + 1, device=flat.device).scatter_(1, idx, 1.0)
    return presence[:, :num_classes].contiguous()


def multilabel_bce(cls_logits: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of N x K logits against N x K presence."""
    return F.binary_cross_entropy_with_logits(cls_logits.float(), presence.float())


def tempered_soft_ce(teacher: torch.Tensor, student: torch.Tensor, tau: float, detach_teacher: bool = True) -> torch.Tensor:
    """``-tau^2 * mean over positions of sum_c softmax(t/tau) log softmax(s/tau)`` (channels = dim 1).

    Works for feature maps (N x C x h x w; positions = every pixel of every image) and for
    logits (N x K; positions = images).
    """
    if teacher.shape != student.shape:
        raise ValueError(f"Teacher {tuple(teacher.shape)} and student {tuple(student.shape)} differ in shape.")
    if detach_teacher:
        teacher = teacher.detach()
    p_t = F.softmax(teacher.float() / tau, dim=1)
    log_p_s = F.log_softmax(student.float() / tau, dim=1)
    per_position = -(p_t * log_p_s).sum(dim=1)
    return tau ** 2 * per_position.mean()


def sr_f_loss(teacher: torch.Tensor, students: Sequence[torch.Tensor], tau: float, detach_teacher: bool = True):
    """Eq. 3: the shallow teacher's feature map against every deep student's, summed."""
    return sum(tempered_soft_ce(teacher, s, tau, detach_teacher) for s in students)


def sr_l_loss(teacher: torch.Tensor, students: Sequence[torch.Tensor], tau: float, detach_teacher: bool = True):
    """Eq. 4: the deep teacher's class logits against every shallow student's, summed."""
    return sum(tempered_soft_ce(teacher, s, tau, detach_teacher) for s in students)


def sr_f_code_loss(teacher_seg_logits: torch.Tensor, student_seg_logits: Sequence[torch.Tensor]):
    """Authors' code: CE of each student's segmentation logits towards the teacher's argmax.

    Students are resized (bilinear) to the teacher's size; every pixel counts.
    """
    labels = teacher_seg_logits.detach().argmax(dim=1)
    total = 0.0
    for s in student_seg_logits:
        if s.shape[-2:] != labels.shape[-2:]:
            s = F.interpolate(s.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        total = total + F.cross_entropy(s.float(), labels)
    return total


def sr_l_code_loss(teacher_cls_logits: torch.Tensor, student_cls_logits: Sequence[torch.Tensor], detach_teacher: bool = True):
    """Authors' code: BCE of each student's sigmoid towards the teacher's sigmoid, summed."""
    target = torch.sigmoid(teacher_cls_logits.float())
    if detach_teacher:
        target = target.detach()
    return sum(F.binary_cross_entropy_with_logits(s.float(), target) for s in student_cls_logits)


def teacher_spread(teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """Per image: max - min of the tempered teacher map ``softmax(t/tau)`` over channels and pixels."""
    p = F.softmax(teacher.detach().float() / tau, dim=1).flatten(1)
    return p.amax(dim=1) - p.amin(dim=1)


def anneal_temperature(tau: float, spread: torch.Tensor, threshold: float = 0.5, factor: float = 1.05) -> float:
    """Section 5's rule: ``tau * factor`` when any image's spread exceeds ``threshold``, else ``tau``."""
    return tau * factor if bool((spread > threshold).any()) else tau


# ----------------------------------------------------------------------------- objectives
@register_exit_objective("sr")
class SelfRegulationObjective(ExitObjective):
    """Self-Regulation: MEA + SR-F + SR-L with the adaptive temperature (see the module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        cls_weight: float,
        seg_weight: float,
        seg_weight_includes_final: bool,
        f_weight: float,
        l_weight: float,
        variant: str,
        detach_teacher: bool,
        warmup_iters: int,
        temperature: float,
        anneal_factor: float,
        anneal_threshold: float,
        ignore_value: int,
    ):
        super().__init__(ignore_value=ignore_value)
        if variant not in SR_VARIANTS:
            raise ValueError(f"MODEL.EXITS.SR.VARIANT must be one of {SR_VARIANTS}, got {variant!r}.")
        if temperature <= 0 or anneal_factor < 1.0:
            raise ValueError(
                f"MODEL.EXITS.SR.TEMPERATURE must be > 0 and ANNEAL_FACTOR >= 1 (got {temperature}, {anneal_factor})."
            )
        self.cls_weight, self.seg_weight = cls_weight, seg_weight
        self.seg_weight_includes_final = bool(seg_weight_includes_final)
        self.f_weight, self.l_weight = f_weight, l_weight
        self.variant = variant
        self.detach_teacher = detach_teacher
        self.warmup_iters = int(warmup_iters)
        self.anneal_factor, self.anneal_threshold = anneal_factor, anneal_threshold
        # A buffer: saved in checkpoints, restored by --resume; deploy drops it.
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        # The temperature as a Python float, so the losses need not read the device every step;
        # read from the buffer again after a load_state_dict (--resume).
        self._tau: Optional[float] = None
        self.register_load_state_dict_post_hook(SelfRegulationObjective._forget_tau)
        self._warned_no_progress = False

    @staticmethod
    def _forget_tau(module, incompatible_keys) -> None:
        module._tau = None

    def current_temperature(self) -> float:
        """tau now (the buffer, read once after building or loading)."""
        if self._tau is None:
            self._tau = float(self.temperature)
        return self._tau

    @classmethod
    def add_config(cls, cfg):
        # Self-Regulation (paper Eq. 5; defaults from its section 5).
        # lambda1: multi-label BCE of every classifier (exits + final head), loss_mea_cls.
        cfg.MODEL.EXITS.SR.CLS_WEIGHT = 0.2
        # lambda2: pixel cross-entropy of every exit's segmenter, loss_mea_seg.
        cfg.MODEL.EXITS.SR.SEG_WEIGHT = 0.8
        # False (default, the paper's Eq. 5 as read here): the final head's cross-entropy is its own
        # loss_sem_seg at weight 1 and SEG_WEIGHT weights the exits only. True (the authors' code,
        # dongzhang89/SR-SS trainval.py): the final output is inside SEG_WEIGHT too (loss_sem_seg x
        # SEG_WEIGHT). docs/multi_exit.md compares them.
        cfg.MODEL.EXITS.SR.SEG_WEIGHT_INCLUDES_FINAL = False
        # lambda3: SR-F, shallowest exit's features teach the deeper exits' (loss_sr_f); 0 = off.
        cfg.MODEL.EXITS.SR.F_WEIGHT = 1.0
        # SR-L, the final head's class logits teach the shallower exits' (loss_sr_l); 0 = off.
        cfg.MODEL.EXITS.SR.L_WEIGHT = 1.0
        # "paper" (Eq. 1-4, tempered soft cross-entropy) or "code" (the authors' released code:
        # SR-F = CE towards the shallowest exit's argmax, SR-L = BCE towards the final sigmoid).
        cfg.MODEL.EXITS.SR.VARIANT = "paper"
        # Stop gradients through the teachers of SR-F and SR-L.
        cfg.MODEL.EXITS.SR.DETACH_TEACHER = True
        # MEA only for the first WARMUP_ITERS iterations, then SR-F and SR-L on.
        cfg.MODEL.EXITS.SR.WARMUP_ITERS = 0
        # Adaptive temperature (section 5): starts at TEMPERATURE and is multiplied by ANNEAL_FACTOR
        # whenever the max-min spread of a teacher feature map (tempered softmax) in the minibatch
        # exceeds ANNEAL_THRESHOLD. ANNEAL_FACTOR 1.0 keeps it fixed. Saved in checkpoints.
        cfg.MODEL.EXITS.SR.TEMPERATURE = 1.0
        cfg.MODEL.EXITS.SR.ANNEAL_FACTOR = 1.05
        cfg.MODEL.EXITS.SR.ANNEAL_THRESHOLD = 0.5

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.EXITS.SR
        return dict(
            cls_weight=c.CLS_WEIGHT, seg_weight=c.SEG_WEIGHT, seg_weight_includes_final=c.SEG_WEIGHT_INCLUDES_FINAL,
            f_weight=c.F_WEIGHT, l_weight=c.L_WEIGHT, variant=c.VARIANT, detach_teacher=c.DETACH_TEACHER,
            warmup_iters=c.WARMUP_ITERS, temperature=c.TEMPERATURE, anneal_factor=c.ANNEAL_FACTOR,
            anneal_threshold=c.ANNEAL_THRESHOLD, ignore_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        )

    @property
    def final_loss_weight(self) -> float:
        """The authors' code weights the final output's CE by SEG_WEIGHT too (see the module docstring)."""
        return float(self.seg_weight) if self.seg_weight_includes_final else 1.0

    @property
    def needs_classifiers(self) -> bool:
        """Classifiers exist only when a term reads them (MEA cls or SR-L)."""
        return self.cls_weight > 0 or self.l_weight > 0

    def check_exits(self, exit_num_classes: Dict[str, int], head_num_classes: int) -> None:
        """SR-F needs a teacher and a student exit; SR-L (and the code's SR-F) equal class sets."""
        names = list(exit_num_classes)
        if self.f_weight > 0 and len(names) < 2:
            raise ValueError(
                f"SR-F needs at least two exits (the shallowest teaches the deeper ones); MODEL.EXITS.IN_FEATURES "
                f"is {names}. Add a stage or set MODEL.EXITS.SR.F_WEIGHT 0."
            )
        other = {n: k for n, k in exit_num_classes.items() if k != head_num_classes}
        if other and (self.l_weight > 0 or (self.variant == "code" and self.f_weight > 0)):
            raise ValueError(
                f"Self-Regulation compares class logits of exits and final head, which need the head's "
                f"{head_num_classes} classes; exits {other} predict other class sets (MODEL.EXITS.NUM_CLASSES)."
            )

    # -- schedule
    def sr_active(self) -> bool:
        """False during the MEA-only warm-up (``set_training_progress`` tells the iteration)."""
        if self.warmup_iters <= 0:
            return True
        if self.iteration is None:
            if not self._warned_no_progress:
                logger.warning("MODEL.EXITS.SR.WARMUP_ITERS is set but nothing calls set_training_progress "
                               "(TrainingProgressHook); SR losses are on from the start.")
                self._warned_no_progress = True
            return True
        return self.iteration >= self.warmup_iters

    @torch.no_grad()
    def update_temperature(self, teacher: torch.Tensor, tau: float) -> None:
        """Multiply the temperature by ANNEAL_FACTOR when a teacher map's spread exceeds the threshold."""
        if self.anneal_factor == 1.0:
            return
        exceeds = (teacher_spread(teacher, tau) > self.anneal_threshold).any().float().reshape(1)
        if comm.get_world_size() > 1:  # every process must keep the same tau
            torch.distributed.all_reduce(exceeds, op=torch.distributed.ReduceOp.MAX)
        if exceeds.item() > 0:
            self.temperature.mul_(self.anneal_factor)
            # the buffer's product, in its float32 arithmetic, without reading it back
            self._tau = float(np.float32(self.current_temperature()) * np.float32(self.anneal_factor))

    def forward(self, outputs: MultiExitOutputs, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        exits = outputs.exits
        names = list(exits)
        final = outputs.final
        tau = self.current_temperature()
        losses: Dict[str, torch.Tensor] = {}
        zero = final.seg_logits.new_zeros(())

        if self.cls_weight > 0:
            presence = {}  # computed once per distinct label space

            def image_labels(name, k):
                key = (id(self.label_luts.get(name)), k)
                if key not in presence:
                    t = targets if name is None else self.exit_targets(name, targets)
                    presence[key] = class_presence(t, k, self.ignore_value)
                return presence[key]

            total = multilabel_bce(final.cls_logits, image_labels(None, final.cls_logits.shape[1]))
            for name, out in exits.items():
                total = total + multilabel_bce(out.cls_logits, image_labels(name, out.cls_logits.shape[1]))
            losses["loss_mea_cls"] = self.cls_weight * total
        if self.seg_weight > 0:
            losses["loss_mea_seg"] = self.seg_weight * sum(
                self.exit_cross_entropy(n, out.seg_logits, targets)
                for n, out in exits.items()
            )

        active = self.sr_active()
        teacher, deeper = exits[names[0]], [exits[n] for n in names[1:]]
        if self.f_weight > 0:
            if not active:
                loss = zero
            elif self.variant == "paper":
                loss = sr_f_loss(teacher.features, [s.features for s in deeper], tau, self.detach_teacher)
            else:
                loss = sr_f_code_loss(teacher.seg_logits, [s.seg_logits for s in deeper] + [final.seg_logits])
            losses["loss_sr_f"] = self.f_weight * loss
        if self.l_weight > 0:
            students = [exits[n].cls_logits for n in names]
            if not active:
                loss = zero
            elif self.variant == "paper":
                loss = sr_l_loss(final.cls_logits, students, tau, self.detach_teacher)
            else:
                loss = sr_l_code_loss(final.cls_logits, students, self.detach_teacher)
            losses["loss_sr_l"] = self.l_weight * loss

        if self.training:
            put_scalar("sr_temperature", tau)
            if active and self.variant == "paper" and (self.f_weight > 0 or self.l_weight > 0):
                self.update_temperature(teacher.features, tau)
        return losses

