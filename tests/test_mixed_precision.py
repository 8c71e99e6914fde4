"""Mixed precision (SOLVER.AMP on CPU: bf16), the Distiller's float32 island, the teacher's own
precision and channels_last.

Tolerance of a bf16 step against float32 on the same batch and weights: every loss term within
5 % (relative) or 0.02 (absolute). bf16 keeps 8 bits of mantissa (a relative rounding of 0.4 %
per op); through a ResNet-18, its head and the losses the terms measured here differ by about
0.1-2 % (the fp32 algorithm changes of a different machine already move losses by 0.6-1.5 %).
"""
import json
import os
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO, load_script, set_keys
from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage
from segdistill.config import ConfigError, add_segdistill_config
from segdistill.engine import Trainer, check_lazy_config
from segdistill.engine.mixed_precision import MixedPrecisionTrainer

RTOL, ATOL = 0.05, 0.02

PLAIN = "configs/demo/deeplabv3_r18.yaml"
SR = "configs/demo/exits/sr.yaml"
CWD = "configs/demo/distill/cwd.yaml"
TEACHER = ["MODEL.DISTILL.TEACHER.WEIGHTS", "", "MODEL.DISTILL.TEACHER.ALLOW_RANDOM", True,
           "MODEL.DISTILL.TEACHER.OPTS", ["MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", 16], "MODEL.DISTILL.EVAL_TEACHER", False]
SMALL_PARTS = ["MODEL.DISTILL.HOLISTIC.CONV_DIM", 4, "MODEL.DISTILL.CIRKD.PIXEL_MEMORY_SIZE", 32,
               "MODEL.DISTILL.CIRKD.REGION_MEMORY_SIZE", 8]


def make_cfg(config, out_dir, *opts, max_iter=1):
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, config))
    if cfg.MODEL.META_ARCHITECTURE == "Distiller":
        cfg.merge_from_list(TEACHER)
    cfg.merge_from_list([
        "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", 16, "DATASETS.TRAIN", ("segdistill_demo_mini_train",), "DATASETS.TEST", (),
        "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", max_iter, "SOLVER.WARMUP_ITERS", 0,
        "SOLVER.CHECKPOINT_PERIOD", 100, "INPUT.CROP.SIZE", (64, 64), "DATALOADER.NUM_WORKERS", 0,
        "TEST.EVAL_PERIOD", 0, "OUTPUT_DIR", str(out_dir), "SEED", 3, *opts,
    ])
    return cfg


def first_step_losses(cfg):
    """The loss terms of one training step (model from seed 0, the config's data order)."""
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    seen = []
    trainer.model.register_forward_hook(lambda m, i, o: seen.extend(v.dtype for v in o.values()))
    with EventStorage(0) as storage:
        trainer._trainer.iter = 0
        trainer.run_step()
        losses = {k: h.latest() for k, h in storage.histories().items() if k.startswith("loss_") or k == "total_loss"}
    return trainer, losses, seen


