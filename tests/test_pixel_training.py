"""Mask-aware training (``MODEL.EXITS.PIXEL.TRAIN_THRESHOLD``): off is today's training bit for
bit; in eval() the aggregated final logits are policy ``pixel``'s answer; the gradient passes the
copy to the freezing exit and never the freeze decision; nothing frozen is the plain training;
two-iteration runs from YAML and from a lazy config. Tiny DS / SR model: ResNet-18 OS8,
DeepLabV3 head, exits on res2..res4."""
import json
import os

import pytest
import torch
from torch.nn import functional as F

from conftest import random_batch, run_train_net, tiny_cfg
from conftest import trained_model as train_steps
from detectron2.modeling import build_model
from segdistill.config import ConfigError
from segdistill.modeling.exits import exit_size
from segdistill.modeling.masked import MaskedStage, PixelMask
from segdistill.modeling.meta_arch.anytime import PIXEL, anytime_state_dict

K = 5


def exit_cfg(mode="ds", threshold=0.0):
    cfg = tiny_cfg("resnet18", "SegDeepLabV3Head", num_classes=K, **{"MODEL.META_ARCHITECTURE": "MultiExitSegmentor"})
    cfg.MODEL.EXITS.MODE = mode
    cfg.MODEL.EXITS.CHANNELS = 16
    cfg.MODEL.EXITS.PIXEL.TRAIN_THRESHOLD = threshold
    return cfg


def twin(cfg, model, threshold):
    """A model of ``cfg`` with ``threshold`` and ``model``'s weights, in ``model``'s mode."""
    cfg = cfg.clone()
    cfg.MODEL.EXITS.PIXEL.TRAIN_THRESHOLD = threshold
    other = build_model(cfg)
    other.load_state_dict(model.state_dict())
    return other.train(model.training)


@pytest.fixture(scope="module")
def trained():
    """A DS model after one step, its exits' segmenters scaled up: confident answers spread over
    the pixels, so one threshold (0.7) freezes pixels at every exit and leaves some to the head."""
    cfg = exit_cfg()
    model = train_steps(cfg, K, 1)
    with torch.no_grad():
        for ex in model.exits.values():
            ex.segmenter.weight.mul_(30)
            ex.segmenter.bias.mul_(30)
    return cfg, model


def test_off_is_todays_training_bit_for_bit():
    cfg = exit_cfg()
    assert cfg.MODEL.EXITS.PIXEL.TRAIN_THRESHOLD == 0.0  # the default: off
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert model.pixel_training is None
    batch = random_batch(2, 64, 64, K)
    torch.manual_seed(1)
    losses = model(batch)
    # the plain training step written out: backbone, head, every exit's CE of its upsampled logits
    torch.manual_seed(1)
    x = model._images(batch).tensor
    targets = model._targets(batch)
    feats = model.backbone(x)
    head = model.sem_seg_head.forward_outputs(feats)
    logits = F.interpolate(head["logits"], scale_factor=8, mode="bilinear", align_corners=False)
    ce = F.cross_entropy(logits, targets, ignore_index=255)
    ds = sum(F.cross_entropy(F.interpolate(ex(feats[n], (8, 8)).seg_logits, size=(64, 64), mode="bilinear",
                                           align_corners=False), targets, ignore_index=255)
             for n, ex in model.exits.items())
    assert set(losses) == {"loss_sem_seg", "loss_ds"}
    assert torch.equal(losses["loss_sem_seg"], ce) and torch.equal(losses["loss_ds"], ds)


