"""DistributedDataParallel that also works for CPU models (gloo).

detectron2's ``create_ddp_model`` always passes ``device_ids=[local_rank]``, which
``DistributedDataParallel`` refuses for a model on the CPU. Here ``device_ids`` is passed
only for CUDA models, and ``find_unused_parameters`` comes from the caller (the config).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detectron2.utils import comm

__all__ = ["create_ddp_model", "broadcast_batchnorm_buffers", "unwrap_model"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@torch.no_grad()
def broadcast_batchnorm_buffers(model: nn.Module, src: int = 0) -> int:
    """Copy the BatchNorm running statistics of process ``src`` to every process.

    With plain BN each training process keeps running statistics of its own batches, and
    only rank 0's model is saved; evaluating in several processes would evaluate a mix of
    models that is not the saved one. The trainers call this before every evaluation, so the
    evaluated model is the saved model (SyncBN keeps the statistics equal already). Only the
    BN buffers change: training never reads them. Returns the number of tensors sent (0 in
    one process)."""
    if comm.get_world_size() == 1:
        return 0
    model = unwrap_model(model)
    n = 0
    for m in model.modules():
        if isinstance(m, _BATCH_NORMS) and m.track_running_stats:
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked):
                if buf is not None:
                    dist.broadcast(buf, src)
                    n += 1
    return n
