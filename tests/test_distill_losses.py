"""Distillation losses (PD, CWD, HWD, FAKD) and FAKD's covariance against brute-force numpy loops."""
import math
import os

import numpy as np
import pytest
import torch

from conftest import free_port
from segdistill.modeling.distill.base import label_mask
from segdistill.modeling.distill.covariance import ClassCovariance
from segdistill.modeling.distill.cwd import ChannelWiseDistillation, cwd_loss
from segdistill.modeling.distill.fakd import (
    FeatureAugmentedCWD, FeatureAugmentedPD, cosine_ramp, fakd_cwd_loss, fakd_pd_loss,
)
from segdistill.modeling.distill.hwd import HolisticWeightedDistillation, class_pixel_counts, hwd_weights
from segdistill.modeling.distill.pd import PixelWiseDistillation, pixel_kl

N, C, H, W, A = 2, 4, 3, 5, 6

IGNORE = 255
HWD = dict(beta=0.1, mu=1.0, sigma=1.0, eps=1e-8, pixel_correction=False, variant="paper")


def pd(temperature):
    return PixelWiseDistillation(temperature=temperature, loss_weight=1.0)


def cwd(temperature):
    return ChannelWiseDistillation(temperature=temperature, loss_weight=3.0)


def hwd(temperature, **kw):
    return HolisticWeightedDistillation(temperature=temperature, loss_weight=3.0, **{**HWD, **kw})


def fakd(cls, temperature):
    return cls(temperature=temperature, loss_weight=1.0, lambda0=1.0, lambda_schedule="cosine",
               covariance="diagonal", all_reduce=False)


def case(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, C, H, W, generator=g, dtype=torch.float64) * scale
    t = torch.randn(N, C, H, W, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, C, (N, H, W), generator=g)
    labels[0, 0, :3] = IGNORE
    labels[1, 2, 1] = IGNORE
    labels[1][labels[1] == 3] = 0  # class 3 absent from image 1
    return s.float(), t.float(), labels


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def np_cov(seed=0, full=True, k=C, a=A):
    rng = np.random.default_rng(seed)
    if not full:
        return rng.uniform(0.1, 2.0, size=(k, a))
    m = rng.normal(size=(k, a, a))
    return np.einsum("kab,kcb->kac", m, m) / a + 0.1 * np.eye(a)


def quad(w, cov, c, y):
    """w_c^T Sigma_y w_c (diagonal or full)."""
    s = np.diag(cov[y]) if cov.ndim == 2 else cov[y]
    return w[c] @ s @ w[c]


# ---------------------------------------------------------------------------------------------
# brute-force references: explicit loops over images, channels, pixels
# ---------------------------------------------------------------------------------------------
def ref_pd(s, t, T, valid=None):
    s, t = s.double().numpy(), t.double().numpy()
    total, count = 0.0, 0
    for n in range(N):
        for i in range(H):
            for j in range(W):
                if valid is not None and not valid[n, i, j]:
                    continue
                ps, pt = softmax(s[n, :, i, j] / T), softmax(t[n, :, i, j] / T)
                total += sum(pt[c] * math.log(pt[c] / ps[c]) for c in range(C))
                count += 1
    return T * T * total / count


def ref_channel_kl(s, t, tau, valid=None):
    """N x C KL of spatial softmaxes (positions outside ``valid`` left out)."""
    out = np.zeros((N, C))
    for n in range(N):
        keep = np.ones((H, W), bool) if valid is None else np.asarray(valid[n])
        if not keep.any():
            continue
        for c in range(C):
            ps, pt = softmax(s[n, c][keep] / tau), softmax(t[n, c][keep] / tau)
            out[n, c] = sum(pt[i] * math.log(pt[i] / ps[i]) for i in range(len(pt)))
    return out


def ref_cwd(s, t, tau, valid=None):
    return tau * tau * ref_channel_kl(s.double().numpy(), t.double().numpy(), tau, valid).sum() / (N * C)