@pytest.mark.parametrize("config", [PLAIN, SR, CWD], ids=["plain", "sr", "cwd"])
def test_a_bf16_step_on_cpu_gives_the_float32_losses_within_tolerance(tmp_path, config, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _, fp32, _ = first_step_losses(make_cfg(config, tmp_path / "fp32"))
    trainer, bf16, seen = first_step_losses(make_cfg(config, tmp_path / "bf16", "SOLVER.AMP.ENABLED", True))
    assert isinstance(trainer._trainer, MixedPrecisionTrainer) and trainer._trainer.dtype == torch.bfloat16
    assert fp32.keys() == bf16.keys() and len(fp32) >= 1
    for k in fp32:
        assert bf16[k] == pytest.approx(fp32[k], rel=RTOL, abs=ATOL), k
    # the step ran in bf16 (losses that need float32 are float32: the Distiller's island, the heads' CE)
    assert any(v != fp32_value for v, fp32_value in zip(bf16.values(), fp32.values()))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_bf16_checkpoints_stay_float32_and_resume_exactly(tmp_path):
    full = tmp_path / "full"
    cfg = make_cfg(PLAIN, full, "SOLVER.AMP.ENABLED", True, "SOLVER.CHECKPOINT_PERIOD", 1, max_iter=2)
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    final = torch.load(full / "model_final.pth", weights_only=False)
    floats = [v for v in final["model"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)

    # the run interrupted after its checkpoint at iteration 1, resumed: the same final weights, bit for bit
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(full / "model_0000000.pth", part / "model_0000000.pth")
    (part / "last_checkpoint").write_text("model_0000000.pth")
    shutil.copy(full / "config.yaml", part / "config.yaml")
    torch.manual_seed(123)  # a different initialisation: everything must come from the checkpoint
    resumed = Trainer(make_cfg(PLAIN, part, "SOLVER.AMP.ENABLED", True, "SOLVER.CHECKPOINT_PERIOD", 1, max_iter=2))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 1
    resumed.train()
    again = torch.load(part / "model_final.pth", weights_only=False)["model"]
    for k, v in final["model"].items():
        assert torch.equal(again[k], v), k


@pytest.mark.parametrize("opts, says", [
    (["SOLVER.AMP.ENABLED", True, "SOLVER.AMP.DTYPE", "fp16"], "SOLVER.AMP.DTYPE bf16"),
    (["SOLVER.AMP.DTYPE", "fp8"], "SOLVER.AMP.DTYPE is 'fp8'"),
    (["MODEL.DISTILL.TEACHER.PRECISION", "fp16"], "MODEL.DISTILL.TEACHER.PRECISION bf16"),
    (["MODEL.DISTILL.TEACHER.PRECISION", "half"], "MODEL.DISTILL.TEACHER.PRECISION is 'half'"),
    (["TEST.PRECISION", "fp16"], "TEST.PRECISION bf16"),
])
def test_an_unsupported_precision_is_a_config_error_before_anything_is_written(tmp_path, opts, says):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=says.replace(".", r"\.")):
        Trainer(make_cfg(CWD, out, *opts))
    assert not out.exists() or not os.listdir(out)


def test_evaluation_runs_in_test_precision(tmp_path):
    cfg = make_cfg(PLAIN, tmp_path, "DATASETS.TEST", ("segdistill_demo_mini_val",), "TEST.PRECISION", "bf16",
                   "TEST.ALLOW_RANDOM_WEIGHTS", True)
    model = Trainer.build_evaluation_model(cfg, "")
    seen = set()
    model.sem_seg_head.predictor.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    results = Trainer.test(cfg, model)
    assert seen == {torch.bfloat16} and 0 <= results["sem_seg"]["mIoU"] <= 100
    with pytest.raises(ConfigError, match="TEST.PRECISION"):
        Trainer.build_evaluation_model(make_cfg(PLAIN, tmp_path, "TEST.PRECISION", "fp16"), "")


def test_lazy_configs_take_the_same_settings(tmp_path):
    from segdistill.config import load_lazy_config

    path = os.path.join(REPO, "configs/demo/deeplabv3_r18.py")
    check_lazy_config(load_lazy_config(path, ["train.device=cpu", "train.amp.enabled=True", "train.amp.dtype=bf16",
                                              "train.channels_last=True", "train.test_precision=bf16"]))
    with pytest.raises(ConfigError, match="train.amp.dtype"):
        check_lazy_config(load_lazy_config(path, ["train.device=cpu", "train.amp.enabled=True",
                                                  "train.amp.dtype=fp16"]))
    with pytest.raises(ConfigError, match="train.test_precision"):
        check_lazy_config(load_lazy_config(path, ["train.device=cpu", "train.test_precision=fp16"]))


# ------------------------------------------------------------------------------------------
# The Distiller: float32 loss arithmetic, trainable parts in the step's dtype
# ------------------------------------------------------------------------------------------
# Softmax, KL, normalisations and reductions (the gradient penalty's norm and mean too). Matrix
# products are left out: the discriminator's backward inside the gradient penalty runs its
# attention's bmm in bf16, as its forward did.
_ARITHMETIC = {"_softmax", "_log_softmax", "sum", "mean", "linalg_vector_norm", "norm", "exp", "log", "pow",
               "mse_loss", "kl_div", "xlogy"}


class _Dtypes(TorchDispatchMode):
    """The floating dtypes of the listed ops' tensor arguments in the losses' ``distill``
    (``active``), outside their trainable parts (``inside``)."""

    def __init__(self):
        super().__init__()
        self.inside = 0
        self.active = 0
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.active and not self.inside and name in _ARITHMETIC:
            for a in args:
                if isinstance(a, torch.Tensor) and a.is_floating_point():
                    self.seen.setdefault(name, set()).add(a.dtype)
        return func(*args, **(kwargs or {}))


def distiller(tmp_path, losses, *opts):
    cfg = make_cfg(CWD, tmp_path, "MODEL.DISTILL.LOSSES", losses, *SMALL_PARTS, *opts)
    torch.manual_seed(0)
    return Trainer.build_model(cfg)


def batch_of(n=2, size=64, classes=10):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 255, (3, size, size), generator=g).float(),
             "sem_seg": torch.randint(0, classes, (size, size), generator=g), "height": size, "width": size}
            for _ in range(n)]


