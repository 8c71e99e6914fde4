"""DiffKD: the schedule, the diffusion loss, the adaptive noise matching + DDIM denoising, the KD
and autoencoder terms against direct computations of their formulas (values and gradients),
the draws (seeded, continued exactly after a checkpoint round trip), the deployed student
(exactly the plain student's parameters), and two-iteration runs of train_net.py from the YAML
and the lazy demo configs (with --resume)."""
import math
import os

import numpy as np
import pytest
import torch

from conftest import REPO, LAZY_TINY, random_batch, assert_deploys_as_the_plain_student, distill_run_opts
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from segdistill import add_segdistill_config
from segdistill.modeling.distill.diffkd import (
    KnowledgeDiffusionDistillation, NoisePredictor, ddim_timesteps, linear_alphas_cumprod,
)
from test_distill_taps import K, distill_cfg

SETTINGS = dict(student_tap="res5", teacher_tap="res5", kd_weight=1.0, diff_weight=1.0, ae_weight=1.0, use_ae=True,
                ae_channels=0, steps=5, train_timesteps=1000, connector="conv1x1_bias", seed=0)


def bound(cs=6, ct=16, **kw):
    torch.manual_seed(0)
    loss = KnowledgeDiffusionDistillation(**{**SETTINGS, **kw})
    loss.bind({"res5": ShapeSpec(channels=cs, stride=8)}, {"res5": ShapeSpec(channels=ct, stride=8)}, num_classes=K)
    return loss.double()


def abar(T):
    """prod_{s<=t} (1 - beta_s), beta_s = 1e-4 + (0.02 - 1e-4) s / (T - 1), as a list of floats."""
    out, prod = [], 1.0
    for s in range(T):
        prod *= 1.0 - (1e-4 + (0.02 - 1e-4) * s / (T - 1))
        out.append(prod)
    return out


def conv1x1(x, conv):
    return torch.einsum("nchw,oc->nohw", x, conv.weight[:, :, 0, 0]) + conv.bias[None, :, None, None]


