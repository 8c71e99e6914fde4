"""SKD: the pair-wise term against numpy loops (pooling windows, cosine similarities, the
normalisation), its gradient against a naive autograd version, and the holistic term: its
values (WGAN-GP and hinge) against a direct computation, and the routing of its gradients
(the student's term trains the student only, the discriminator's trains D only, scaled by
LR_FACTOR)."""
import math

import numpy as np
import pytest
import torch

from segdistill.modeling.distill.skd import HolisticDistillation, pairwise_loss, skd_pool



def features(seed, n=2, c=3, h=5, w=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g, dtype=torch.float64)


def ref_pool(f, kh, kw):
    """Max over kh x kw windows, the last window of a row/column cut short (ceil mode)."""
    n, c, h, w = f.shape
    oh, ow = math.ceil(h / kh), math.ceil(w / kw)
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = f[:, :, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw].max(axis=(2, 3))
    return out


def ref_pairwise(s, t, kh, kw):
    s, t = ref_pool(s.numpy(), kh, kw), ref_pool(t.numpy(), kh, kw)
    n = s.shape[0]
    total = 0.0
    for b in range(n):
        fs, ft = s[b].reshape(s.shape[1], -1), t[b].reshape(t.shape[1], -1)
        m = fs.shape[1]
        acc = 0.0
        for i in range(m):
            for j in range(m):
                a_s = fs[:, i] @ fs[:, j] / (np.linalg.norm(fs[:, i]) * np.linalg.norm(fs[:, j]))
                a_t = ft[:, i] @ ft[:, j] / (np.linalg.norm(ft[:, i]) * np.linalg.norm(ft[:, j]))
                acc += (a_s - a_t) ** 2
        total += acc / m ** 2
    return total / n


@pytest.mark.parametrize("pool_scale,pool_kernel,kh,kw", [(0.5, 0, 2, 3), (0.5, 2, 2, 2), (1.0, 0, 5, 7)])
def test_pairwise_matches_brute_force(pool_scale, pool_kernel, kh, kw):
    s, t = features(0), features(1, c=4)  # different channel counts: only similarities meet
    np.testing.assert_allclose(skd_pool(s, pool_scale, pool_kernel).numpy(), ref_pool(s.numpy(), kh, kw))
    got = pairwise_loss(s, t, pool_scale=pool_scale, pool_kernel=pool_kernel, detach_norm=False)
    assert got.item() == pytest.approx(ref_pairwise(s, t, kh, kw), rel=1e-6)
    same = pairwise_loss(t, t, pool_scale=pool_scale, pool_kernel=pool_kernel, detach_norm=False)
    assert same.item() == pytest.approx(0.0, abs=1e-12)


def naive_pairwise(s, t, detach_norm):
    """Pair-wise term with explicit loops over node pairs (autograd through everything)."""
    s, t = skd_pool(s, 0.5, 0).flatten(2), skd_pool(t, 0.5, 0).flatten(2)
    total = 0
    for b in range(s.shape[0]):
        m = s.shape[2]
        for i in range(m):
            for j in range(m):
                ns, nt = s[b, :, i].norm() * s[b, :, j].norm(), t[b, :, i].norm() * t[b, :, j].norm()
                if detach_norm:
                    ns = ns.detach()
                total = total + (s[b, :, i] @ s[b, :, j] / ns - t[b, :, i] @ t[b, :, j] / nt) ** 2 / m ** 2
    return total / s.shape[0]


@pytest.mark.parametrize("detach_norm", [False, True])
def test_pairwise_gradient_matches_a_naive_implementation(detach_norm):
    t = features(3, c=4)
    grads = []
    for fn in (lambda s: pairwise_loss(s, t, pool_scale=0.5, pool_kernel=0, detach_norm=detach_norm),
               lambda s: naive_pairwise(s, t, detach_norm)):
        s = features(2).requires_grad_(True)
        fn(s).backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-9)
    assert grads[0].abs().sum() > 0


def holistic(loss_type="wgan-gp", conditional=True, lr_factor=0.04):
    torch.manual_seed(0)
    return HolisticDistillation(3, g_weight=0.1, d_weight=0.2, loss_type=loss_type, gp_weight=10.0,
                                lr_factor=lr_factor, conditional=conditional, conv_dim=4).double()


def maps(seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    images = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    return s, t, images


@pytest.mark.parametrize("loss_type", ["wgan-gp", "hinge"])
@pytest.mark.parametrize("conditional", [True, False])
def test_holistic_values_match_a_direct_computation(loss_type, conditional):
    h = holistic(loss_type, conditional).eval()  # eval: no spectral-norm / BN state moves between calls
    s, t, images = maps(4)
    assert h.discriminator.body[0].in_channels == 3 + (3 if conditional else 0)
    torch.manual_seed(7)
    got = h(s, t, images)
    # by hand: D on [logits, image at the logits' size (area)]
    img = torch.nn.functional.avg_pool2d(images, 8) if conditional else None
    x = (lambda z: torch.cat([z, img], 1)) if conditional else (lambda z: z)
    d = h.discriminator
    assert got["student"].item() == pytest.approx(-0.1 * d(x(s)).mean().item(), rel=1e-9)
    torch.manual_seed(7)
    if loss_type == "hinge":
        expected = torch.relu(1 - d(x(t))).mean() + torch.relu(1 + d(x(s))).mean()
    else:
        alpha = torch.rand(2, 1, 1, 1, dtype=torch.float64)
        mixed = (alpha * x(t) + (1 - alpha) * x(s)).requires_grad_(True)
        grad, = torch.autograd.grad(d(mixed).sum(), mixed)
        gp = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
        expected = d(x(s)).mean() - d(x(t)).mean() + 10.0 * gp
    assert got["discriminator"].item() == pytest.approx(0.2 * expected.item(), rel=1e-9)


def test_holistic_gradients_train_the_student_and_the_discriminator_apart():
    s, t, images = maps(5)
    params = lambda h: list(h.discriminator.parameters())  # noqa: E731
    # the student's term: gradient to the logits, none to D
    h = holistic().eval()
    s1 = s.clone().requires_grad_(True)
    h(s1, t, images)["student"].backward()
    assert s1.grad.abs().sum() > 0 and all(p.grad is None for p in params(h))
    # the discriminator's term: none to the logits, lr_factor x the unscaled gradient to D
    grads = {}
    for factor in (1.0, 0.04):
        h = holistic(lr_factor=factor).eval()
        s2 = s.clone().requires_grad_(True)
        torch.manual_seed(3)
        h(s2, t, images)["discriminator"].backward()
        assert s2.grad is None
        grads[factor] = [p.grad.clone() for p in params(h)]
    assert grads[1.0][0].abs().sum() > 0  # (attention's query/key/value get none while its gamma is 0)
    for a, b in zip(grads[1.0], grads[0.04]):
        torch.testing.assert_close(b, 0.04 * a)
