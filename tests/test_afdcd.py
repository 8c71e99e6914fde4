"""Af-DCD: the masked feature-mimicking and omni-contrastive terms against loops over the paper's
formulas (values and gradients), the masks (seeded, continued exactly after a checkpoint
round trip), the deployed student (exactly the plain student's parameters), and two-iteration
runs of train_net.py from the YAML and the lazy demo configs (with --resume)."""
import itertools
import os

import numpy as np
import pytest
import torch

from conftest import REPO, LAZY_TINY, random_batch, assert_deploys_as_the_plain_student, distill_run_opts
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from segdistill import add_segdistill_config
from segdistill.modeling.distill.afdcd import (
    AugmentationFreeDenseContrastiveDistillation, EnhancedProjector, afdcd_center_mask, omni_contrastive_loss,
)
from segdistill.modeling.distill.mgd import mgd_mask
from test_distill_taps import K, distill_cfg

SETTINGS = dict(student_tap="res5", teacher_tap="res5", fd_weight=4e-5, ctr_weight=1e-3, temperature=0.07,
                groups=16, patch_size=4, pool=4, mask="random", mask_ratio=0.75, projector="plain",
                connector="conv1x1_bias", seed=0)


def bound(cs=3, ct=4, **kw):
    torch.manual_seed(0)
    loss = AugmentationFreeDenseContrastiveDistillation(**{**SETTINGS, **kw})
    loss.bind({"res5": ShapeSpec(channels=cs, stride=8)}, {"res5": ShapeSpec(channels=ct, stride=8)}, num_classes=K)
    return loss.double()


def ref_ctr(s, t, tau, groups, patch, pool):
    """The omni-contrastive loss with one explicit loop per anchor (torch scalars, so autograd
    gives the reference gradient too)."""
    if pool:
        s, t = torch.nn.functional.max_pool2d(s, pool), torch.nn.functional.max_pool2d(t, pool)
    n, c, h, w = s.shape
    ph, pw = min(patch, h), min(patch, w)
    h, w = h - h % ph, w - w % pw
    cg = c // groups
    total = 0.0
    for b, pi, pj in itertools.product(range(n), range(h // ph), range(w // pw)):
        positions = [(pi * ph + i, pj * pw + j) for i in range(ph) for j in range(pw)]
        tokens = [(y, x, g) for (y, x) in positions for g in range(groups)]
        for (y, x, g) in tokens:
            anchor = s[b, g * cg:(g + 1) * cg, y, x]

            def sim(y2, x2, g2):
                return torch.exp(-(anchor - t[b, g2 * cg:(g2 + 1) * cg, y2, x2]).abs().sum() / tau)

            positive = sim(y, x, g)
            negatives = sum(sim(y2, x2, g2) for (y2, x2, g2) in tokens if g2 != g)
            total = total - torch.log(positive / (positive + negatives))
    return total / (n * h * w)


@pytest.mark.parametrize("groups,patch,pool,size", [(2, 2, 2, (8, 6)), (3, 4, 0, (3, 5)), (1, 2, 0, (4, 4))])
def test_omni_contrastive_term_and_its_gradient_match_the_formula(groups, patch, pool, size):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 6, *size, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 6, *size, generator=g, dtype=torch.float64, requires_grad=True)
    got = omni_contrastive_loss(s, t, temperature=0.5, groups=groups, patch_size=patch, pool=pool)
    s_ref = s.detach().clone().requires_grad_(True)
    ref = ref_ctr(s_ref, t.detach(), 0.5, groups, patch, pool)
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)
    got.backward()
    ref.backward()
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-9, atol=1e-12)
    assert t.grad is None or t.grad.abs().sum() == 0  # the teacher's side is a target
    # identical features: the positive is the nearest teacher token but negatives keep the loss > 0
    same = omni_contrastive_loss(t.detach(), t.detach(), temperature=0.5, groups=groups, patch_size=patch, pool=pool)
    assert same.item() == pytest.approx(ref_ctr(t.detach(), t.detach(), 0.5, groups, patch, pool).item(), rel=1e-10)


def test_the_whole_loss_matches_a_direct_computation():
    loss = bound(cs=3, ct=4, groups=2, patch_size=2, pool=0, temperature=0.2)
    assert loss.align.bias is not None  # the authors' align conv, built as the channel counts differ
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 4, 6, generator=g, dtype=torch.float64)
    mask = mgd_mask(2, 4, 6, 0.5, generator=torch.Generator().manual_seed(9)).double()
    fd, ctr = loss(s, t, mask)
    with torch.no_grad():
        aligned = torch.nn.functional.conv2d(s, loss.align.weight, loss.align.bias)
        p = loss.projector
        projected = p[2](torch.relu(p[0](aligned * mask)))
    assert fd.item() == pytest.approx(((projected.numpy() - t.numpy()) ** 2).sum() / 2, rel=1e-12)
    assert ctr.item() == pytest.approx(ref_ctr(projected, t, 0.2, 2, 2, 0).item(), rel=1e-10)
    (fd + ctr).backward()
    assert s.grad.abs().sum() > 0 and all(q.grad.abs().sum() > 0 for q in loss.parameters())
    assert s.grad.permute(0, 2, 3, 1)[mask[:, 0] == 0].abs().max() == 0  # masked positions teach nothing
    # equal channel counts: no aligner (the authors build it only when they differ)
    assert isinstance(bound(cs=4, ct=4, groups=2).align, torch.nn.Identity)


