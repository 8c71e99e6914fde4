"""The stage-by-stage backbone contract that anytime inference runs on.

A :class:`StagewiseBackbone` is a detectron2 ``Backbone`` that can also be run one stage at a
time, so that a consumer which stops early (an anytime model answering from an exit) never
computes the later stages:

* ``forward_stages(x)`` is a *lazy generator* of ``(stage name, features)``, shallowest first,
  over every stage the backbone can return (not only ``output_shape()``'s). Stage ``k + 1``
  is computed only when the consumer asks for the next item; closing the generator (or just
  dropping it) leaves the later stages unrun. The tensors are exactly those of ``forward``
  (the same modules applied in the same order), so a consumer that runs every stage gets the
  plain model's features bit for bit.
* ``stage_shapes()`` gives ``{stage name: ShapeSpec}`` of those stages, in the order
  ``forward_stages`` yields them.
* ``stage_modules()`` names the modules that compute each stage, so that a consumer can run
  a stage itself (per-pixel anytime inference and mask-aware training run the stages after an
  exit with :mod:`segdistill.modeling.masked`): an ordered ``{stage name: module}``, the stem
  included in the first stage. The modules chain: ``y_k = modules[name_k](y_{k-1})`` with
  ``y_0`` the input image, and nothing else passes between stages.
* ``stage_outputs()`` says which named features (``stage_shapes()``' names, what exits and
  taps attach to) each stage yields: an ordered ``{stage name: (feature names)}`` over the
  same stages, whose names, concatenated, are ``stage_shapes()``' in order (each feature
  belongs to exactly one stage). A stage of **one** feature returns one ``N x C x H x W``
  tensor; a stage of **several** returns a list of them, in that order (HRNet: its branches,
  finest first), and the next stage takes that list. :meth:`StagewiseBackbone.stage_features`
  turns a stage's return value into ``{feature name: tensor}``. Either way the tensors are
  exactly ``forward_stages``' (bit for bit). The default names each stage's one output after
  the stage (``{name: (name,)}``: ResNet, MobileNetV2); a backbone with list-valued stages
  overrides it.

  Masked execution takes such a list as it is (:class:`~segdistill.modeling.masked.PixelMask`
  gives every branch's resolution from one mask: a coarse pixel is active if any finer pixel
  it covers is, the max-pool rule), so a consumer hands a stage and its input to
  ``MaskedStage`` whatever the stage returns.

  The modules are the backbone's own (a stage of several body modules is a wrapper built on
  call around them, holding no parameter of its own; it is not a submodule of the backbone,
  so the state dict is unchanged). A backbone whose stages cannot be named as such a chain
  (a timm body that runs whole) raises :class:`StageModulesUnsupported` with the reason.

segdistill's timm backbones (``TimmBackbone``: ResNet, MobileNetV2 and other timm
``features_only`` models; ``HRNetBackbone``) implement it.
"""
from __future__ import annotations

from abc import abstractmethod
from collections import OrderedDict
from typing import Dict, Iterator, List, Sequence, Tuple, Union

import torch
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone

__all__ = ["StagewiseBackbone", "StageModulesUnsupported"]


class StageModulesUnsupported(NotImplementedError):
    """A backbone whose stages cannot be named as a chain of one-tensor modules."""


class StagewiseBackbone(Backbone):
    """A Backbone that can run stage by stage (see the module docstring)."""

    @abstractmethod
    def forward_stages(self, x: torch.Tensor) -> Iterator[Tuple[str, torch.Tensor]]:
        """Lazily yield ``(stage name, features)`` for every stage, shallowest first."""

    @abstractmethod
    def stage_shapes(self) -> Dict[str, ShapeSpec]:
        """``{stage name: ShapeSpec}`` of every stage ``forward_stages`` yields, in that order."""

    @abstractmethod
    def stage_modules(self) -> "OrderedDict[str, nn.Module]":
        """``{stage name: module}`` in ``forward_stages``' order, chaining from the input to every
        stage (module docstring); :class:`StageModulesUnsupported` where the stages are no chain."""

    def stage_outputs(self) -> "OrderedDict[str, Tuple[str, ...]]":
        """``{stage name: the feature names it yields}``, in ``stage_modules()``' order (module
        docstring): the features ``forward_stages`` computes together. Default: one feature
        per stage, named after it (``stage_shapes()``' names; it holds for a body whose
        ``stage_modules()`` is refused too, so consumers that only group features can ask it)."""
        return OrderedDict((name, (name,)) for name in self.stage_shapes())

    @staticmethod
    def stage_features(names: Sequence[str], y: Union[torch.Tensor, List[torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """``{feature name: tensor}`` of a stage that yields ``names`` and returned ``y``: one
        name takes a tensor, several a list of as many tensors (module docstring)."""
        names = tuple(names)
        if len(names) == 1 and isinstance(y, torch.Tensor):
            return {names[0]: y}
        if len(names) > 1 and isinstance(y, (list, tuple)) and len(y) == len(names):
            return dict(zip(names, y))
        got = f"a list of {len(y)}" if isinstance(y, (list, tuple)) else type(y).__name__
        raise ValueError(f"A stage yielding features {list(names)} must return "
                         f"{'one tensor' if len(names) == 1 else f'a list of {len(names)} tensors'}, got {got}.")

    def stage_of_features(self) -> Dict[str, str]:
        """``{feature name: the stage that yields it}`` (:meth:`stage_outputs` inverted)."""
        return {f: stage for stage, names in self.stage_outputs().items() for f in names}