def ref_hwd_weights(s, t, tau, beta, mu, sigma, correction, labels, variant="paper", eps=1e-8):
    s, t = s.double().numpy(), t.double().numpy()
    w = np.zeros((N, C))
    for n in range(N):
        cd = np.zeros(C)
        for c in range(C):
            if variant == "paper":  # the activation maps
                a, b = softmax(s[n, c].ravel() / tau), softmax(t[n, c].ravel() / tau)
            else:
                a, b = s[n, c].ravel(), t[n, c].ravel()
            cd[c] = np.mean((b - a) ** 2)
            if correction:
                cd[c] /= np.sum(labels[n].numpy() == c) + 1
        rel = cd / cd.mean()  # (the epsilon is relative to the divergences' scale)
        wn = mu + (rel - rel.mean()) / (rel.std(ddof=1) + eps) * sigma
        w[n] = C * softmax((1 - beta ** wn) / (1 - beta))
    return w


def ref_fakd_cwd(s, t, labels, wt, cov, lam, tau):
    s, t, wt = s.double().numpy(), t.double().numpy(), wt.double().numpy()
    total = 0.0
    for n in range(N):
        y = labels[n].numpy().ravel()
        for c in range(C):
            z, pt = s[n, c].ravel(), softmax(t[n, c].ravel() / tau)
            var = [quad(wt, cov, c, yi) if yi < C else 0.0 for yi in y]  # ignore pixels: no augmentation
            for i in range(H * W):
                inner = sum(math.exp((z[k] - z[i]) / tau + lam * (var[k] + var[i]) / (2 * tau * tau))
                            for k in range(H * W))
                total += pt[i] * (math.log(pt[i]) + math.log(inner))
    return tau * tau * total / (N * C)


def ref_fakd_pd(s, t, wt, cov, lam, T, valid=None):
    s, t, wt = s.double().numpy(), t.double().numpy(), wt.double().numpy()
    total, count = 0.0, 0
    for n in range(N):
        for i in range(H):
            for j in range(W):
                if valid is not None and not valid[n, i, j]:
                    continue
                z, pt = s[n, :, i, j], softmax(t[n, :, i, j] / T)
                for c in range(C):
                    sig = np.diag(cov[c]) if cov.ndim == 2 else cov[c]
                    inner = sum(
                        math.exp((z[k] - z[c]) / T + lam * (wt[k] - wt[c]) @ sig @ (wt[k] - wt[c]) / (2 * T * T))
                        for k in range(C)
                    )
                    total += pt[c] * (math.log(pt[c]) + math.log(inner))
                count += 1
    return T * T * total / count


# ---------------------------------------------------------------------------------------------
# PD, CWD, HWD
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("exclude_ignore", [False, True])
def test_pd_matches_brute_force(temperature, exclude_ignore):
    s, t, labels = case()
    valid = label_mask(labels, C) if exclude_ignore else None
    got = pd(temperature)(s, t, labels, valid)
    assert got.item() == pytest.approx(ref_pd(s, t, temperature, valid), rel=1e-5)
    assert pixel_kl(t, t, temperature).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("exclude_ignore", [False, True])
def test_cwd_matches_brute_force(tau, exclude_ignore):
    s, t, labels = case(1)
    valid = label_mask(labels, C) if exclude_ignore else None
    got = cwd(tau)(s, t, labels, valid)
    assert got.item() == pytest.approx(ref_cwd(s, t, tau, valid), rel=1e-5)


def test_cwd_skips_an_image_without_valid_pixels():
    s, t, labels = case(2)
    labels[0] = IGNORE
    valid = label_mask(labels, C)
    got = cwd_loss(s, t, 4.0, valid)
    assert torch.isfinite(got) and got.item() == pytest.approx(ref_cwd(s, t, 4.0, valid), rel=1e-5)
    s.requires_grad_(True)
    cwd_loss(s, t, 4.0, valid).backward()
    assert torch.isfinite(s.grad).all() and s.grad[0].abs().max() == 0


def test_class_pixel_counts_is_a_per_image_histogram():
    _, _, labels = case()
    expected = np.array([[np.sum(labels[n].numpy() == c) for c in range(C)] for n in range(N)])
    np.testing.assert_array_equal(class_pixel_counts(labels, C).numpy(), expected)