def test_masks_and_the_enhanced_projector():
    center = afdcd_center_mask(1, 6, 9)[0, 0]
    assert center[2:4, 3:6].sum() == 0 and center.sum() == 54 - 6
    loss = bound(ct=4, projector="enhanced", groups=2)
    assert isinstance(loss.projector, EnhancedProjector)
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    p = loss.projector
    x1 = torch.relu(p.block1[0](x))
    x2 = torch.relu(p.block2[0](x1))
    torch.testing.assert_close(p(x), (p.adaptor1(x1) + p.adaptor2(x2)) / 2)
    with pytest.raises(ValueError, match=r"GROUPS \(3\) must divide the teacher tap 'res5' \(4 channels\)"):
        bound(ct=4, groups=3)
    with pytest.raises(ValueError, match=r"MODEL.DISTILL.AFDCD.MASK must be one of \('random', 'center'\)"):
        bound(mask="box")


def test_masks_are_seeded_and_continue_exactly_after_a_checkpoint_round_trip():
    a, b = bound(groups=2), bound(groups=2)
    first = [a.draw_mask(2, 5, 7, device="cpu", dtype=torch.float64) for _ in range(2)]
    assert torch.equal(first[0], b.draw_mask(2, 5, 7, device="cpu", dtype=torch.float64))
    assert not torch.equal(first[0], first[1])  # a new mask every step
    assert 0.1 < 1 - torch.stack(first).mean().item() < 0.9 and int(a.draws) == 2
    resumed = bound(groups=2)
    resumed.load_state_dict(a.state_dict())
    assert int(resumed.draws) == 2
    torch.testing.assert_close(resumed.draw_mask(2, 5, 7, device="cpu", dtype=torch.float64),
                               a.draw_mask(2, 5, 7, device="cpu", dtype=torch.float64), rtol=0, atol=0)
    other = bound(groups=2, seed=1)
    assert not torch.equal(other.draw_mask(2, 5, 7, device="cpu", dtype=torch.float64), first[0])
    center = bound(groups=2, mask="center")
    center.draw_mask(1, 3, 3, device="cpu", dtype=torch.float64)
    assert int(center.draws) == 0


def test_the_deployed_student_has_exactly_the_plain_students_parameters(tmp_path):
    cfg = distill_cfg(tmp_path, ["pd", "afdcd"], **{"MODEL.DISTILL.AFDCD.POOL": 0, "MODEL.DISTILL.AFDCD.PATCH_SIZE": 2})
    torch.manual_seed(0)
    model = build_model(cfg).train()
    losses = model(random_batch(2, 64, 64, K))
    assert {"loss_sem_seg", "loss_pd", "loss_afdcd_fd", "loss_afdcd_ctr"} <= set(losses)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.distill_losses.parameters())
    assert_deploys_as_the_plain_student(cfg, model)



@pytest.mark.slow
def test_train_net_yaml_two_iterations_then_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from test_train_net import run

    out_dir = str(tmp_path / "yaml")
    config, opts = ["--config-file", "configs/demo/distill/afdcd.yaml"], distill_run_opts(out_dir)
    run(config + opts + ["SOLVER.MAX_ITER", "2"])
    saved = torch.load(os.path.join(out_dir, "model_final.pth"), weights_only=False)["model"]
    assert int(saved["distill_losses.afdcd.draws"]) == 2
    assert not any(k.startswith("teacher") for k in saved)
    _, out = run(config + ["--resume"] + opts + ["SOLVER.MAX_ITER", "3"])
    assert "Starting training from iteration 2" in out
    resumed = torch.load(os.path.join(out_dir, "model_final.pth"), weights_only=False)["model"]
    assert int(resumed["distill_losses.afdcd.draws"]) == 3  # the third mask of an uninterrupted run


@pytest.mark.slow
def test_train_net_lazy_two_iterations(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from test_train_net import run

    out_dir = str(tmp_path / "lazy")
    lazy_tiny = [o for o in LAZY_TINY if not o.startswith("model.sem_seg_head")]  # the student's head is model.student's
    run(["--config-file", "configs/demo/distill/afdcd.py", *lazy_tiny, "train.max_iter=2",
         f"train.output_dir={out_dir}", "model.teacher.weights=", "model.teacher.allow_random=True",
         "model.eval_teacher=False", "model.student.sem_seg_head.aspp_channels=32"])
    saved = torch.load(os.path.join(out_dir, "model_final.pth"), weights_only=False)["model"]
    assert int(saved["distill_losses.afdcd.draws"]) == 2 and "distill_losses.afdcd.projector.0.weight" in saved


def test_demo_configs_name_the_row():
    from detectron2.config import LazyConfig

    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs/demo/distill/afdcd.yaml"))
    assert list(cfg.MODEL.DISTILL.LOSSES) == ["pd", "afdcd"] and cfg.MODEL.DISTILL.AFDCD.GROUPS == 16
    lazy = LazyConfig.load(os.path.join(REPO, "configs/demo/distill/afdcd.py"))
    assert list(lazy.model.losses.names) == ["pd", "afdcd"]
    assert np.isclose(cfg.MODEL.DISTILL.AFDCD.FD_WEIGHT, 4e-5) and cfg.MODEL.DISTILL.AFDCD.TEMPERATURE == 0.07
