"""DistributedDataParallel that also works for CPU models (gloo).

detectron2's ``create_ddp_model`` always passes ``device_ids=[local_rank]``, which
``DistributedDataParallel`` refuses for a model on the CPU. Here ``device_ids`` is passed
only for CUDA models, and ``find_unused_parameters`` comes from the caller (the config).
"""
from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detectron2.utils import comm

__all__ = ["create_ddp_model"]


def create_ddp_model(model: nn.Module, *, fp16_compression: bool = False, **kwargs) -> nn.Module:
    """Wrap ``model`` in DDP when there is more than one process; a no-op otherwise."""
    if comm.get_world_size() == 1:
        return model
    device = next(model.parameters()).device
    if device.type == "cuda":
        kwargs.setdefault("device_ids", [comm.get_local_rank()])
    else:
        kwargs.pop("device_ids", None)
    ddp = DistributedDataParallel(model, **kwargs)
    if fp16_compression:
        from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks

        ddp.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
    return ddp
