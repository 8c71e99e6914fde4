"""What the first GPU run needs, checked on CPU: the SKD/IFVD discriminator never holds SyncBN
(the gradient penalty differentiates it twice, and SyncBN has no double backward) and trains in
two processes; CIRKD's batch term within memory at the papers' batch (chunked, checkpointed; its
peak memory accounted on the meta device); and the host-device synchronisations of one training
step of every method, counted."""
import os

import pytest
import torch
from torch import nn

from conftest import free_port, set_keys
from detectron2.layers import ShapeSpec
from detectron2.layers.batch_norm import NaiveSyncBatchNorm
from segdistill.modeling.distill import DISTILL_LOSSES
from segdistill.modeling.distill.skd import HolisticDistillation
from test_distill_taps import distill_cfg

K = 5


# ------------------------------------------------------------------------------------------
# SKD / IFVD: the discriminator's norm
# ------------------------------------------------------------------------------------------
def _norm_layers(module):
    return [m for m in module.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm))]


@pytest.mark.parametrize("name", ["skd", "ifvd"])
@pytest.mark.parametrize("norm", ["SyncBN", "auto", "FrozenBN"])
def test_discriminator_has_plain_batchnorm_whatever_model_norm(tmp_path, name, norm):
    cfg = distill_cfg(tmp_path, [name], **{"MODEL.NORM": norm, f"MODEL.DISTILL.{name.upper()}.HOLISTIC_WEIGHT": 0.1})
    loss = DISTILL_LOSSES[name](cfg)
    shapes = {"head_features": ShapeSpec(channels=8, stride=8), "logits": ShapeSpec(channels=K, stride=8)}
    loss.bind(shapes, shapes, num_classes=K)
    norms = _norm_layers(loss.holistic.discriminator)
    assert [type(m) for m in norms] == [nn.BatchNorm2d]  # the input's, per-process statistics
    assert not any(isinstance(m, (nn.SyncBatchNorm, NaiveSyncBatchNorm)) for m in loss.modules())


def _holistic_worker(out_dir):
    from detectron2.utils import comm
    from segdistill.engine.ddp import create_ddp_model

    torch.set_num_threads(1)
    rank = comm.get_rank()

    class Student(nn.Module):  # a 1x1 classifier and the holistic term, as the Distiller holds them
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.classifier = nn.Conv2d(3, 3, 1)
            self.holistic = HolisticDistillation(3, g_weight=0.1, d_weight=0.1, loss_type="wgan-gp",
                                                 gp_weight=10.0, lr_factor=0.04, conditional=True, conv_dim=4)

        def forward(self, images, teacher):
            terms = self.holistic(self.classifier(images), teacher, images)
            return terms["student"] + terms["discriminator"]

    model = create_ddp_model(Student(), broadcast_buffers=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    init = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    g = torch.Generator().manual_seed(10 + rank)  # each process its own images
    for _ in range(2):
        images, teacher = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
        opt.zero_grad()
        model(images, teacher).backward()
        opt.step()
    torch.save({"init": init, "final": model.module.state_dict()}, os.path.join(out_dir, f"rank{rank}.pth"))
    comm.synchronize()
    torch.distributed.destroy_process_group()


def test_holistic_term_trains_in_two_processes(tmp_path):
    """The WGAN-GP double backward through DDP in two gloo processes: the discriminator moves,
    identically on both processes (its BN statistics stay per process)."""
    from detectron2.engine import launch

    launch(_holistic_worker, 2, dist_url=f"tcp://127.0.0.1:{free_port()}", args=(str(tmp_path),))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in range(2))
    for k, v in r0["final"].items():
        if "running" in k or "num_batches" in k:
            continue
        assert torch.equal(v, r1["final"][k]), k
    assert not torch.equal(r0["init"]["holistic.discriminator.last.weight"],
                           r0["final"]["holistic.discriminator.last.weight"])
    assert not torch.equal(r0["final"]["holistic.discriminator.preprocess.running_mean"],
                           r1["final"]["holistic.discriminator.preprocess.running_mean"])
