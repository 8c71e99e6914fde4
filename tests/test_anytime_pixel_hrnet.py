"""Policy ``pixel`` and mask-aware training on HRNet: list-valued stages.

HRNet-W18-small (timm's nearest fusion at 64x64 and mmsegmentation's bilinear one at 40x56, a
size whose branches need its resize), the repository's HRNetV2 head on res2..res5 (masked once a
pixel is frozen: its branches' list is its input), DS exits on two branches of two stages (``stage2_b0``,
``stage3_b1``; their segmenters scaled so that confident pixels spread over the image). The
stages after an exit take and return lists of branches, each masked at its own resolution.
"""
import pytest
import torch
from torch.nn import functional as F

from conftest import random_batch, tiny_cfg
from conftest import trained_model as train_steps
from segdistill.modeling.masked import PixelMask
from segdistill.modeling.masked_heads import masked_head_input
from segdistill.modeling.meta_arch.anytime import FINAL
from test_anytime import CallCounter, anytime_twin
from test_anytime_pixel import check_exit_answers_every_pixel, pixel
from test_pixel_training import twin

K = 5
EXITS = ["stage2_b0", "stage3_b1"]
SIZES = {"nearest": (64, 64), "bilinear": (40, 56)}


def hrnet_cfg(fusion):
    cfg = tiny_cfg("hrnet_w18_small", "HRNetV2Head", num_classes=K, **{"MODEL.META_ARCHITECTURE": "MultiExitSegmentor"})
    cfg.MODEL.TIMM.OUT_FEATURES = cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.TIMM.HRNET_FUSE_UPSAMPLE = fusion
    cfg.MODEL.EXITS.MODE, cfg.MODEL.EXITS.CHANNELS = "ds", 16
    cfg.MODEL.EXITS.IN_FEATURES = EXITS
    return cfg


@pytest.fixture(scope="module", params=sorted(SIZES))
def pair(request):
    """(fusion, cfg, trained MultiExitSegmentor, its AnytimeSegmentor)."""
    cfg = hrnet_cfg(request.param)
    trained = train_steps(cfg, K, 1)
    with torch.no_grad():
        for ex in trained.exits.values():
            ex.segmenter.weight.mul_(30)
            ex.segmenter.bias.mul_(30)
    model, _ = anytime_twin(cfg, trained)
    return request.param, cfg, trained, model


def exit_logits(model, images, name):
    """Exit ``name``'s logits at the padded input size (``exit:<name>``'s answer)."""
    with torch.no_grad():
        logits, answer, _ = model.run_stages(images.tensor, images.image_sizes, (name,), lambda n, l: True)
    assert answer == name
    return logits


def test_all_pixels_frozen_after_an_exit_is_that_exits_output_and_nothing_later_runs(pair):
    fusion, _, _, model = pair
    b = model.backbone.body
    counter = CallCounter({"transition2": b.transition2, "stage3": b.stage3, "transition3": b.transition3,
                           "stage4": b.stage4, "head": model.sem_seg_head,
                           **{f"exit_{n}": m for n, m in model.exits.items()}})
    batch = random_batch(2, *SIZES[fusion], K, seed=3, with_labels=False)
    try:
        for k, thresholds, later in [
            ("stage2_b0", {"stage2_b0": 0.0, "stage3_b1": 0.0},
             ["transition2", "stage3", "transition3", "stage4", "head", "exit_stage3_b1"]),
            # stage2_b0 runs and freezes nothing (threshold above every probability): stage3_b1 answers all
            ("stage3_b1", {"stage2_b0": 1.0, "stage3_b1": 0.0}, ["transition3", "stage4", "head"]),
        ]:
            a = check_exit_answers_every_pixel(model, batch, k, thresholds, later, counter)
            # active_pct per feature: every branch of the stages that ran, 0 for those that did not
            assert all(a["active_pct"][f] == 100.0 for f in ("layer1", "stage2_b0", "stage2_b1"))
            assert all(a["active_pct"][f] == 0.0 for f in ("res2", "res3", "res4", "res5"))
    finally:
        counter.remove()
        model.policy = FINAL