@pytest.mark.parametrize("mu,correction,variant", [(1.0, False, "paper"), (0.0, True, "paper"),
                                                      (1.0, False, "code")])
def test_hwd_weights_and_loss_match_brute_force(mu, correction, variant):
    s, t, labels = case(3)
    kw = dict(tau=4.0, beta=0.1, mu=mu, sigma=1.0)
    w = hwd_weights(s, t, **{**HWD, "temperature": 4.0, "mu": mu, "pixel_correction": correction,
                             "variant": variant}, labels=labels)
    ref_w = ref_hwd_weights(s, t, correction=correction, labels=labels, variant=variant, **kw)
    np.testing.assert_allclose(w.numpy(), ref_w, rtol=1e-5)
    np.testing.assert_allclose(w.sum(1).numpy(), [C] * N, rtol=1e-6)  # the weights sum to C per image
    loss = hwd(4.0, mu=mu, pixel_correction=correction, variant=variant)
    got = loss(s, t, labels)
    ref = 16.0 * (ref_w * ref_channel_kl(s.double().numpy(), t.double().numpy(), 4.0)).sum() / (N * C)
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_hwd_weights_do_not_depend_on_the_scale_of_the_divergences():
    s, t, _ = case(11)
    kw = {**HWD, "temperature": 4.0, "variant": "code"}
    big = hwd_weights(s, t, **kw)
    small = hwd_weights(s * 1e-4, t * 1e-4, **kw)  # divergences 1e-8 smaller
    torch.testing.assert_close(big, small, rtol=1e-5, atol=1e-6)
    same = hwd_weights(t, t, **HWD, temperature=4.0)  # no divergence at all: uniform weights
    torch.testing.assert_close(same, torch.ones_like(same))


def test_hwd_weights_carry_no_gradient_and_favour_diverging_channels():
    s, t, labels = case(4)
    g = torch.Generator().manual_seed(0)
    s = t + 0.3 * torch.randn(t.shape, generator=g)  # channels 1 and 3 close to the teacher,
    s[:, 2] = t[:, 2] + 5.0 * torch.randn(t[:, 2].shape, generator=g)  # channel 2 far from it,
    s[:, 0] = t[:, 0]  # channel 0 identical
    s.requires_grad_(True)
    w = hwd_weights(s, t, **HWD, temperature=4.0)
    assert not w.requires_grad
    assert (w[:, 2] > w[:, 1]).all() and (w[:, 0] < w[:, 1]).all()
    # equal weights (all 1) would be CWD: HWD differs from it exactly by the weighting
    value = hwd(4.0)(s, t, labels)
    assert not torch.allclose(value, cwd_loss(s, t, 4.0))


# ---------------------------------------------------------------------------------------------
# FAKD
# ---------------------------------------------------------------------------------------------
def fakd_case(seed=5, full=False):
    s, t, labels = case(seed)
    g = torch.Generator().manual_seed(seed + 100)
    weight = torch.randn(C, A, 1, 1, generator=g) * 0.7
    cov = np_cov(seed, full)
    return s, t, labels, weight, cov


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("lam,tau", [(0.7, 4.0), (1.0, 1.0)])
def test_fakd_cwd_matches_brute_force(full, lam, tau):
    s, t, labels, weight, cov = fakd_case(full=full)
    got = fakd_cwd_loss(s, t, labels, weight, torch.tensor(cov, dtype=torch.float32), lam, tau)
    ref = ref_fakd_cwd(s, t, labels, weight[:, :, 0, 0], cov, lam, tau)
    assert got.item() == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("lam,temperature,exclude_ignore", [(0.7, 1.0, False), (1.0, 2.0, True)])
def test_fakd_pd_matches_brute_force(full, lam, temperature, exclude_ignore):
    s, t, labels, weight, cov = fakd_case(6, full=full)
    valid = label_mask(labels, C) if exclude_ignore else None
    got = fakd_pd_loss(s, t, weight, torch.tensor(cov, dtype=torch.float32), lam, temperature, valid)
    ref = ref_fakd_pd(s, t, weight[:, :, 0, 0], cov, lam, temperature, valid)
    assert got.item() == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("full", [False, True])
