"""Mask-aware training of multi-exit models (``MODEL.EXITS.PIXEL.TRAIN_THRESHOLD``).

Per-pixel anytime inference (``AnytimeSegmentor`` policy ``pixel``) freezes, after each exit,
the pixels that exit answers confidently, and runs the later stages masked on the rest. A
model trained with every pixel computed everywhere then meets, at inference, later stages
whose inputs are masked (frozen pixels hold 0 or their shortcut) and a final answer mixed
from several outputs. :class:`PixelTraining` runs the training forward the way that
inference runs, so the later parts are trained on what they will see.

What one step computes (the contract)
-------------------------------------
With threshold ``t`` in (0, 1], on a (padded, normalised) batch ``x`` of size ``H x W``:

1. The backbone runs stage by stage (``StagewiseBackbone.stage_modules()``; a stage may
   yield several named features, ``stage_outputs()``, as HRNet's stages yield their branches,
   and the exits on them run in that order once the stage has run). Before any
   pixel of the batch is frozen a stage runs its own forward (dense); after, it runs through
   :func:`segdistill.modeling.masked.MaskedStage` in mode ``emulate`` with
   ``PixelMask(active)`` (dense tensors, outputs multiplied by the active mask at every
   stride, max-pooled; differentiable; BatchNorm in training mode then takes its batch
   statistics over every pixel, frozen ones included, as the masked module docstring says).
2. After exit ``e``'s stage, the exit runs on that (masked) stage output: before any pixel
   of the batch is frozen its own forward; after, its segmentation logits as policy ``pixel``
   computes them, masked (``emulate``, the same ``PixelMask(active)``: its convolutions and
   resizes at the active pixels, :mod:`segdistill.modeling.masked_exits`) where masked
   execution implements its head (``sr``, ``rh``), else dense. Its dense forward also runs,
   for the features and class logits the objectives read (as the head's, below: the exit's
   cost, small next to a stage's, is then paid twice, and a BatchNorm in training mode
   updates its running statistics on both passes). Its logits
   are resized (bilinear, ``align_corners`` False) to ``H x W``: ``own[e]``. The pixels still
   active whose top softmax probability of ``own[e]`` (float32, computed on detached logits)
   reaches ``t`` are frozen by ``e`` (``frozen[e]``, a boolean tensor: no gradient flows
   through the decision, neither into the exit nor into anything before it); with
   ``MODEL.EXITS.PIXEL.CELL c`` > 1, whole ``c x c`` cells of the input freeze together, a
   cell when all its active pixels reach ``t`` (:func:`.pixel_cells.freeze_decision`, the
   rule policy ``pixel`` applies; every pixel of the batch counts, there is no padding mask).
3. The head's logits, as policy ``pixel`` computes them: once a pixel is frozen, the head
   runs masked (``emulate``) where masked execution implements it
   (:mod:`segdistill.modeling.masked_heads`: DeepLabV3, FCN, HRNetV2), else dense on the (masked)
   features; they are brought to ``H x W`` as inference brings them
   (``predict_logits(logits, (H, W))``). The head's dense forward also runs, for the outputs
   the objectives read besides the final logits (its features, ``aux_logits``): with a masked
   head, the head's cost is paid twice in such a step.
4. Copy aggregation: exit ``e``'s aggregated logits are ``own[e]`` at the pixels active when
   it ran, and at every pixel frozen earlier the logits of the exit that froze it (each
   pixel keeps the answer of the first exit that reached ``t``); the final aggregated logits
   are the head's at the pixels still active after the last exit and the freezing exit's
   elsewhere. In ``eval()`` the final aggregated logits are exactly what ``AnytimeSegmentor``
   policy ``pixel`` (``PIXEL_MODE emulate``, ``t`` for every exit) answers (tested), except
   that the anytime model stops an image whose pixels are all frozen (the answer is then the
   same: no pixel takes the head's logits) and ignores padding when deciding to stop.

What each loss term sees
------------------------
The objective (``MODEL.EXITS.MODE``) reads a :class:`~.heads.MultiExitOutputs` in which every
exit's ``seg_logits`` and the final ``seg_logits`` are the aggregated logits at ``H x W``
(``stride`` 1); features, class logits and the head's other outputs (``aux_logits``) are
each part's own (its dense forward), computed on the masked features. So deep supervision's ``loss_ds`` is the
sum over exits of the cross-entropy of each exit's aggregated logits, and the head's
``loss_sem_seg`` is the head's loss (``SegHeadMixin.input_size_loss``) of the final
aggregated logits. A frozen pixel therefore counts in the loss of its freezing exit and again
in every later output's loss, each time through the freezing exit's logits: the gradient of
those terms flows into the exit that froze the pixel (``torch.where`` passes it to the
chosen operand), never into the later exit's or head's own logits there, and never through
the freeze decision (tested with autograd).

Where this comes from, and what differs
---------------------------------------
ADP-C's released code (liuzhuang13/anytime, ``lib/models/model_anytime.py`` lines 569-629,
``forward`` of its HRNet): after exit ``i`` it sets the masks of the modules up to exit
``i + 1`` from exit ``i``'s *aggregated* output (``set_part_masks``; a pixel stays active
when its top probability is at most ``CONF_THRE``, ``get_resized_mask_from_logits``), and
blends ``out_{i+1} = out_i * (1 - mask) + out_{i+1} * mask`` (``MASK.AGGR copy``) with no
detach; its training wrapper (``lib/utils/utils.py`` ``FullEEModel``) takes the loss of
every (aggregated) output and ``lib/core/function.py`` sums them with ``EE_WEIGHTS``. So the
code, as here, trains each later output on the copy-aggregated logits with gradient into the
exit that froze a pixel, and the masks carry none (they come from a comparison). The paper
(Liu et al., ICLR 2022, "Anytime Dense Prediction with Confidence Adaptivity") describes
the same: confident predictions are kept and skip the later layers' computation, and the
later exits reuse them. No difference in the training loss between the paper (as far as its
text was available when this was written: abstract, Fig. 2) and the code was found, so there
is one behaviour and no ``VARIANT`` key; should one be found, the paper's form becomes the
default and this one an option. What differs from the code, so that training agrees with this
project's inference (policy ``pixel``):

* the decision is taken at the input size on each exit's own logits resized bilinearly
  (frozen when the top probability is *at least* ``t``; ADP-C: above it), at the active
  pixels only (or per ``MODEL.EXITS.PIXEL.CELL`` cell of the input: with the cell equal to
  a stride, a mask of that stride's map, as ADP-C's); ADP-C decides at the exits' stride on
  the aggregated logits (the same set: a frozen pixel keeps a confident answer) and resizes
  the mask (nearest) to every conv;
* a frozen pixel's features follow :mod:`segdistill.modeling.masked` (0 in a convolution's
  output, the shortcut through a residual block); ADP-C's masked convs fill them by an
  RBF interpolation of active neighbours (``lib/models/conv_mask.py``);
* the exits' logits are masked as the stages are (frozen pixels are 0 in each conv's and
  resize's output, no halo), as ADP-C masks its exits' convs (with the interpolation above);
  an RH exit's pooled levels are masked with the mask max-pooled to each level;
* aggregation happens at the input size (ADP-C: at the exits' stride, where all its exits
  and its head already are).

Cost: ``emulate`` computes every pixel, so a step costs what a DS / SR step costs plus a
mask multiply per convolution, a softmax of each exit's logits at the input size and the
aggregation (elementwise); it saves nothing in training, it only trains what inference runs.
No new randomness: the decisions follow from the logits, so ``--resume`` stays exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import CfgNode as CN

from ...config import ConfigError, register_config_hook
from ..heads.base import SegHeadMixin, crop_logits
from ..masked import MaskedStage, PixelMask, UnsupportedModuleError
from ..masked_heads import masked_head_input
from ..stagewise import StageModulesUnsupported, StagewiseBackbone
from .heads import HEAD_FEATURE_PREFIX, ExitOutput, MultiExitOutputs, exit_size
from .pixel_cells import check_pixel_cell, freeze_decision

__all__ = ["PixelTraining", "PixelRun", "add_pixel_training_config", "check_train_threshold"]


@register_config_hook
def add_pixel_training_config(cfg) -> None:
    """``MODEL.EXITS.PIXEL``: per-pixel (mask-aware) training of the multi-exit segmentor."""
    if "PIXEL" not in cfg.MODEL.EXITS:
        cfg.MODEL.EXITS.PIXEL = CN()
    if "TRAIN_THRESHOLD" not in cfg.MODEL.EXITS.PIXEL:
        # Mask-aware training (docs/multi_exit.md): after each exit, the pixels whose top softmax
        # probability reaches this value are frozen, later stages run masked (emulate) on the rest
        # and later outputs are trained on the copy-aggregated logits, as AnytimeSegmentor policy
        # "pixel" runs. 0 = off (every stage at every pixel, the plain losses); ADP-C uses 0.998.
        cfg.MODEL.EXITS.PIXEL.TRAIN_THRESHOLD = 0.0


def check_train_threshold(value: float) -> float:
    """``value`` as a float in [0, 1], else a ConfigError naming the key."""
    t = float(value)
    if not 0.0 <= t <= 1.0:
        raise ConfigError(f"MODEL.EXITS.PIXEL.TRAIN_THRESHOLD must be in [0, 1] (0 = off), got {value!r}; "
                          "e.g. MODEL.EXITS.PIXEL.TRAIN_THRESHOLD 0.998.")
    return t


@dataclass
class PixelRun:
    """One mask-aware forward.

    ``outputs``: what the objective reads (module docstring: exits' and final ``seg_logits``
    aggregated at the input size, stride 1); ``own``: each exit's own logits at the input
    size; ``frozen``: exit -> ``N x H x W`` bool, the pixels it froze; ``active``: the pixels
    the head answers (``N x H x W`` bool)."""

    outputs: MultiExitOutputs
    own: Dict[str, torch.Tensor]
    frozen: Dict[str, torch.Tensor]
    active: torch.Tensor

    @property
    def final_logits(self) -> torch.Tensor:
        """The final aggregated logits (``N x K x H x W``): the anytime ``pixel`` policy's answer."""
        return self.outputs.final.seg_logits