def test_under_bf16_autocast_trainable_parts_run_in_bf16_and_the_loss_arithmetic_in_float32(tmp_path):
    model = distiller(tmp_path, ["mgd", "cirkd", "fitnet", "skd", "cwd"]).train()
    mode = _Dtypes()
    parts = {}
    for name, loss in model.distill_losses.items():
        def distill(batch, original=loss.distill):  # the loss arithmetic: what the island covers
            mode.active += 1
            try:
                return original(batch)
            finally:
                mode.active -= 1

        loss.distill = distill
        for part_name, part in loss.trainable_parts().items():
            key = f"{name}.{part_name}"

            def enter(m, i, key=key):
                mode.inside += 1
                parts.setdefault(key, set()).update(x.dtype for x in i if isinstance(x, torch.Tensor))

            def leave(m, i, o, key=key):
                mode.inside -= 1
                parts[key].add(o.dtype)

            part.register_forward_pre_hook(enter)
            part.register_forward_hook(leave)
    # every parameter of a loss belongs to one of its declared trainable parts (the contract is complete)
    for name, loss in model.distill_losses.items():
        declared = {id(p) for part in loss.trainable_parts().values() for p in part.parameters()}
        assert {id(p) for p in loss.parameters()} <= declared, name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student_losses, batch = model.distill_batch(batch_of())
        with mode:
            losses = model(batch_of())
    assert set(parts) == {"mgd.align", "mgd.generation", "cirkd.projection", "fitnet.connector", "skd.discriminator"}
    for key, dtypes in parts.items():
        if key != "mgd.align":  # an identity (same channel counts): nothing to compute
            assert torch.bfloat16 in dtypes, (key, dtypes)
    assert {"_log_softmax", "sum", "mean", "linalg_vector_norm"} <= set(mode.seen)
    for op, dtypes in mode.seen.items():
        assert dtypes <= {torch.float32}, (op, dtypes)
    assert all(v.dtype == torch.float32 for v in losses.values())
    losses["loss_skd_discriminator"].backward()  # the gradient penalty's double backward through the bf16 D


def test_the_teacher_runs_in_its_own_precision_with_a_float32_student(tmp_path):
    model = distiller(tmp_path, ["cwd"], "MODEL.DISTILL.TEACHER.PRECISION", "bf16").train()
    _, batch = model.distill_batch(batch_of())
    assert all(v.dtype == torch.bfloat16 for v in batch.teacher.values())
    assert all(v.dtype == torch.float32 for v in batch.student.values())
    loss = model(batch_of())["loss_cwd"]
    assert loss.dtype == torch.float32 and loss.requires_grad
    # fp32 under a bf16 step: autocast off for the teacher only
    model = distiller(tmp_path, ["cwd"], "MODEL.DISTILL.TEACHER.PRECISION", "fp32").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, batch = model.distill_batch(batch_of())
    assert all(v.dtype == torch.float32 for v in batch.teacher.values())
    assert any(v.dtype == torch.bfloat16 for v in batch.student.values())