def check_eval_is_the_pixel_policy(cfg, model, t):
    """In eval(), the aggregated final logits of mask-aware training with threshold ``t`` are
    policy ``pixel``'s answer (emulate), every exit freezing pixels; the exits after the first
    freeze run masked in both (their logits at the active pixels, masked_exits), not dense."""
    batch = random_batch(2, 64, 64, K, seed=5)
    x = model._images(batch).tensor
    pixel_model = twin(cfg, model, t)
    with torch.no_grad():
        run = pixel_model.pixel_run(x)
    shares = {n: float(f.float().mean()) for n, f in run.frozen.items()}
    # every exit freezes pixels (the later ones on masked features), and the head answers some
    assert all(v > 0.05 for v in shares.values()) and 0.1 < float(run.active.float().mean()) < 0.9, shares

    # res3 runs after res2's freeze: its own logits are its masked logits on the masked res3
    # features, not its dense forward's (which read frozen neighbours' features)
    modules = pixel_model.backbone.stage_modules()
    active = PixelMask(~run.frozen["res2"])
    ex = pixel_model.exits["res3"]
    with torch.no_grad():
        f2 = x
        for name in list(modules)[:list(modules).index("res2") + 1]:  # dense up to res2 (nothing frozen yet)
            f2 = modules[name](f2)
        f3, _ = MaskedStage(modules["res3"], "res3")(f2, active, "emulate")
        masked, _ = MaskedStage(ex, "exits.res3")(f3, active, "emulate")
        dense = ex(f3, exit_size((64, 64), ex.common_stride), with_classifier=False).seg_logits
    up = lambda t: F.interpolate(t, size=(64, 64), mode="bilinear", align_corners=False)  # noqa: E731
    torch.testing.assert_close(run.own["res3"], up(masked), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(run.own["res3"], up(dense), rtol=1e-5, atol=1e-5)

    acfg = cfg.clone()
    acfg.MODEL.META_ARCHITECTURE = "AnytimeSegmentor"
    acfg.MODEL.EXITS.ANYTIME.PIXEL_THRESHOLDS = [t]
    acfg.MODEL.EXITS.ANYTIME.PIXEL_MODE = "emulate"
    acfg.MODEL.EXITS.ANYTIME.POLICY = PIXEL
    anytime = build_model(acfg).eval()
    anytime.load_state_dict(anytime_state_dict(anytime, model.state_dict())[0], strict=True)
    for i in range(2):
        with torch.no_grad():
            expected, info = anytime.run_pixel(x[i:i + 1], (64, 64))
        assert info["answer"] == "final"
        # an exit run after a pixel of this image froze ran masked; one run before, its dense forward
        names = list(run.frozen)
        for k, name in enumerate(names):
            after = any(bool(run.frozen[e][i].any()) for e in names[:k])
            assert (f"exits.{name}" in info["masked"]["dense_ops"]) == (not after), (i, name)
        torch.testing.assert_close(run.final_logits[i:i + 1], expected, rtol=1e-5, atol=1e-5)
        for name, f in run.frozen.items():  # each exit froze the share the policy says it answered
            assert 100.0 * float(f[i].float().mean()) == pytest.approx(info["answered_pct"][name])


def test_eval_aggregated_final_logits_are_the_pixel_policys_answer(trained):
    cfg, model = trained
    check_eval_is_the_pixel_policy(cfg, model, 0.7)


def test_eval_aggregated_final_logits_are_the_pixel_policys_answer_with_rh_exits():
    cfg = exit_cfg()
    cfg.MODEL.EXITS.HEAD = "rh"
    cfg.MODEL.EXITS.RH.CHANNELS = 16
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = model._images(random_batch(2, 64, 64, K, seed=5)).tensor
    with torch.no_grad():  # RH's logits are smooth: centre each exit's and scale them to unit spread,
        feats = dict(model.backbone.forward_stages(x))  # so that confident pixels spread over the image
        for name, ex in model.exits.items():
            ex.segmenter.bias.zero_()
            logits = ex(feats[name], (8, 8), with_classifier=False).seg_logits
            ex.segmenter.bias.copy_(-logits.mean((0, 2, 3)))
            scale = 1.0 / float((logits - logits.mean((0, 2, 3), keepdim=True)).std())
            ex.segmenter.weight.mul_(scale)
            ex.segmenter.bias.mul_(scale)
    check_eval_is_the_pixel_policy(cfg, model, 0.6)


def test_an_input_that_is_not_a_multiple_of_the_heads_stride(trained):
    """The head's "stride" map overshoots a 60x76 input; the final aggregated logits take it cut
    to the input (as policy pixel does), in eval and in training."""
    cfg, model = trained
    for training in (False, True):
        m = twin(cfg, model, 0.7).train(training)
        x = m._images(random_batch(2, 60, 76, K, seed=5)).tensor
        assert any(v % m.sem_seg_head.common_stride for v in x.shape[-2:])
        run = m.pixel_run(x)
        assert tuple(run.final_logits.shape[-2:]) == tuple(x.shape[-2:]) == tuple(run.active.shape[-2:])
        head = m.sem_seg_head.predict_logits(run.outputs.head["logits"], tuple(x.shape[-2:]))
        assert tuple(head.shape[-2:]) != tuple(x.shape[-2:])  # the overshoot the cut removes
        assert 0.0 < float(run.active.float().mean()) < 1.0


def test_the_copy_carries_gradient_to_the_freezing_exit_and_the_decision_none(trained):
    cfg, model = trained
    model = twin(cfg, model, 0.7).train()
    x = model._images(random_batch(2, 64, 64, K, seed=3)).tensor
    run = model.pixel_run(x)
    names = list(run.own)
    assert all(not f.requires_grad for f in run.frozen.values()) and not run.active.requires_grad
    assert all(float(f.float().mean()) > 0 for f in run.frozen.values())
    active = torch.ones_like(run.active)
    for name in names + ["final"]:
        out = run.final_logits if name == "final" else run.outputs.exits[name].seg_logits
        w = torch.randn_like(out)
        grads = torch.autograd.grad((out * w).sum(), [run.own[n] for n in names], allow_unused=True,
                                    retain_graph=True)
        for n, g in zip(names, grads):
            earlier = names.index(n) < (len(names) if name == "final" else names.index(name))
            if n == name:  # its own logits: exactly at the pixels still active when it ran
                expected = w * active[:, None]
            elif earlier:  # an earlier exit: exactly at the pixels it froze (the copy), nowhere else
                expected = w * run.frozen[n][:, None]
            else:  # a later exit: nothing
                expected = torch.zeros_like(w)
            assert torch.equal(torch.zeros_like(w) if g is None else g, expected), (name, n)
        if name != "final":
            active = active & ~run.frozen[name]
    assert torch.equal(active, run.active)


@pytest.mark.parametrize("mode", ["ds", "sr"])
def test_nothing_frozen_is_the_plain_training(mode):
    cfg = exit_cfg(mode)
    torch.manual_seed(0)
    plain = build_model(cfg).train()
    lazy = twin(cfg, plain, 1.0)
    batch = random_batch(2, 64, 64, K, seed=2)
    run = lazy.pixel_run(lazy._images(batch).tensor)
    assert not any(bool(f.any()) for f in run.frozen.values())
    out = {}
    for name, m in (("plain", plain), ("lazy", lazy)):
        torch.manual_seed(1)
        out[name] = m(batch)
    assert set(out["plain"]) == set(out["lazy"])
    for k in out["plain"]:
        torch.testing.assert_close(out["lazy"][k], out["plain"][k], rtol=1e-5, atol=1e-6)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"TRAIN_THRESHOLD must be in \[0, 1\]"):
        build_model(exit_cfg(threshold=1.5))
    cfg = exit_cfg(threshold=0.9)
    cfg.MODEL.EXITS.IN_FEATURES = ["res3", "head_features"]
    with pytest.raises(ConfigError, match="read the head's features"):
        build_model(cfg)


