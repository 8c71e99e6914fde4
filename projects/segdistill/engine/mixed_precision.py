"""The training step in mixed precision (CPU and CUDA), and the channels_last memory format.

detectron2's ``AMPTrainer`` is fp16 on CUDA only: on CPU it fails at its first step, after the
model is built and the config written. :class:`MixedPrecisionTrainer` is the project's step for
``SOLVER.AMP.ENABLED`` (lazy: ``train.amp.enabled``): the forward (the model and its losses)
under ``torch.autocast`` of the model's device in the dtype that
:func:`segdistill.config.amp_dtype` resolved (bf16 on CPU; fp16 or bf16 on CUDA), the backward
outside it (autocast's advice), and, for fp16 only, a ``GradScaler`` whose state is saved in the
checkpoints with the iteration (``--resume`` continues it). The parameters, the optimizer state
and therefore the checkpoints stay float32: autocast casts copies of the weights per op.

Parts that must stay float32 under autocast (softmax, KL, reductions of the distillation losses)
are the models' business: the Distiller's float32 island (``meta_arch/distill.py``).

:func:`inference_precision` is the autocast of evaluation and inference (``TEST.PRECISION``;
lazy: ``train.test_precision``). :func:`fold_for_inference` is ``TEST.FOLD_BN`` (lazy:
``train.fold_bn``): the evaluated or deployed model with its convolutions' BatchNorms folded
(:mod:`segdistill.modeling.fold`). :func:`use_channels_last` puts a model's 4-d weights and the input batch of each of its
backbones in ``torch.channels_last`` (``MODEL.CHANNELS_LAST``; lazy: ``train.channels_last``).
"""
from __future__ import annotations

import contextlib
import copy
import time
from typing import Optional

import torch
from torch import nn

from detectron2.engine import SimpleTrainer
from detectron2.modeling import Backbone

from ..config import device_type, precision_dtype
from ..modeling.fold import fold_batch_norms

__all__ = ["MixedPrecisionTrainer", "build_train_step", "use_channels_last", "model_device", "inference_precision",
           "fold_for_inference"]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class MixedPrecisionTrainer(SimpleTrainer):
    """SimpleTrainer whose forward runs under ``torch.autocast(device_type, dtype)``.

    Args (besides SimpleTrainer's ``model, data_loader, optimizer``):
        dtype: ``torch.bfloat16`` or ``torch.float16`` (:func:`segdistill.config.amp_dtype`).
        device: the model's device (autocast's device type); fp16 needs CUDA.
    """

    def __init__(self, model, data_loader, optimizer, *, dtype: torch.dtype, device, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"MixedPrecisionTrainer: dtype must be bfloat16 or float16, got {dtype}.")
        self.device_type = device_type(device)
        if dtype == torch.float16 and self.device_type != "cuda":
            raise ValueError("MixedPrecisionTrainer: float16 autocast needs a CUDA model; use bfloat16 on "
                             f"{self.device_type}.")
        self.dtype = dtype
        # Loss scaling only where float16's range needs it; a disabled scaler passes everything through.
        self.grad_scaler = torch.amp.GradScaler(self.device_type, enabled=dtype == torch.float16)

    def run_step(self):
        if not self.model.training:
            raise RuntimeError("MixedPrecisionTrainer: the model was switched to eval() during training.")
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)  # skipped (fp16) when a gradient is inf / NaN
        self.grad_scaler.update()

    def state_dict(self):
        state = super().state_dict()
        state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "grad_scaler" in state_dict:  # a checkpoint of a float32 run continued in mixed precision has none
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


def build_train_step(model, data_loader, optimizer, *, dtype: Optional[torch.dtype]) -> SimpleTrainer:
    """detectron2's SimpleTrainer for float32 (``dtype`` None), else :class:`MixedPrecisionTrainer`
    on the model's device."""
    if dtype is None:
        return SimpleTrainer(model, data_loader, optimizer)
    return MixedPrecisionTrainer(model, data_loader, optimizer, dtype=dtype, device=model_device(model))


def inference_precision(precision: str, device, *, key: str = "TEST.PRECISION"):
    """The context evaluation and inference run in: nothing for ``"fp32"``, else autocast of
    ``device``'s type in the named dtype (a ConfigError for fp16 off CUDA or an unknown name)."""
    dtype = precision_dtype(precision, device, key=key)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type(device), dtype=dtype)


def fold_for_inference(model: nn.Module, enabled: bool, *, copy_model: bool = False) -> nn.Module:
    """``model`` as evaluation and inference run it under ``TEST.FOLD_BN`` (lazy: ``train.fold_bn``):
    switched to eval() with every convolution's BatchNorm folded into it
    (:func:`segdistill.modeling.fold.fold_batch_norms`; the norms it cannot fold are logged), in
    place, or in a copy with ``copy_model`` (a model that is still being trained: periodic
    evaluation); ``model`` itself when not ``enabled``."""
    if not enabled:
        return model
    if copy_model:
        model = copy.deepcopy(model)
    return fold_batch_norms(model.eval())


def _channels_last_input(module, args):
    return tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4
                 else a for a in args)


def use_channels_last(model: nn.Module, enabled: bool = True) -> nn.Module:
    """``model`` with its 4-d weights in channels_last and every detectron2 ``Backbone`` in it
    converting its 4-d input batch (in place; returns ``model``). A wrapper that moves modules held
    outside its tree with itself (the Distiller's teacher) converts their weights too. No-op when
    not ``enabled``."""
    if not enabled:
        return model
    model.to(memory_format=torch.channels_last)
    for m in model.modules():
        if isinstance(m, Backbone):
            m.register_forward_pre_hook(_channels_last_input)
    return model
