"""Deployment checkpoints: what a trained model keeps at inference.

Training-only parts (a multi-exit segmentor's exits, a distiller's teacher and loss state)
cost nothing at inference because they are dropped here. A model that has such parts
implements :class:`~.contracts.DeployableModel`: its ``deploy_state_dict()`` returns the
weights of its plain deployed model (the keys that model's own config builds: the baseline
configs say ``MODEL.META_ARCHITECTURE "SemanticSegmentorAnySize"``, whose keys are detectron2's
``SemanticSegmentor``'s, so a deployed file loads into either); every other model deploys its
whole ``state_dict()``.
"""
from __future__ import annotations

import os
from typing import Dict

import torch
from torch.nn.parallel import DistributedDataParallel

from .contracts import DeployableModel

__all__ = ["deployed_state_dict", "save_deployed_checkpoint"]


def deployed_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    if isinstance(model, DistributedDataParallel):
        model = model.module
    state = model.deploy_state_dict() if isinstance(model, DeployableModel) else model.state_dict()
    return {k: v.detach().cpu() for k, v in state.items()}


def save_deployed_checkpoint(model: torch.nn.Module, path: str) -> str:
    """Write ``{"model": deployed_state_dict(model)}`` (detectron2's checkpoint format) to ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"model": deployed_state_dict(model), "__author__": "segdistill deploy"}, path)
    return path