def test_fakd_with_lambda_zero_is_cwd_and_pd_exactly(full):
    s, t, labels, weight, cov = fakd_case(7, full=full)
    est = ClassCovariance(C, A, full=full)
    est.cov.copy_(torch.tensor(cov))
    clf = torch.nn.Conv2d(A, C, 1)
    clf.weight.data.copy_(weight)
    for valid in (None, label_mask(labels, C)):
        cwd_value = cwd(4.0)(s, t, labels, valid)
        fakd_cwd = fakd(FeatureAugmentedCWD, 4.0)(s, t, labels, valid, classifier=clf, covariance=est, lam=0.0)
        assert torch.equal(cwd_value, fakd_cwd)
        pd_value = pd(1.5)(s, t, labels, valid)
        fakd_pd = fakd(FeatureAugmentedPD, 1.5)(s, t, labels, valid, classifier=clf, covariance=est, lam=0.0)
        assert torch.equal(pd_value, fakd_pd)
    # and the augmentation term is what makes the difference
    assert fakd(FeatureAugmentedCWD, 4.0)(s, t, labels, classifier=clf, covariance=est, lam=1.0) > cwd_value
    assert fakd(FeatureAugmentedPD, 1.5)(s, t, labels, classifier=clf, covariance=est, lam=1.0) > pd_value


def test_fakd_bounds_the_loss_of_sampled_feature_augmentations():
    """Eq. 5-8: the closed forms upper-bound the mean loss over Gaussian feature augmentations."""
    g = torch.Generator().manual_seed(8)
    feats = torch.randn(N, A, H, W, generator=g, dtype=torch.float64)
    weight = torch.randn(C, A, generator=g, dtype=torch.float64) * 0.5
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    t = torch.randn(N, C, H, W, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, C, (N, H, W), generator=g)
    cov = torch.tensor(np_cov(8, full=True), dtype=torch.float64)
    chol = torch.linalg.cholesky(cov)
    lam, tau, samples = 0.8, 2.0, 2000

    def logits(f):  # f: ... x A x H x W
        return torch.einsum("ca,...ahw->...chw", weight, f) + bias[:, None, None]

    eps = torch.randn(samples, N, H, W, A, generator=g, dtype=torch.float64) * math.sqrt(lam)
    z = logits(feats)
    # CWD-aug: each pixel augmented with the covariance of its labelled class; the mean over
    # the samples of CWD is CWD of the samples stacked as one batch (same N x C normaliser).
    noisy = feats + torch.einsum("nhwab,snhwb->snahw", chol[labels], eps)
    mc_cwd = cwd_loss(logits(noisy).flatten(0, 1), t.repeat(samples, 1, 1, 1), tau).item()
    bound_cwd = fakd_cwd_loss(z, t, labels, weight, cov, lam, tau).item()
    assert cwd_loss(z, t, tau).item() < mc_cwd <= bound_cwd
    # PD-aug: the term c of the teacher's distribution augmented with Sigma_c
    pt = torch.softmax(t, dim=1)
    ce = torch.stack([
        -torch.log_softmax(logits(feats + torch.einsum("ab,snhwb->snahw", chol[c], eps)), dim=2)[:, :, c].mean(0)
        for c in range(C)
    ], dim=1)  # N x C x H x W: expected cross-entropy of class c under its augmentation
    mc_pd = (pt * (torch.log(pt) + ce)).sum(1).mean().item()
    bound_pd = fakd_pd_loss(z, t, weight, cov, lam, 1.0).item()
    assert pixel_kl(z, t, 1.0).item() < mc_pd <= bound_pd