def test_nothing_frozen_is_the_final_policy_with_its_macs(pair):
    fusion, _, _, model = pair
    batch = random_batch(2, *SIZES[fusion], K, seed=7, with_labels=False)
    model.policy = FINAL
    with torch.no_grad():
        ref = [model([inp])[0] for inp in batch]
    costs = model.costs(ref[0]["anytime"]["input_hw"])
    for thresholds in ({"stage2_b0": 2.0, "stage3_b1": 2.0}, {"stage2_b0": 1.0, "stage3_b1": 1.0}):
        pixel(model, thresholds)
        with torch.no_grad():
            out = model(batch)
        for o, r in zip(out, ref):
            torch.testing.assert_close(o["sem_seg"], r["sem_seg"], rtol=1e-5, atol=1e-5)
        a = out[0]["anytime"]
        assert out[0]["sem_seg_exit"] == FINAL and a["answered_pct"][FINAL] == 100.0
        assert all(v == 100.0 for v in a["active_pct"].values()) and len(a["active_pct"]) == 10
        assert a["macs"] == costs.macs(FINAL, a["evaluated"]) + sum(costs.answer[e] for e in a["evaluated"])
        assert a["masked"]["dense_ops"][-1] == "sem_seg_head"  # nothing frozen: the head's own forward, dense
    assert a["evaluated"] == tuple(EXITS)
    model.policy = FINAL


@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_equals_emulate_on_random_thresholds_and_frozen_pixels_keep_their_exits_answer(pair, seed):
    fusion, _, _, model = pair
    image = random_batch(1, *SIZES[fusion], K, seed=11 + seed, with_labels=False)[0]
    images = model._images([image])
    hw = tuple(images.tensor.shape[-2:])
    first = exit_logits(model, images, EXITS[0])
    top = F.softmax(first, dim=1).amax(dim=1)
    g = torch.Generator().manual_seed(seed)
    # the first exit freezes 65-85 % (so that stage3's active share is below SPARSE_MAX_ACTIVE and
    # it runs sparse), the second a random quantile
    cut = float(top.flatten().quantile(float(torch.empty(1).uniform_(0.15, 0.35, generator=g))))
    thresholds = {EXITS[0]: cut, EXITS[1]: float(torch.empty(1).uniform_(0.6, 0.99, generator=g))}
    got = {}
    for mode in ("emulate", "sparse"):
        pixel(model, thresholds, mode, min_pixels=0)
        with torch.no_grad():
            got[mode] = model.run_pixel(images.tensor, images.image_sizes[0])
    (emulated, info), (sparse, sinfo) = got["emulate"], got["sparse"]
    torch.testing.assert_close(sparse, emulated, rtol=1e-5, atol=1e-5)
    assert sinfo["macs"] == pytest.approx(info["macs"], rel=1e-12) and sinfo["answered_pct"] == info["answered_pct"]
    assert "stage3" in sinfo["masked"]["sparse_stages"] and info["masked"]["sparse_stages"] == []
    # the HRNetV2 head runs masked (sparse: its input, res2, has at most 35 % of its pixels active)
    assert "sem_seg_head" in sinfo["masked"]["sparse_stages"]
    assert all("sem_seg_head" not in i["masked"]["dense_ops"] for i in (info, sinfo))
    assert 0 < info["answered_pct"][EXITS[0]] < 100 and info["answer"] == FINAL
    frozen = (top >= cut)[:, None].expand_as(first)
    assert torch.equal(emulated[frozen], first[frozen]) and torch.equal(sparse[frozen], first[frozen])
    share = 100.0 - info["answered_pct"][EXITS[0]]
    assert info["active_pct"]["stage3_b1"] == pytest.approx(share) and info["active_pct"]["stage2_b1"] == 100.0
    assert info["macs"] < model.costs(hw).final
    model.policy = FINAL


