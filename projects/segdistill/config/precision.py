"""Numeric precision and memory format: the keys, and their resolution before anything is built.

* ``SOLVER.AMP.ENABLED`` (detectron2's switch; lazy configs: ``train.amp.enabled``) keeps its
  meaning: the training step's forward runs under ``torch.autocast``; it now works on CPU too.
* ``SOLVER.AMP.DTYPE`` (lazy: ``train.amp.dtype``): ``"auto"`` (detectron2's fp16 on CUDA,
  bf16 on CPU, where fp16 autocast has no fast kernels), ``"bf16"`` or ``"fp16"`` (CUDA only;
  the step then scales its loss with a ``GradScaler``).
* ``MODEL.DISTILL.TEACHER.PRECISION`` (defaults.py, with the Distiller's keys): the frozen
  teacher's forward on its own: ``"step"`` (whatever the step runs in), ``"fp32"``, ``"bf16"``,
  ``"fp16"`` (CUDA only). A bf16 teacher with an fp32 student is valid.
* ``TEST.PRECISION`` (lazy: ``train.test_precision``): evaluation and inference (periodic and
  ``--eval-only`` evaluation, the anytime tools, prediction pictures): ``"fp32"``, ``"bf16"``,
  ``"fp16"`` (CUDA only), as ``torch.autocast``.
* ``MODEL.CHANNELS_LAST`` (lazy: ``train.channels_last``): the model's 4-d weights and its
  input batch in ``torch.channels_last`` memory format, in training, evaluation and inference.
* ``TEST.FOLD_BN`` (lazy: ``train.fold_bn``): evaluation and inference (the same places as
  ``TEST.PRECISION``, and ``tools/export_model.py`` before tracing) run the model with every
  convolution's BatchNorm folded into it (``segdistill.modeling.fold``); training never does.

:func:`amp_dtype` and :func:`precision_dtype` turn the strings into a ``torch.dtype`` (None:
float32) or raise a :class:`ConfigError` naming the key and what to write; the trainers call
them before the model is built, so a wrong combination fails before ``OUTPUT_DIR`` is written.
"""
from __future__ import annotations

from typing import Optional

import torch

from .checks import ConfigError
from .hooks import register_config_hook

__all__ = ["AMP_DTYPES", "TEACHER_PRECISIONS", "add_precision_config", "amp_dtype", "precision_dtype", "device_type",
           "teacher_dtype"]

AMP_DTYPES = ("auto", "bf16", "fp16")
TEACHER_PRECISIONS = ("step", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@register_config_hook
def add_precision_config(cfg) -> None:
    """``SOLVER.AMP.DTYPE`` (detectron2 defines ``SOLVER.AMP.ENABLED``), ``MODEL.CHANNELS_LAST``, ``TEST.PRECISION``,
    ``TEST.FOLD_BN``."""
    # Autocast dtype of the training step when SOLVER.AMP.ENABLED: "auto" (fp16 on CUDA, as
    # detectron2's AMPTrainer; bf16 on CPU), "bf16", or "fp16" (CUDA only, with a GradScaler).
    # Checkpoints stay float32 whatever the dtype. Lazy configs: train.amp.dtype.
    cfg.SOLVER.AMP.DTYPE = "auto"
    # The model's weights and its input batch in channels_last memory format (training,
    # evaluation, inference; faster convolutions on most CPUs and on tensor cores). Lazy configs:
    # train.channels_last.
    cfg.MODEL.CHANNELS_LAST = False
    # Precision of evaluation and inference (periodic and --eval-only evaluation, anytime
    # calibration, prediction pictures): "fp32", "bf16" or "fp16" (CUDA only), under autocast.
    # Lazy configs: train.test_precision.
    cfg.TEST.PRECISION = "fp32"
    # Evaluation and inference (as TEST.PRECISION, and tools/export_model.py before tracing) with
    # each convolution's BatchNorm folded into its weight and bias: one pass less over the map per
    # norm, the same outputs up to float rounding. Periodic evaluation folds a copy. Lazy configs:
    # train.fold_bn.
    cfg.TEST.FOLD_BN = False


def device_type(device) -> str:
    """``"cuda"`` / ``"cpu"`` / ... of a device string or ``torch.device`` (autocast's device_type)."""
    return torch.device(device).type


def precision_dtype(name: str, device, *, key: str) -> Optional[torch.dtype]:
    """``"fp32"`` -> None, ``"bf16"`` / ``"fp16"`` -> the dtype; fp16 off CUDA and unknown names
    are ConfigErrors naming ``key``."""
    if name not in _DTYPES:
        raise ConfigError(f"{key} is {name!r}; write one of {sorted(_DTYPES)}.")
    kind = device_type(device)
    if name == "fp16" and kind != "cuda":
        raise ConfigError(
            f"{key} is 'fp16' on the {kind} device: fp16 mixed precision needs CUDA (a gradient scaler and fast "
            f"fp16 kernels). Write `{key} bf16` on {kind}.")
    if name == "bf16" and kind == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{key} is 'bf16' but this GPU has no bf16 support: write `{key} fp16`.")
    return _DTYPES[name]


def amp_dtype(enabled: bool, dtype: str, device, *, key: str = "SOLVER.AMP.DTYPE") -> Optional[torch.dtype]:
    """The autocast dtype of the training step: None when AMP is off (float32), else the dtype
    ``dtype`` names (``"auto"``: fp16 on CUDA, bf16 elsewhere). ``dtype`` is checked even when AMP
    is off, so a typo fails the day it is written."""
    if dtype not in AMP_DTYPES:
        raise ConfigError(f"{key} is {dtype!r}; write one of {list(AMP_DTYPES)}.")
    if not enabled:
        return None
    if dtype == "auto":
        dtype = "fp16" if device_type(device) == "cuda" else "bf16"
    return precision_dtype(dtype, device, key=key)


def teacher_dtype(precision: str, device, step: Optional[torch.dtype], *,
                  key: str = "MODEL.DISTILL.TEACHER.PRECISION") -> Optional[torch.dtype]:
    """The teacher's forward dtype: ``step`` for ``"step"``, else what ``precision`` names."""
    if precision not in TEACHER_PRECISIONS:
        raise ConfigError(f"{key} is {precision!r}; write one of {list(TEACHER_PRECISIONS)}.")
    return step if precision == "step" else precision_dtype(precision, device, key=key)

