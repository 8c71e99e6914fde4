"""Distillation on two gloo processes (detectron2's launch, as ``train_net.py --num-gpus 2``):
CIRKD's batch term gathered across the processes equals the one-process term over the global
batch (value, and gradients once DDP averages them) and its memories stay identical; and a
Distiller with trainable loss parts (FitNet's connector, CIRKD's projection and memories, SKD's
discriminator) trains through the project's trainer, its processes holding identical parts
after the steps."""
import os

import pytest
import torch

from conftest import free_port
from detectron2.engine import launch
from segdistill.modeling.distill.cirkd import batch_relation_loss
from test_distill_cirkd import bound_loss, normed
from test_distill_taps import demo_cfg

pytestmark = pytest.mark.slow
K = 3


def _global_batch():
    labels = torch.randint(0, K, (4, 3, 2), generator=torch.Generator().manual_seed(32))
    return normed(30, n=4, c=3), normed(31, n=4), labels


def _worker(out_dir):
    from detectron2.utils import comm
    from segdistill.engine import Trainer
    from segdistill.modeling.distill.cirkd import all_gather_no_grad, all_gather_with_grad

    torch.set_num_threads(1)
    rank = comm.get_rank()
    # CIRKD's gathered batch term, on a known global batch split over the processes
    s_all, t_all, labels = _global_batch()
    s = s_all[2 * rank:2 * rank + 2].clone().requires_grad_(True)
    t, y = t_all[2 * rank:2 * rank + 2], labels[2 * rank:2 * rank + 2]
    value = batch_relation_loss(s, t, all_gather_with_grad(s), all_gather_no_grad(t), 0.1)
    value.backward()
    memory = bound_loss().memory
    memory.update(all_gather_no_grad(t), all_gather_no_grad(y))
    # a short training of the demo distillation with trainable loss parts
    trainer = Trainer(demo_cfg(os.path.join(out_dir, "run"), 3))
    trainer.resume_or_load(resume=False)
    model = trainer.model.module  # DDP
    init = {k: v.detach().clone() for k, v in model.distill_losses.state_dict().items()}
    trainer.train()
    torch.save({"value": value.detach(), "grad": s.grad, "memory": memory.state_dict(), "init": init,
                "final": model.distill_losses.state_dict()}, os.path.join(out_dir, f"rank{rank}.pth"))
    # detectron2's launch leaves the group to interpreter exit; tear it down here, together
    comm.synchronize()
    torch.distributed.destroy_process_group()


def test_two_processes(tmp_path):
    launch(_worker, 2, dist_url=f"tcp://127.0.0.1:{free_port()}", args=(str(tmp_path),))
    ranks = [torch.load(tmp_path / f"rank{r}.pth", weights_only=False) for r in range(2)]
    # CIRKD: the processes' mean is the global batch's loss, their gradients DDP's average
    s_all, t_all, labels = _global_batch()
    s_all.requires_grad_(True)
    full = batch_relation_loss(s_all, t_all, s_all, t_all, 0.1)
    full.backward()
    single = bound_loss().memory
    single.update(t_all, labels)
    assert (ranks[0]["value"] + ranks[1]["value"]).item() / 2 == pytest.approx(full.item(), rel=1e-9)
    for r in range(2):
        torch.testing.assert_close(ranks[r]["grad"] / 2, s_all.grad[2 * r:2 * r + 2])
        for k, v in single.state_dict().items():
            torch.testing.assert_close(ranks[r]["memory"][k], v)
    # the trained loss parts: changed, and the same on both processes (BN statistics are per process)
    final0, final1 = ranks[0]["final"], ranks[1]["final"]
    per_process = ("running_mean", "running_var", "num_batches_tracked")
    compared = [k for k in final0 if not k.endswith(per_process)]
    assert any(k.startswith("fitnet.connector") for k in compared)
    assert any(k.startswith("cirkd.memory") for k in compared)
    for k in compared:
        assert torch.equal(final0[k], final1[k]), f"{k} differs between the processes"
    for k in ("fitnet.connector.weight", "cirkd.projection.0.weight", "skd.holistic.discriminator.last.weight",
              "cirkd.memory.pixel_queue"):
        assert not torch.equal(ranks[0]["init"][k], final0[k]), f"{k} did not change"
    assert int(final0["cirkd.memory.draws"]) == 3