# ------------------------------------------------------------------------------------------
# channels_last
# ------------------------------------------------------------------------------------------
def test_channels_last_puts_weights_and_backbone_inputs_in_channels_last(tmp_path):
    cfg = make_cfg(CWD, tmp_path, "MODEL.CHANNELS_LAST", True)
    model = Trainer.build_model(cfg).train()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    teacher_convs = [m for m in model.teacher.modules() if isinstance(m, torch.nn.Conv2d)
                     and m.weight.shape[-1] > 1]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in teacher_convs)
    seen = []
    model.student.backbone.register_forward_hook(
        lambda m, i, o: seen.append(i[0].is_contiguous(memory_format=torch.channels_last)))
    model(batch_of())
    assert seen == [True]
    set_keys(cfg, **{"MODEL.CHANNELS_LAST": False})
    model = Trainer.build_model(cfg)
    assert not all(m.weight.is_contiguous(memory_format=torch.channels_last)
                   for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1)


# ------------------------------------------------------------------------------------------
# On a GPU (benchmarks/gpu_check.sh runs these; skipped without CUDA)
# ------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "auto"])
def test_cuda_mixed_precision_step_matches_float32(tmp_path, dtype):
    cuda = ["MODEL.DEVICE", "cuda", "MODEL.DISTILL.TEACHER.PRECISION", "bf16"]
    _, fp32, _ = first_step_losses(make_cfg(CWD, tmp_path / "fp32", *cuda))
    trainer, amp, _ = first_step_losses(make_cfg(CWD, tmp_path / dtype, *cuda, "SOLVER.AMP.ENABLED", True,
                                                 "SOLVER.AMP.DTYPE", dtype))
    expected = torch.bfloat16 if dtype == "bf16" else torch.float16  # auto: detectron2's fp16 on CUDA
    assert trainer._trainer.dtype == expected
    assert trainer._trainer.grad_scaler.is_enabled() == (expected == torch.float16)
    for k in fp32:
        assert amp[k] == pytest.approx(fp32[k], rel=RTOL, abs=ATOL), k
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_gpu_check_toy_run_on_cpu(tmp_path):
    """benchmarks/gpu_check.py (what gpu_check.sh runs on a GPU) end to end on CPU at toy size."""
    gpu_check = load_script("gpu_check", "benchmarks/gpu_check.py")
    out = str(tmp_path / "check")
    result = gpu_check.main(["--device", "cpu", "--methods", "mgd", "--batch", "2", "--size", "32x32",
                             "--rounds", "1", "--warmup", "0", "--skip-tests", "--output", out])
    steps = result["steps"]
    assert list(steps) == ["student", "mgd"]
    for n, per in steps.items():
        assert list(per) == ["fp32", "bf16"], n
        for p, v in per.items():
            assert v["ok"] and v["params_float32"] and v["step_s"] > 0, (n, p, v)
        # the same weights and batch: bf16's loss within the stated tolerance of fp32's
        assert per["bf16"]["total_loss"] == pytest.approx(per["fp32"]["total_loss"], rel=RTOL, abs=ATOL), n
    assert result["overhead"]["settings"]["precisions"] == ["fp32", "bf16", "channels_last", "bf16_channels_last"]
    data = json.load(open(out + ".json"))
    assert set(data["steps"]) == set(steps)
    text = open(out + ".md").read()
    assert "| mgd |" in text and "Steps failed: none." in text and "Noise floor" in text
    script = open(os.path.join(REPO, "benchmarks", "gpu_check.sh")).read()
    assert "benchmarks/gpu_check.py --device cuda" in script and "timeout 470" in script
