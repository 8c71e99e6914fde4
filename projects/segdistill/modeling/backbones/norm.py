"""One switch for the model's normalisation: BN, SyncBN or frozen BN.

``MODEL.NORM`` sets the norm of every part (backbone, heads, auxiliary heads, exits, HS3-Fuse
blocks); left empty it defers to the per-part keys ``MODEL.TIMM.NORM`` (backbone) and
``MODEL.SEM_SEG_HEAD.NORM`` (everything after the backbone: heads, exits, fuse blocks), as
detectron2 keeps a norm key per part (``MODEL.RESNETS.NORM``, ``MODEL.SEM_SEG_HEAD.NORM``).
There is no other norm key (the former ``MODEL.EXITS.NORM`` is gone: exits follow the head).
``resolve_norm(cfg, part)`` is the one place that reads them: every component builds its
norm layers from what it returns.

* ``BN``: plain BatchNorm, for CPU and one GPU;
* ``SyncBN``: statistics synchronised across GPUs (needs CUDA when several processes train);
* ``FrozenBN``: fixed statistics and affine parameters, for fine-tuning a trained model;
* ``auto``: ``SyncBN`` when several CUDA processes train, else ``BN``.

timm's MobileNetV2 uses ``BatchNormAct2d`` (BN with its activation fused in), which
detectron2's ``FrozenBatchNorm2d.convert_frozen_batchnorm`` would replace by a plain frozen
BN, silently dropping the activation; timm's own converters keep it.
"""
from torch import nn
from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d

__all__ = ["NORMS", "MODEL_NORMS", "NORM_PARTS", "auto_norm", "convert_norm", "resolve_norm"]

NORMS = ("BN", "SyncBN", "FrozenBN")
MODEL_NORMS = ("", "auto") + NORMS
NORM_PARTS = {"backbone": "MODEL.TIMM.NORM", "head": "MODEL.SEM_SEG_HEAD.NORM"}


def convert_norm(module: nn.Module, norm: str) -> nn.Module:
    """Convert the BatchNorm layers of ``module`` (in place where possible) to ``norm``."""
    if norm not in NORMS:
        raise ValueError(f"Unknown backbone norm {norm!r} (MODEL.TIMM.NORM / MODEL.NORM); choose from {NORMS}.")
    if norm == "BN":
        return module
    # Both converters walk the module and convert children in place; they return a new
    # module only when ``module`` itself is a norm layer.
    convert = convert_sync_batchnorm if norm == "SyncBN" else freeze_batch_norm_2d
    return convert(module)


def auto_norm(device: str = "cuda") -> str:
    """``SyncBN`` when several processes train on CUDA ``device``, else ``BN``.

    Call it when the model is built (after ``launch()``): lazy configs write
    ``norm=L(auto_norm)(device="${train.device}")``.
    """
    from detectron2.utils import comm

    return "SyncBN" if comm.get_world_size() > 1 and str(device).startswith("cuda") else "BN"


def resolve_norm(cfg, part: str) -> str:
    """The norm of a model ``part`` ("backbone" or "head"): ``MODEL.NORM`` when set, else the
    part's own key; ``auto`` becomes SyncBN on several CUDA processes and BN otherwise."""
    if part not in NORM_PARTS:
        raise ValueError(f"Unknown model part {part!r} for resolve_norm; choose from {sorted(NORM_PARTS)}.")
    norm = cfg.MODEL.get("NORM", "")
    if norm not in MODEL_NORMS:
        raise ValueError(f"Unknown MODEL.NORM {norm!r}; choose from {MODEL_NORMS} ('' = per-part keys).")
    if norm == "":
        node = cfg.MODEL.TIMM if part == "backbone" else cfg.MODEL.SEM_SEG_HEAD
        return node.NORM
    if norm == "auto":
        return auto_norm(cfg.MODEL.DEVICE)
    if norm == "SyncBN" and not str(cfg.MODEL.DEVICE).startswith("cuda"):
        from detectron2.utils import comm

        if comm.get_world_size() > 1:
            raise ValueError(
                f"MODEL.NORM SyncBN synchronises BatchNorm over CUDA processes, but MODEL.DEVICE is "
                f"{cfg.MODEL.DEVICE!r}: use MODEL.NORM BN or auto on CPU."
            )
    return norm
