"""One switch for the normalisation of timm bodies: BN, SyncBN or frozen BN.

timm's MobileNetV2 uses ``BatchNormAct2d`` (BN with its activation fused in), which
detectron2's ``FrozenBatchNorm2d.convert_frozen_batchnorm`` would replace by a plain frozen
BN, silently dropping the activation; timm's own converters keep it.
"""
from torch import nn
from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d

NORMS = ("BN", "SyncBN", "FrozenBN")


def convert_norm(module: nn.Module, norm: str) -> nn.Module:
    """Convert the BatchNorm layers of ``module`` (in place where possible) to ``norm``."""
    if norm not in NORMS:
        raise ValueError(f"Unknown backbone norm {norm!r} (MODEL.TIMM.NORM); choose from {NORMS}.")
    if norm == "BN":
        return module
    # Both converters walk the module and convert children in place; they return a new
    # module only when ``module`` itself is a norm layer.
    convert = convert_sync_batchnorm if norm == "SyncBN" else freeze_batch_norm_2d
    return convert(module)