def test_fakd_gradients_reach_the_classifier_and_the_logits():
    s, t, labels, weight, cov = fakd_case(9)
    s.requires_grad_(True)
    weight.requires_grad_(True)
    cov = torch.tensor(cov, dtype=torch.float32)
    (fakd_cwd_loss(s, t, labels, weight, cov, 1.0, 4.0) + fakd_pd_loss(s, t, weight, cov, 1.0, 1.0)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def test_cosine_lambda_ramp():
    assert cosine_ramp(0, 100, 1.0) == 0.0
    assert cosine_ramp(50, 100, 2.0) == pytest.approx(1.0)
    assert cosine_ramp(100, 100, 2.0) == pytest.approx(2.0)
    assert cosine_ramp(150, 100, 2.0) == pytest.approx(2.0)
    assert cosine_ramp(25, 100, 1.0) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert cosine_ramp(3, 100, 0.5, "constant") == 0.5
    with pytest.raises(ValueError, match="schedule"):
        cosine_ramp(1, 2, 1.0, "linear")


@pytest.mark.parametrize("full", [False, True])
def test_covariance_estimator_equals_direct_computation_over_all_data_seen(full):
    g = torch.Generator().manual_seed(10)
    k, a = 5, 4
    est = ClassCovariance(k, a, full=full)
    all_x, all_y = [], []
    for step in range(4):  # batches of different sizes; class 4 never appears
        n, h, w = 2, 3 + step, 4
        feats = torch.randn(n, a, h, w, generator=g) * (1 + step) + step
        labels = torch.randint(0, 4, (n, h, w), generator=g)
        labels[0, 0] = IGNORE
        if step == 1:
            labels[labels == 2] = 3  # class 2 absent from one batch
        est.update(feats, labels)
        x = feats.permute(0, 2, 3, 1).reshape(-1, a).double()
        y = labels.reshape(-1)
        all_x.append(x[y != IGNORE])
        all_y.append(y[y != IGNORE])
    x, y = torch.cat(all_x), torch.cat(all_y)
    for c in range(k):
        xc = x[y == c]
        assert est.count[c].item() == len(xc)
        if len(xc) == 0:
            assert est.mean[c].abs().max() == 0 and est.cov[c].abs().max() == 0
            continue
        mean = xc.mean(0)
        centred = xc - mean
        cov = centred.T @ centred / len(xc)  # population covariance of everything seen
        np.testing.assert_allclose(est.mean[c].double().numpy(), mean.numpy(), rtol=1e-5, atol=1e-5)
        expected = cov if full else torch.diagonal(cov)
        np.testing.assert_allclose(est.cov[c].double().numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    diagonal = est.cov.diagonal(dim1=1, dim2=2) if full else est.cov
    np.testing.assert_allclose(est.diagonal().numpy(), diagonal.numpy())


def test_covariance_estimator_refuses_mismatched_inputs():
    est = ClassCovariance(3, 4)
    with pytest.raises(ValueError, match="4-channel"):
        est.update(torch.zeros(1, 5, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="resize"):
        est.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 4, dtype=torch.long))


def _covariance_batches(rank):
    g = torch.Generator().manual_seed(20 + rank)
    feats = torch.randn(2, 3, 4, 5, generator=g) + 2 * rank
    labels = torch.randint(0, 3, (2, 4, 5), generator=g)
    labels[rank, 0] = IGNORE
    return feats, labels


def _covariance_worker(rank, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for full in (False, True):
        est = ClassCovariance(3, 3, full=full, all_reduce=True)
        for _ in range(2):
            est.update(*_covariance_batches(rank))
        torch.save(est.state_dict(), os.path.join(out_dir, f"rank{rank}_{full}.pth"))
    dist.barrier()  # neither process tears its group down while the other still uses it
    dist.destroy_process_group()


def test_covariance_all_reduce_gives_every_process_the_global_estimate(tmp_path):
    torch.multiprocessing.spawn(_covariance_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    for full in (False, True):
        single = ClassCovariance(3, 3, full=full)  # one process seeing both processes' batches
        for _ in range(2):
            (f0, l0), (f1, l1) = _covariance_batches(0), _covariance_batches(1)
            single.update(torch.cat([f0, f1]), torch.cat([l0, l1]))
        for rank in range(2):
            state = torch.load(tmp_path / f"rank{rank}_{full}.pth")
            for k, v in single.state_dict().items():
                torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6)
