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


# ------------------------------------------------------------------------------------------
# Host-device synchronisations per training step
# ------------------------------------------------------------------------------------------
_aten = torch.ops.aten
# Ops that read a device tensor's value or data-dependent size on the host: on CUDA each waits
# for the device (CUDA's bincount reads its input's maximum, whatever minlength says).
_SYNC_OPS = {_aten._local_scalar_dense, _aten.nonzero, _aten._unique, _aten._unique2, _aten.unique_dim,
             _aten.unique_consecutive, _aten.masked_select, _aten.bincount, _aten.equal, _aten.is_nonzero}
_INDEX_OPS = {_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_}


class SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts, by name, the ops of one step that synchronise host and device on CUDA: the
    :data:`_SYNC_OPS`, indexing with a boolean mask (a hidden ``nonzero``), ``repeat_interleave``
    without ``output_size``; and (patched in, as on a CPU tensor they reach no op)
    ``tolist``, ``numpy`` and ``cpu``."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def note(self, name):
        self.counts[name] = self.counts.get(name, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _SYNC_OPS:
            self.note(packet.__name__)
        elif packet in _INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                          for i in (args[1] or ()) if i is not None):
            self.note("bool-mask index")
        elif packet is _aten.repeat_interleave and kwargs.get("output_size") is None and isinstance(args[0], torch.Tensor):
            self.note("repeat_interleave")
        return func(*args, **kwargs)

    def patched(self, monkeypatch):
        for name in ("tolist", "numpy", "cpu"):
            original = getattr(torch.Tensor, name)

            def wrapper(t, *a, _original=original, _name=name, **k):
                self.note(_name)
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapper)
        return self


def _yaml_cfg(path, tmp_path, **opts):
    from detectron2.config import get_cfg
    from segdistill import add_segdistill_config

    from conftest import REPO

    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, path))
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = ()
    cfg.SEED = 0
    return set_keys(cfg, **opts)


def _method_cfg(method, tmp_path):
    from conftest import write_clusters
    from test_distill_taps import SMALL

    if method in ("student",) or method.startswith("distill/"):
        name = "student" if method == "student" else method.split("/")[1]
        opts = {} if name == "student" else {
            "MODEL.DISTILL.TEACHER.WEIGHTS": "", "MODEL.DISTILL.TEACHER.ALLOW_RANDOM": True,
            "MODEL.DISTILL.EVAL_TEACHER": False, "MODEL.DISTILL.MASKD.TOKENS_FILE": "", **SMALL}
        cfg = _yaml_cfg(f"configs/demo/distill/{name}.yaml", tmp_path, **opts)
        if name != "student":
            cfg.MODEL.DISTILL.TEACHER.OPTS = ["MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", 32]
        return cfg
    if method.startswith("hs3/"):
        clusters = write_clusters(tmp_path / "c.json", {"res3": [0, 0, 1, 1, 0, 2, 2, 1, 1, 0],
                                                        "res4": list(range(5)) * 2}, num_classes=10)
        return _yaml_cfg(f"configs/demo/{method}.yaml", tmp_path, **{"MODEL.EXITS.HS3.CLUSTERS_FILE": clusters,
                                                                   "MODEL.EXITS.CHANNELS": 16})
    return _yaml_cfg(f"configs/demo/{method}.yaml", tmp_path, **{"MODEL.EXITS.CHANNELS": 16})


def count_step_syncs(cfg, monkeypatch):
    """{op: count} over one training step (after a warm-up step): the schedule update, the
    forward, the backward and the optimizer step; the trainer's logging of the losses is not
    counted (one read per loss term, the same for every method)."""
    from detectron2.modeling import build_model

    from conftest import random_batch
    from segdistill.engine.hooks import FollowsTrainingProgress

    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(i, batch):
        if isinstance(model, FollowsTrainingProgress):
            model.set_training_progress(i, 10)
        losses = model(batch)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()

    step(0, random_batch(2, 64, 64, 10, seed=0))
    batch = random_batch(2, 64, 64, 10, seed=1)
    with monkeypatch.context() as m, SyncCounter() as counter:
        counter.patched(m)
        step(1, batch)
    return counter.counts


_DISTILL = ["pd", "cwd", "hwd", "fakd_cwd", "fakd_pd", "skd", "ifvd", "cirkd", "mgd", "dist", "fitnet", "at",
            "afdcd", "maskd", "diffkd"]
METHODS = {**{f"distill/{m}": "student" for m in _DISTILL},
           "exits/ds": "exits/none", "exits/sr": "exits/none", "exits/sr_code": "exits/none",
           "hs3/hs3_r18": "exits/none", "hs3/hs3_fuse_r18": "exits/none"}
MAX_EXTRA_SYNCS = 3


@pytest.fixture(scope="module")
def baseline_syncs():
    cache = {}

    def get(name, tmp_path, monkeypatch):
        if name not in cache:
            cache[name] = count_step_syncs(_method_cfg(name, tmp_path), monkeypatch)
        return cache[name]

    return get


@pytest.mark.parametrize("method", sorted(METHODS))
def test_syncs_per_training_step(method, tmp_path, monkeypatch, baseline_syncs):
    base = baseline_syncs(METHODS[method], tmp_path, monkeypatch)
    got = count_step_syncs(_method_cfg(method, tmp_path), monkeypatch)
    extra = sum(got.values()) - sum(base.values())
    print(f"{method}: {extra} syncs beyond {METHODS[method]} ({got} against {base})")
    assert extra <= MAX_EXTRA_SYNCS, f"{method}: {got} against {METHODS[method]}'s {base}"


def test_trainer_turns_cudnn_benchmark_on_for_fixed_size_crops(tmp_path, monkeypatch):
    from segdistill.engine import Trainer
    from test_distill_taps import demo_cfg

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cfg = demo_cfg(str(tmp_path / "run"), 1)
    cfg.MODEL.DISTILL.LOSSES = ["pd"]
    assert cfg.INPUT.CROP.ENABLED
    Trainer(cfg)
    assert torch.backends.cudnn.benchmark
