"""BatchNorm folding for inference: every convolution's norm computed inside the convolution.

At inference a BatchNorm after a convolution is a per-channel affine map with fixed numbers
(its running statistics), one more pass over the map; MobileNetV2 has one after each of its
~50 convolutions. :func:`fold_batch_norms` writes each such norm into its convolution's weight
and bias (:func:`fold_conv_norm`, the arithmetic masked execution's sparse mode uses too) and
replaces the norm by what it did besides normalising: its activation for timm's ``*Act``
norms (with their dropout, when it is not an Identity), else an ``nn.Identity``; detectron2's
``Conv2d`` drops its ``norm``. Outputs are unchanged up to float rounding; the folded model's
state dict no longer has the norms' keys, so it is an inference-only object (it is not saved
as a checkpoint: a config builds the norms back).

What is folded: an explicit registry of exact types (a subclass may run its parts in
another order), :func:`register_fold`:

* containers whose children run one after another (``nn.Sequential``; timm's
  ``FeatureDictNet`` / ``FeatureListNet``, the ResNet bodies): a child norm right after a
  convolution (an ``nn.Conv2d``, a detectron2 ``Conv2d`` without norm and activation, or an
  ``nn.Sequential`` ending in one: mmseg's deep stem followed by ``bn1``);
* timm's ResNet ``BasicBlock`` (``conv1/bn1``, ``conv2/bn2``) and ``Bottleneck`` (+
  ``conv3/bn3``), MobileNetV2's ``InvertedResidual`` (``conv_pw/bn1``, ``conv_dw/bn2``,
  ``conv_pwl/bn3``) and ``DepthwiseSeparableConv`` (``conv_dw/bn1``, ``conv_pw/bn2``), with
  their space-to-depth pair, the stems of ``EfficientNetFeatures`` / ``EfficientNet``
  (``conv_stem/bn1``) and of ``HighResolutionNet(Features)`` (``conv1/bn1``, ``conv2/bn2``);
* detectron2's ``Conv2d(norm=...)`` (every head's and exit's conv_norm unit).

The norms (:data:`FOLDABLE_NORMS`): ``BatchNorm2d``, ``SyncBatchNorm``, detectron2's
``NaiveSyncBatchNorm`` and ``FrozenBatchNorm2d``, torchvision's ``FrozenBatchNorm2d``, timm's
``BatchNormAct2d`` / ``SyncBatchNormAct`` / ``FrozenBatchNormAct2d``, each with running
statistics. Anything else (a norm after something other than a convolution, a norm without
running statistics, GroupNorm, a convolution of another type, a convolution or norm reachable
under several names: it may run elsewhere too) is left as it is and listed in
:attr:`FoldReport.left` with the reason.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from detectron2.layers import Conv2d as D2Conv2d, FrozenBatchNorm2d as D2FrozenBatchNorm2d, NaiveSyncBatchNorm
from timm.layers.norm_act import BatchNormAct2d, FrozenBatchNormAct2d, SyncBatchNormAct
from timm.models import FeatureDictNet, FeatureListNet
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models.efficientnet import EfficientNet, EfficientNetFeatures
from timm.models.hrnet import HighResolutionNet, HighResolutionNetFeatures
from timm.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["FOLDABLE_NORMS", "FoldAware", "FoldReport", "fold_batch_norms", "fold_batch_norms_report", "fold_conv_norm",
           "register_fold", "folded_structures"]

logger = logging.getLogger(__name__)


def _identity(norm: nn.Module) -> nn.Module:
    return nn.Identity()


def _activation(norm: nn.Module) -> nn.Module:
    """What a timm ``*Act`` norm does after normalising: ``act(drop(x))``."""
    if type(norm.drop) is nn.Identity:
        return norm.act
    return nn.Sequential(norm.drop, norm.act)


#: norm type -> what replaces it once folded (every one computes ``(x - mean) / sqrt(var + eps) * weight + bias``
#: with its running statistics at inference, then, for timm's ``*Act`` norms, dropout and activation)
FOLDABLE_NORMS: Dict[type, Callable[[nn.Module], nn.Module]] = {
    nn.BatchNorm2d: _identity,
    nn.SyncBatchNorm: _identity,
    NaiveSyncBatchNorm: _identity,  # detectron2's "SyncBN": plain BN at inference
    D2FrozenBatchNorm2d: _identity,
    FrozenBatchNorm2d: _identity,  # torchvision's, what timm's freeze_batch_norm_2d makes of a BatchNorm2d
    BatchNormAct2d: _activation,
    SyncBatchNormAct: _activation,
    FrozenBatchNormAct2d: _activation,
}

# What the report lists when it is left unfolded (isinstance: subclasses of these are norms too).
_REPORTED_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
                   nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm, D2FrozenBatchNorm2d,
                   FrozenBatchNorm2d, FrozenBatchNormAct2d)


def fold_conv_norm(conv: nn.Conv2d, norm: Optional[nn.Module]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``norm(conv(x))`` as one convolution (the norm's running statistics),
    in the weight's dtype (computed in float64); ``norm`` None: the convolution's own (a zero bias
    where it has none)."""
    w = conv.weight.detach()
    b = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    if norm is None:
        return w, b
    scale = torch.rsqrt(norm.running_var.detach().double() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.detach().double()
    shift = -norm.running_mean.detach().double() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach().double()
    return ((w.double() * scale.view(-1, 1, 1, 1)).to(w.dtype),
            (b.double() * scale + shift).to(b.dtype))


@dataclass
class FoldReport:
    """``folded``: the names of the norms folded into their convolutions; ``left``: ``(name,
    type, reason)`` of every norm left as it was."""

    folded: List[str] = field(default_factory=list)
    left: List[Tuple[str, str, str]] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{len(self.folded)} norms folded into their convolutions"
        if self.left:
            text += f"; {len(self.left)} left as they are: " + "; ".join(f"{n} ({t}: {r})" for n, t, r in self.left)
        return text


class FoldAware:
    """The contract of a module that keeps something computed from the weights of the modules
    under it (masked execution's compiled stages hold the norms they fold): :func:`fold_batch_norms`
    calls :meth:`after_fold` on every such module once the norms are folded and replaced."""

    def after_fold(self) -> None:
        raise NotImplementedError


# ----------------------------------------------------------------------------- the registry
# exact container type -> its (convolution, norm) pairs as child names, the norm applied to the convolution's output
_PAIRS: Dict[type, Callable[[nn.Module], List[Tuple[str, str]]]] = {}


def register_fold(*types: type):
    """Register ``fn(module) -> [(conv child name, norm child name), ...]`` for exactly ``types``:
    pairs where the module applies the norm directly to the convolution's output, and nothing else
    reads that output."""
    def deco(fn):
        for t in types:
            _PAIRS[t] = fn
        return fn
    return deco


def folded_structures() -> List[str]:
    """The container types whose convolution -> norm pairs are folded (and detectron2's Conv2d)."""
    return sorted({t.__qualname__ for t in _PAIRS} | {"detectron2.layers.Conv2d"})


@register_fold(nn.Sequential, FeatureDictNet, FeatureListNet)
def _in_order(module: nn.Module) -> List[Tuple[str, str]]:
    """Children run one after another (timm's feature wrappers run their items in order too)."""
    names = [n for n, _ in module.named_children()]
    return list(zip(names[:-1], names[1:]))


def _attributes(*pairs: Tuple[str, str]):
    return lambda module: list(pairs)


register_fold(BasicBlock)(_attributes(("conv1", "bn1"), ("conv2", "bn2")))
register_fold(Bottleneck)(_attributes(("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")))
register_fold(InvertedResidual)(_attributes(("conv_s2d", "bn_s2d"), ("conv_pw", "bn1"), ("conv_dw", "bn2"),
                                            ("conv_pwl", "bn3")))
register_fold(DepthwiseSeparableConv)(_attributes(("conv_s2d", "bn_s2d"), ("conv_dw", "bn1"), ("conv_pw", "bn2")))
register_fold(EfficientNetFeatures)(_attributes(("conv_stem", "bn1")))
register_fold(EfficientNet)(_attributes(("conv_stem", "bn1"), ("conv_head", "bn2")))
register_fold(HighResolutionNet, HighResolutionNetFeatures)(_attributes(("conv1", "bn1"), ("conv2", "bn2")))


def _conv_of(module: Optional[nn.Module]) -> Optional[nn.Conv2d]:
    """The convolution whose output ``module``'s output is: an ``nn.Conv2d``, a detectron2 Conv2d
    with neither norm nor activation, the last of an ``nn.Sequential``; else None."""
    if type(module) is nn.Conv2d or type(module) is D2Conv2d and module.norm is None and module.activation is None:
        return module
    if type(module) is nn.Sequential and len(module) > 0:
        return _conv_of(module[-1])
    return None


def _unfoldable(norm: nn.Module) -> Optional[str]:
    """Why ``norm`` cannot be folded (None: it can)."""
    if type(norm) not in FOLDABLE_NORMS:
        return "not a type the fold knows"
    if norm.running_mean is None or norm.running_var is None:
        return "no running statistics (it normalises with each batch's)"
    return None


def _write(conv: nn.Conv2d, norm: nn.Module) -> None:
    w, b = fold_conv_norm(conv, norm)
    with torch.no_grad():
        conv.weight.copy_(w)
        if conv.bias is None:
            conv.bias = nn.Parameter(b, requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(b)


def fold_batch_norms_report(model: nn.Module) -> FoldReport:
    """Fold ``model``'s norms into their convolutions, in place (module docstring); returns what was
    folded and what was left. ``model`` and every module in it must be in eval() (a training model's
    norms use each batch's statistics, not the running ones the fold writes)."""
    training = [n or type(model).__name__ for n, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(
            f"fold_batch_norms: {len(training)} modules are in training mode (first: {training[0]}); folding writes "
            "the running statistics into the convolutions, which is right at inference only. Call model.eval() "
            "first (and fold a copy of a model that is still being trained).")
    report = FoldReport()
    # A module reachable under several names may run in several places, where another path reads
    # its output (a shared convolution) or applies it again (a shared norm): such pairs are left.
    places = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    shared = {i for i, n in places.items() if n > 1}
    reasons: Dict[int, str] = {}  # why a norm after a convolution was left
    why_shared = "it or its convolution is reachable under several names (a shared module)"
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if type(module) is D2Conv2d and module.norm is not None:
            if {id(module), id(module.norm)} & shared:
                reasons[id(module.norm)] = why_shared
            elif _unfoldable(module.norm) is None:
                _write(module, module.norm)
                module.norm = None  # detectron2's Conv2d: conv -> norm -> activation; the activation stays
                report.folded.append(f"{prefix}norm")
            continue
        pairs = _PAIRS.get(type(module))
        if pairs is None:
            continue
        children = dict(module.named_children())
        for conv_name, norm_name in pairs(module):
            conv, norm = _conv_of(children.get(conv_name)), children.get(norm_name)
            if conv is None or norm is None or _unfoldable(norm) is not None:
                continue
            if {id(conv), id(norm)} & shared:
                reasons[id(norm)] = why_shared
                continue
            _write(conv, norm)
            replacement = FOLDABLE_NORMS[type(norm)](norm)
            setattr(module, norm_name, replacement)
            children[norm_name] = replacement
            report.folded.append(prefix + norm_name)
    for module in model.modules():
        if isinstance(module, FoldAware):
            module.after_fold()
    for name, module in model.named_modules():
        if isinstance(module, _REPORTED_NORMS):
            why = _unfoldable(module) or reasons.get(
                id(module), "not right after a convolution in a structure the fold knows")
            report.left.append((name, type(module).__qualname__, why))
    return report


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """``model`` (in eval()) with its convolutions' norms folded, in place (module docstring);
    the norms left as they were are logged. Returns ``model``."""
    report = fold_batch_norms_report(model)
    (logger.warning if report.left else logger.info)("BatchNorm folding: %s.", report.summary())
    return model