def test_counted_macs_at_every_pixel_active_add_up_to_the_final_path(pair):
    """The stages (tensor -> list, list -> list) and the head, counted dense, sum to costs()'
    final path (fvcore, traced whole); each list-valued stage run masked at a full mask counts
    its fvcore MACs and gives its dense branches."""
    fusion, _, _, model = pair
    hw = SIZES[fusion]
    pixel(model, {"stage2_b0": 0.5, "stage3_b1": 0.5})
    dense, costs = model.pixel_costs(hw), model.costs(hw)
    assert sorted(dense.stages) == ["layer1", "stage2", "stage3", "stage4"]
    assert sum(dense.stages.values()) + dense.head == costs.final
    # an exit's prefix is every stage up to its own, whole: a stage computes all its branches
    # (fvcore's trace of the exit alone would drop the fuse outputs it does not read)
    assert costs.prefix["stage2_b0"] == dense.stages["layer1"] + dense.stages["stage2"]
    assert costs.prefix["stage3_b1"] == costs.prefix["stage2_b0"] + dense.stages["stage3"]
    for answer, evaluated in [("stage2_b0", EXITS[:1]), ("stage3_b1", EXITS), (FINAL, EXITS)]:
        assert costs.macs(answer, evaluated) == model.path_macs(hw, answer, evaluated), answer
    plans = model._masked_plans(model.pixel_thresholds)
    assert sorted(plans) == ["stage3", "stage4"]
    x, feats = torch.zeros(1, 3, *hw), {}
    outputs = model.backbone.stage_outputs()
    with torch.no_grad():
        for name, module in model.backbone.stage_modules().items():
            if name in plans:
                y, report = plans[name](x, PixelMask.full(1, hw), "emulate")
                assert float(report.macs[0]) == dense.stages[name], name
                assert isinstance(y, list) and all(torch.equal(a, b) for a, b in zip(y, module(x))), name
            x = module(x)
            feats.update(model.backbone.stage_features(outputs[name], x))
        # the head, masked at a full mask on its list of branches, plus its resize: the dense head's fvcore count
        head = model._masked_head()
        logits, report = head(masked_head_input(model.sem_seg_head, feats), PixelMask.full(1, hw), "emulate")
    assert float(report.macs[0]) + dense.head_resize == dense.head and report.dense_ops == []
    torch.testing.assert_close(logits, model.sem_seg_head.forward_outputs(feats)["logits"], rtol=1e-5, atol=1e-5)
    model.policy = FINAL


def test_mask_aware_training_in_eval_is_the_pixel_policy_emulated(pair):
    fusion, cfg, trained, model = pair
    batch = random_batch(2, *SIZES[fusion], K, seed=5, with_labels=False)
    images = model._images(batch)
    x = images.tensor
    first = exit_logits(model, images, EXITS[0])
    t = float(F.softmax(first, dim=1).amax(dim=1).flatten().quantile(0.6))
    pixel_model = twin(cfg, trained, t).eval()
    assert torch.equal(pixel_model._images(batch).tensor, x)
    pixel(model, {n: t for n in EXITS}, "emulate")
    for i in range(2):  # one image at a time, as the policy runs (a batch of one: the same convolutions)
        with torch.no_grad():
            run = pixel_model.pixel_run(x[i:i + 1])
            expected, info = model.run_pixel(x[i:i + 1], images.image_sizes[i])
        assert list(run.own) == EXITS and all(float(f.float().mean()) > 0.02 for f in run.frozen.values())
        assert 0.05 < float(run.active.float().mean()) < 0.9 and info["answer"] == FINAL
        torch.testing.assert_close(run.final_logits, expected, rtol=1e-5, atol=1e-5)
        for name, f in run.frozen.items():
            assert 100.0 * float(f.float().mean()) == pytest.approx(info["answered_pct"][name])
    model.policy = FINAL


def test_mask_aware_training_step_runs_masked_hrnet_stages(pair):
    """A training forward with a threshold that freezes pixels at the first exit: the later
    (list-valued) stages run masked, every loss has a gradient into the backbone's last stage."""
    fusion, cfg, trained, _ = pair
    model = twin(cfg, trained, 0.6).train()
    losses = model(random_batch(2, 64, 64, K, seed=2))
    assert set(losses) == {"loss_sem_seg", "loss_ds"}
    run = model.pixel_run(model._images(random_batch(2, 64, 64, K, seed=2)).tensor)
    assert float(run.frozen[EXITS[0]].float().mean()) > 0
    grads = torch.autograd.grad(sum(losses.values()), [p for p in model.backbone.body.stage4.parameters()],
                                allow_unused=True)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)
