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
  a stage itself (per-pixel anytime inference runs the stages after an exit with
  :mod:`segdistill.modeling.masked`): an ordered ``{stage name: module}``, the stem included
  in the first stage, such that ``x_k = modules[name_k](x_{k-1})`` with ``x_0`` the input
  gives exactly ``forward_stages``' tensors (bit for bit). Each module maps one tensor to one
  tensor. The modules are the backbone's own (a stage of several body modules is an
  ``nn.Sequential`` built on call around them, holding no parameter of its own; it is not a
  submodule of the backbone, so the state dict is unchanged). A backbone whose stages are not
  such a chain (HRNet: a stage maps a list of branches to a list) raises
  :class:`StageModulesUnsupported` with the reason.

segdistill's timm backbones (``TimmBackbone``: ResNet, MobileNetV2 and other timm
``features_only`` models; ``HRNetBackbone``) implement it.
"""
from __future__ import annotations

from abc import abstractmethod
from collections import OrderedDict
from typing import Dict, Iterator, Tuple

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
