"""What the first GPU run needs, checked on CPU: the SKD/IFVD discriminator never holds SyncBN
(the gradient penalty differentiates it twice, and SyncBN has no double backward) and trains in
two processes; CIRKD's batch term within memory at the papers' batch (chunked, checkpointed; its
peak memory accounted on the meta device); and the host-device synchronisations of one training
step of every method, counted."""
import os

import pytest
import torch
from torch import nn

from conftest import free_port
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


@pytest.mark.slow
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


# ------------------------------------------------------------------------------------------
# CIRKD: the batch term within memory
# ------------------------------------------------------------------------------------------
def _cirkd_memory():
    from conftest import load_script

    return load_script("cirkd_memory", "benchmarks/cirkd_memory.py")


def _normed(seed, n, c, h=3, w=4):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, c, h, w, generator=g, dtype=torch.float64), dim=1)


@pytest.mark.parametrize("chunk", [1, 7, 10 ** 9])
def test_cirkd_chunked_batch_term_equals_the_per_pair_form(chunk):
    from segdistill.modeling.distill.cirkd import batch_relation_loss

    per_pair = _cirkd_memory().per_pair_loss
    t = _normed(1, 3, 5)
    values, grads = [], []
    for fn in (lambda s: batch_relation_loss(s, t, s, t, 0.1, chunk_elements=chunk), lambda s: per_pair(s, t, 0.1)):
        s = _normed(0, 3, 4).requires_grad_(True)
        value = fn(s)
        value.backward()
        values.append(value.item())
        grads.append(s.grad)
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-14)
    assert grads[0].abs().sum() > 0


def test_cirkd_batch_term_products_in_the_autocast_dtype_softmax_in_float32():
    from torch.utils._python_dispatch import TorchDispatchMode

    from segdistill.modeling.distill.cirkd import batch_relation_loss

    seen = []

    class Dtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten._log_softmax):
                seen.append((func.overloadpacket.__name__, args[0].dtype))
            return func(*args, **(kwargs or {}))

    s, t = _normed(0, 2, 4).float().requires_grad_(True), _normed(1, 2, 4).float()
    with torch.autocast("cpu", dtype=torch.bfloat16), Dtypes():
        batch_relation_loss(s, t, s, t, 0.1).backward()
    assert ("mm", torch.bfloat16) in seen and ("_log_softmax", torch.float32) in seen
    assert ("_log_softmax", torch.bfloat16) not in seen


def test_cirkd_memory_accounting_and_the_papers_batch_within_budget():
    bench = _cirkd_memory()
    with bench.LiveBytes() as mode:  # the accounting: two live float32 vectors of 1000, then one
        x = torch.ones(1000, device="meta")
        y = x * 2
        del x
        z = y + 1
    assert (mode.peak, mode.live) == (8000, 8000) and z.shape == y.shape
    # toy size: the chunked term keeps less than every pair's maps; the script's verdict
    assert bench.peak_bytes(bench.chunked, 4, 8, 8, 4) < bench.peak_bytes(bench.unchunked, 4, 8, 8, 4)
    assert bench.main(["--batch", "2", "--height", "8", "--width", "8", "--channels", "4"]) == 0
    assert bench.main(["--batch", "2", "--height", "8", "--width", "8", "--channels", "4", "--budget-gib", "1e-9"]) == 1
    # batch 8 at a 512 x 1024 crop's stride-8 tap (64 x 128), 256 channels: within 4 GiB
    assert bench.peak_bytes(bench.chunked, 8, 64, 128, 256) <= 4 * bench.GIB