class PixelTraining:
    """Runs a multi-exit model's forward with per-pixel freezing (module docstring).

    Holds no parameter and no state between steps: the model's parts are passed to
    :meth:`run`, and every stage is compiled for masked execution on the call (a walk over its
    modules; ``emulate`` runs the modules' own forwards, so nothing goes stale when the
    weights change)."""

    def __init__(self, threshold: float, cell: int = 1):
        """``threshold``: ``MODEL.EXITS.PIXEL.TRAIN_THRESHOLD`` in (0, 1]; ``cell``:
        ``MODEL.EXITS.PIXEL.CELL``, the side of the decision cells (:mod:`.pixel_cells`)."""
        t = check_train_threshold(threshold)
        if t <= 0.0:
            raise ValueError("PixelTraining needs a threshold in (0, 1]; 0 means mask-aware training is off.")
        self.threshold = t
        self.cell = check_pixel_cell(cell)

    def check(self, backbone: nn.Module, exits: Dict[str, nn.Module], head: nn.Module, fused: bool) -> None:
        """Raise a clear error where the model cannot be trained mask-aware: the same limits as
        ``AnytimeSegmentor`` policy ``pixel`` (exits on backbone stages of a
        :class:`StagewiseBackbone` whose stages masked execution runs, predicting the head's
        classes, no fusion into the head)."""
        key = f"MODEL.EXITS.PIXEL.TRAIN_THRESHOLD {self.threshold}"
        if not exits:
            raise ConfigError(f"{key} freezes pixels after the exits, but the model has none (MODEL.EXITS.MODE ds or sr).")
        if fused:
            raise ConfigError(f"{key}: the exits are fused into the head's input (HS3-Fuse), so the head cannot run "
                              "without them; set MODEL.EXITS.PIXEL.TRAIN_THRESHOLD 0.")
        heads = [n for n in exits if n.startswith(HEAD_FEATURE_PREFIX)]
        if heads:
            raise ConfigError(f"{key}: exits {heads} read the head's features, so they answer after the head has run; "
                              "put the exits on backbone stages (MODEL.EXITS.IN_FEATURES).")
        if not isinstance(head, SegHeadMixin):
            raise ConfigError(f"{key} needs one of segdistill's heads (SegHeadMixin), not {type(head).__name__}.")
        num_classes = head.predictor.out_channels
        wrong = {n: e.num_classes for n, e in exits.items() if e.num_classes != num_classes}
        if wrong:
            raise ConfigError(f"{key}: exits {wrong} do not predict the head's {num_classes} classes, so their answers "
                              "cannot stand for the final one (MODEL.EXITS.MODE ds or sr, MODEL.EXITS.NUM_CLASSES empty).")
        if not isinstance(backbone, StagewiseBackbone):
            raise ConfigError(f"{key} runs the backbone stage by stage: {type(backbone).__name__} is not a "
                              "StagewiseBackbone (MODEL.BACKBONE.NAME 'build_timm_backbone').")
        try:
            modules = backbone.stage_modules()
        except StageModulesUnsupported as e:
            raise ConfigError(f"{key}: {e}") from e
        names, stage_of = list(modules), backbone.stage_of_features()
        missing = [n for n in exits if n not in stage_of]
        if missing:
            raise ConfigError(f"{key}: exits {missing} are not stages of {type(backbone).__name__} ({list(stage_of)}).")
        first = min(exits, key=lambda n: names.index(stage_of[n]))
        for name in names[names.index(stage_of[first]) + 1:]:
            try:
                MaskedStage(modules[name], name)
            except UnsupportedModuleError as e:
                raise ConfigError(f"{key}: stage {name} runs masked after exit {first}, but {e}") from e

    def run(self, *, backbone: StagewiseBackbone, exits: Dict[str, nn.Module], head: SegHeadMixin,
            final_classifier: Optional[nn.Module], x: torch.Tensor) -> PixelRun:
        """The forward of ``x`` (``N x 3 x H x W``, padded and normalised): module docstring.
        ``exits``: backbone feature name (``stage_shapes()``) -> :class:`~.heads.ExitHead`, shallowest first; the objective's
        classifiers run when the exits have them."""
        hw = tuple(x.shape[-2:])
        modules, outputs = backbone.stage_modules(), backbone.stage_outputs()
        size = exit_size(hw, next(iter(exits.values())).common_stride)
        need = set(head.in_features) | set(backbone.output_shape()) | set(exits)
        active = torch.ones(x.shape[0], *hw, dtype=torch.bool, device=x.device)
        frozen_any = False
        features: Dict[str, torch.Tensor] = {}
        exit_outs: Dict[str, ExitOutput] = {}
        own: Dict[str, torch.Tensor] = {}
        frozen: Dict[str, torch.Tensor] = {}
        answer: Optional[torch.Tensor] = None  # the freezing exit's logits at frozen pixels
        feat = x
        for name, module in modules.items():
            if frozen_any:
                feat, _ = MaskedStage(module, name)(feat, PixelMask(active), "emulate")
            else:  # nothing frozen yet: the stage's own forward, as forward_stages
                feat = module(feat)
            yielded = backbone.stage_features(outputs[name], feat)
            features.update(yielded)
            for feature in (f for f in outputs[name] if f in exits):  # in the stage's order
                out = exits[feature](yielded[feature], size)  # its features and class logits, for the objectives
                seg = out.seg_logits
                if frozen_any:  # its logits as policy pixel computes them: masked where it can be
                    plan = MaskedStage.or_dense(exits[feature], f"exits.{feature}")
                    if plan is not None:
                        seg, _ = plan(yielded[feature], PixelMask(active), "emulate")
                up = F.interpolate(seg, size=hw, mode="bilinear", align_corners=False)
                with torch.no_grad():  # the decision: a comparison of detached probabilities, per cell
                    top = F.softmax(up.detach().float(), dim=1).amax(dim=1)
                    newly = freeze_decision(top, active, self.threshold, self.cell)
                # this exit's aggregated logits: its own where still active, the earlier answers elsewhere
                aggregated = up if answer is None else torch.where(active[:, None], up, answer)
                answer = torch.where(newly[:, None], up, torch.zeros_like(up) if answer is None else answer)
                own[feature], frozen[feature] = up, newly
                exit_outs[feature] = ExitOutput(out.features, aggregated, out.cls_logits, 1)
                active = active & ~newly
                frozen_any = frozen_any or bool(newly.any())
            if need.issubset(features):
                break
        head_in = {n: features[n] for n in head.in_features}
        head_out = head.forward_outputs(head_in)  # features and aux logits for the objectives
        logits = head_out["logits"]
        if frozen_any:  # the final logits as policy pixel computes them: the head masked where it can be
            plan = MaskedStage.or_dense(head, "sem_seg_head")
            if plan is not None:
                logits, _ = plan(masked_head_input(head, head_in), PixelMask(active), "emulate")
        final_up = crop_logits(head.predict_logits(logits, hw), hw)  # a "stride" head's map may overshoot
        final_logits = torch.where(active[:, None], final_up, answer)
        feats = head_out["features"]
        final = ExitOutput(feats, final_logits, final_classifier(feats) if final_classifier is not None else None, 1)
        backbone_feats = {n: features[n] for n in backbone.output_shape()}
        outputs = MultiExitOutputs(exits={n: exit_outs[n] for n in exits}, final=final, head=head_out, backbone=backbone_feats,
                                   image_size=hw)
        return PixelRun(outputs, own, frozen, active)

    @staticmethod
    def head_losses(head: SegHeadMixin, run: PixelRun, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The head's losses with ``loss_sem_seg`` taken on the final aggregated logits (the
        others, e.g. ``loss_aux``, on the head's own outputs)."""
        losses = head.losses(run.outputs.head, targets)
        losses["loss_sem_seg"] = head.input_size_loss(run.final_logits, targets)
        return losses