def batch_norm(x, bn):
    """Training-mode BN with the batch's statistics (biased variance), by hand."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]


def test_schedule_and_timesteps():
    ref = abar(1000)
    got = linear_alphas_cumprod(1000)
    assert np.allclose(got.numpy(), ref, rtol=1e-12, atol=0)
    # the authors' pipeline: the lower half of a 2 * STEPS schedule of 1000 steps
    assert ddim_timesteps(1000, 5) == ([400, 300, 200, 100, 0], 100)
    assert ddim_timesteps(10, 2) == ([2, 0], 2) and ddim_timesteps(7, 3) == ([2, 1, 0], 1)


def test_the_diffusion_and_autoencoder_terms_match_the_formulas():
    loss = bound().train()
    g = torch.Generator().manual_seed(3)
    t_feat = torch.randn(3, 16, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    s_feat = torch.randn(3, 6, 4, 5, generator=g, dtype=torch.float64)
    timesteps = torch.tensor([0, 517, 999])
    noise = torch.randn(3, 8, 4, 5, generator=g, dtype=torch.float64)
    start = torch.randn(3, 8, 4, 5, generator=g, dtype=torch.float64)
    kd, diff, ae = loss(s_feat, t_feat, timesteps, noise, start)
    # the autoencoder by hand: Z = BN(W_e T + b_e), reconstruction W_d Z + b_d
    with torch.no_grad():
        z = batch_norm(conv1x1(t_feat, loss.ae.encoder[0]), loss.ae.encoder[1])
        rec = conv1x1(z, loss.ae.decoder)
    assert ae.item() == pytest.approx(((rec - t_feat.detach()).numpy() ** 2).mean(), rel=1e-12)
    # L_diff: sqrt(abar_t) Z + sqrt(1 - abar_t) eps, per image, into the noise predictor
    a = abar(1000)
    noisy = torch.stack([math.sqrt(a[t]) * z[i] + math.sqrt(1 - a[t]) * noise[i] for i, t in enumerate([0, 517, 999])])
    params = dict(loss.model.named_parameters())
    ref_model = NoisePredictor(8, 1000).double()
    ref_model.load_state_dict(loss.model.state_dict())
    pred = ref_model(noisy, timesteps)
    ref_diff = ((pred - noise) ** 2).mean()
    assert diff.item() == pytest.approx(ref_diff.item(), rel=1e-12)
    # the timestep embedding enters as a per-image, per-channel offset of the input
    emb = ref_model.time_embedding.weight[timesteps][:, :, None, None]
    torch.testing.assert_close(ref_model.pred(noisy + emb), pred, rtol=0, atol=0)
    # gradients: the diffusion loss trains the noise predictor only, never the teacher feature
    diff.backward()
    ref_diff.backward()
    for name, p in ref_model.named_parameters():
        torch.testing.assert_close(params[name].grad, p.grad, rtol=1e-10, atol=1e-14)
    assert t_feat.grad is None and loss.ae.encoder[0].weight.grad is None and loss.trans.weight.grad is None
    # the reconstruction trains the autoencoder
    ae.backward()
    assert loss.ae.encoder[0].weight.grad.abs().sum() > 0 and loss.ae.decoder.weight.grad.abs().sum() > 0
    assert t_feat.grad is None


def ref_denoised(loss, s, start, T, timesteps):
    """S_hat by hand: S' = A(S); gamma = softmax(linear(mean_hw(bottleneck(S'))))_0;
    x = gamma S' + (1 - gamma) eps'; DDIM (sigma 0) in the form
    x <- sqrt(abar_prev / abar_t) x + (sqrt(1 - abar_prev) - sqrt(abar_prev (1 - abar_t) / abar_t)) eps_theta;
    then BN(W_p x + b_p)."""
    a = abar(T)
    sp = conv1x1(s, loss.trans)
    pooled = loss.adapter.feat[0](sp).mean(dim=(2, 3))
    logits = pooled @ loss.adapter.pred.weight.T + loss.adapter.pred.bias
    gamma = (torch.exp(logits[:, 0]) / (torch.exp(logits[:, 0]) + torch.exp(logits[:, 1])))[:, None, None, None]
    x = gamma * sp + (1 - gamma) * start
    for k, t in enumerate(timesteps):
        prev = a[timesteps[k + 1]] if k + 1 < len(timesteps) else 1.0
        eps = loss.model.pred(x + loss.model.time_embedding.weight[t][None, :, None, None])
        x = math.sqrt(prev / a[t]) * x + (math.sqrt(1 - prev) - math.sqrt(prev * (1 - a[t]) / a[t])) * eps
    return batch_norm(conv1x1(x, loss.proj[0]), loss.proj[1]), gamma


@pytest.mark.parametrize("use_ae,steps,T", [(True, 5, 1000), (False, 2, 10)])
def test_the_kd_term_of_the_denoised_student_and_its_gradient_match_the_formula(use_ae, steps, T):
    loss = bound(use_ae=use_ae, steps=steps, train_timesteps=T).train()
    latent = 8 if use_ae else 16
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 16, 3, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(2, latent, 3, 4, generator=g, dtype=torch.float64)
    start = torch.randn(2, latent, 3, 4, generator=g, dtype=torch.float64)
    kd, _, ae = loss(s, t, torch.tensor([1, 2]), noise, start)
    assert (ae is None) == (not use_ae)
    with torch.no_grad():
        z = batch_norm(conv1x1(t, loss.ae.encoder[0]), loss.ae.encoder[1]) if use_ae else t
    r = r_stride = T // (2 * steps)
    timesteps = [i * r_stride for i in range(steps - 1, -1, -1)]
    s_ref = s.detach().clone().requires_grad_(True)
    hat, gamma = ref_denoised(loss, s_ref, start, T, timesteps)
    assert 0 < gamma.min() and gamma.max() < 1
    ref = ((hat - z) ** 2).mean()
    assert kd.item() == pytest.approx(ref.item(), rel=1e-10)
    kd.backward()
    ref.backward()
    # the student learns through every denoising step
    assert s.grad.abs().sum() > 0
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-8, atol=1e-12)
    assert r > 0


def test_the_loss_through_distill_weights_and_names_its_terms():
    from segdistill.modeling.distill.base import DistillBatch

    loss = bound(kd_weight=2.0, diff_weight=3.0, ae_weight=5.0)
    s, t = torch.randn(2, 6, 3, 4, dtype=torch.float64), torch.randn(2, 16, 3, 4, dtype=torch.float64)
    batch = DistillBatch(student={"res5": s}, teacher={"res5": t}, targets=None, images=torch.zeros(2, 3, 24, 32),
                         classifier=torch.nn.Identity(), num_classes=K, ignore_value=255, exclude_ignore=False)
    out = loss.distill(batch)
    assert set(out) == {"loss_diffkd_kd", "loss_diffkd_diff", "loss_diffkd_ae"} and int(loss.draws) == 1
    again = bound(kd_weight=1.0, diff_weight=1.0, ae_weight=1.0)
    kd, diff, ae = again(s, t, *again.draw(2, (8, 3, 4), device="cpu", dtype=torch.float64))
    # same parameters (seed 0) and the same first draws: the terms are the weighted unweighted ones
    assert out["loss_diffkd_kd"].item() == pytest.approx(2 * kd.item(), rel=1e-12)
    assert out["loss_diffkd_diff"].item() == pytest.approx(3 * diff.item(), rel=1e-12)
    assert out["loss_diffkd_ae"].item() == pytest.approx(5 * ae.item(), rel=1e-12)
    plain = bound(use_ae=False)
    assert plain.ae is None and plain.model.time_embedding.embedding_dim == 16
    assert set(plain.distill(batch)) == {"loss_diffkd_kd", "loss_diffkd_diff"}
    assert bound(ae_channels=4).model.time_embedding.embedding_dim == 4


def test_bad_settings_fail_naming_the_key():
    with pytest.raises(ValueError, match=r"MODEL.DISTILL.DIFFKD.STEPS must be >= 1, got 0"):
        bound(steps=0)
    with pytest.raises(ValueError, match=r"TRAIN_TIMESTEPS \(8\) must be at least 2 x STEPS \(10\)"):
        bound(train_timesteps=8)
    with pytest.raises(ValueError, match=r"MODEL.DISTILL.DIFFKD.CONNECTOR: the student tap has 6 channels"):
        bound(connector="none")
    with pytest.raises(RuntimeError, match=r"'diffkd' was not bound"):
        KnowledgeDiffusionDistillation(**SETTINGS).distill(None)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_draws_are_seeded_and_continue_exactly_after_a_checkpoint_round_trip(device):
    a, b = bound().to(device), bound().to(device)
    first = [a.draw(2, (8, 3, 4), device=device, dtype=torch.float64) for _ in range(2)]
    for x, y in zip(first[0], b.draw(2, (8, 3, 4), device=device, dtype=torch.float64)):
        assert torch.equal(x, y) and x.device.type == device  # drawn where the features are
    assert not torch.equal(first[0][1], first[1][1]) and not torch.equal(first[0][1], first[0][2])
    assert int(a.draws) == 2 and all(0 <= int(t) < 1000 for t in first[0][0])
    state = a.state_dict()
    assert "draws" in state and "alphas_cumprod" not in state  # the schedule is the config's, not saved
    resumed = bound().to(device)
    resumed.load_state_dict(state)
    assert int(resumed.draws) == 2
    for x, y in zip(resumed.draw(2, (8, 3, 4), device=device, dtype=torch.float64),
                    a.draw(2, (8, 3, 4), device=device, dtype=torch.float64)):
        assert torch.equal(x, y)
    other = bound(seed=1).to(device)
    assert not torch.equal(other.draw(2, (8, 3, 4), device=device, dtype=torch.float64)[1], first[0][1])
    # the whole loss on that device
    s, t = torch.randn(2, 6, 3, 4, dtype=torch.float64), torch.randn(2, 16, 3, 4, dtype=torch.float64)
    kd, diff, ae = a(s.to(device), t.to(device), *a.draw(2, (8, 3, 4), device=device, dtype=torch.float64))
    assert kd.device.type == diff.device.type == ae.device.type == device


def test_the_deployed_student_has_exactly_the_plain_students_parameters(tmp_path):
    cfg = distill_cfg(tmp_path, ["pd", "diffkd"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    losses = model(random_batch(2, 64, 64, K))
    assert {"loss_sem_seg", "loss_pd", "loss_diffkd_kd", "loss_diffkd_diff", "loss_diffkd_ae"} <= set(losses)
    sum(losses.values()).backward()
    parts = dict(model.distill_losses.named_parameters())
    assert {k.split(".")[1] for k in parts} == {"ae", "trans", "model", "adapter", "proj"}
    assert all(p.grad is not None for p in parts.values())
    assert_deploys_as_the_plain_student(cfg, model)



@pytest.mark.slow
def test_train_net_yaml_two_iterations_then_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from test_train_net import run

    out_dir = str(tmp_path / "yaml")
    config, opts = ["--config-file", "configs/demo/distill/diffkd.yaml"], distill_run_opts(out_dir)
    run(config + opts + ["SOLVER.MAX_ITER", "2"])
    saved = torch.load(os.path.join(out_dir, "model_final.pth"), weights_only=False)["model"]
    assert int(saved["distill_losses.diffkd.draws"]) == 2
    assert "distill_losses.diffkd.model.time_embedding.weight" in saved
    assert not any(k.startswith("teacher") for k in saved)
    _, out = run(config + ["--resume"] + opts + ["SOLVER.MAX_ITER", "3"])
    assert "Starting training from iteration 2" in out
    resumed = torch.load(os.path.join(out_dir, "model_final.pth"), weights_only=False)["model"]
    assert int(resumed["distill_losses.diffkd.draws"]) == 3  # the third draw of an uninterrupted run


@pytest.mark.slow
def test_train_net_lazy_two_iterations(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from test_train_net import run

    out_dir = str(tmp_path / "lazy")
    lazy_tiny = [o for o in LAZY_TINY if not o.startswith("model.sem_seg_head")]  # the student's head is model.student's
    run(["--config-file", "configs/demo/distill/diffkd.py", *lazy_tiny, "train.max_iter=2",
         f"train.output_dir={out_dir}", "model.teacher.weights=", "model.teacher.allow_random=True",
         "model.eval_teacher=False", "model.student.sem_seg_head.aspp_channels=32"])
    saved = torch.load(os.path.join(out_dir, "model_final.pth"), weights_only=False)["model"]
    assert int(saved["distill_losses.diffkd.draws"]) == 2 and "distill_losses.diffkd.adapter.pred.weight" in saved


def test_demo_configs_name_the_row():
    from detectron2.config import LazyConfig

    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs/demo/distill/diffkd.yaml"))
    assert list(cfg.MODEL.DISTILL.LOSSES) == ["pd", "diffkd"]
    c = cfg.MODEL.DISTILL.DIFFKD
    assert (c.STEPS, c.TRAIN_TIMESTEPS, c.USE_AE, c.AE_CHANNELS) == (5, 1000, True, 0)
    assert (c.STUDENT_TAP, c.TEACHER_TAP, c.KD_WEIGHT, c.DIFF_WEIGHT, c.AE_WEIGHT) == ("res5", "res5", 1.0, 1.0, 1.0)
    lazy = LazyConfig.load(os.path.join(REPO, "configs/demo/distill/diffkd.py"))
    assert list(lazy.model.losses.names) == ["pd", "diffkd"]