# ------------------------------------------------------------------ end to end through train_net.py
RUN = [
    "DATASETS.TRAIN", '("segdistill_demo_mini_train",)', "DATASETS.TEST", '("segdistill_demo_mini_val",)',
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "100",
    "INPUT.CROP.SIZE", "(64,64)", "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "32", "MODEL.EXITS.CHANNELS", "16",
    "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
]


def losses_logged(out_dir):
    rec = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.json"))]
    return {k for r in rec for k in r if k.startswith("loss_")}, max(r["iteration"] for r in rec if "total_loss" in r)


@pytest.mark.slow
def test_train_net_yaml_ds_mask_aware(tmp_path):
    out_dir = str(tmp_path / "yaml")
    run_train_net(["--config-file", "configs/demo/exits/ds.yaml"] + RUN +
                  ["MODEL.EXITS.PIXEL.TRAIN_THRESHOLD", "0.5", "OUTPUT_DIR", out_dir])
    assert losses_logged(out_dir) == ({"loss_sem_seg", "loss_ds"}, 1)
    assert os.path.isfile(os.path.join(out_dir, "model_final.pth"))


@pytest.mark.slow
def test_train_net_lazy_ds_mask_aware(tmp_path):
    out_dir = str(tmp_path / "lazy")
    run_train_net([
        "--config-file", "configs/demo/exits/ds.py",
        "dataloader.train.dataset.names=segdistill_demo_mini_train", "dataloader.test.dataset.names=segdistill_demo_mini_val",
        "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
        "model.exits.channels=16", "model.pixel_train_threshold=0.5", "train.max_iter=2", "train.eval_period=0",
        f"train.output_dir={out_dir}",
    ])
    assert losses_logged(out_dir) == ({"loss_sem_seg", "loss_ds"}, 1)


def test_cells_in_eval_are_the_pixel_policys_answer_and_freeze_whole_cells(trained):
    """MODEL.EXITS.PIXEL.CELL 4, read by both models: mask-aware training freezes whole 4x4
    cells (a cell when all its still-active pixels reach t) and its eval() answer is policy
    pixel's with the same cells."""
    cfg, model = trained
    cfg = cfg.clone()
    cfg.MODEL.EXITS.PIXEL.CELL = 4
    t = 0.66
    check_eval_is_the_pixel_policy(cfg, model, t)
    m = twin(cfg, model, t).eval()
    assert m.pixel_training.cell == 4
    x = m._images(random_batch(2, 64, 64, K, seed=5)).tensor
    with torch.no_grad():
        run = m.pixel_run(x)
    cells = lambda t: F.max_pool2d(t[:, None].float(), 4)[:, 0] > 0  # noqa: E731  any pixel of a cell
    done = torch.zeros_like(run.active)
    for name, f in run.frozen.items():
        top = F.softmax(run.own[name], dim=1).amax(dim=1)
        before = ~done
        done = done | f
        # a cell with a pixel frozen by this exit is frozen whole; a pixel it froze reached t
        assert not bool((cells(f) & cells(~done)).any()), name
        assert not bool((f & (top < t)).any()), name
        # a cell left active holds an active pixel below t
        left = cells(before) & ~cells(f)
        assert torch.equal(left, left & cells(before & ~f & (top < t))), name
    assert torch.equal(~done, run.active)


def test_config_error_of_the_cell_names_the_key():
    cfg = exit_cfg(threshold=0.9)
    cfg.MODEL.EXITS.PIXEL.CELL = 0
    with pytest.raises(ConfigError, match=r"MODEL.EXITS.PIXEL.CELL is 0; write an integer >= 1"):
        build_model(cfg)
