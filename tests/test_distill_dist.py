"""DIST: the inter- and intra-class Pearson relations against numpy (np.corrcoef per pixel and
per class), the temperature and input variants, and the gradient against a naive version."""
import numpy as np
import pytest
import torch

from segdistill.modeling.distill.dist import dist_loss


def case(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64) * 2,
            torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64) * 2)


def softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def ref_dist(s, t, beta, gamma, temperature, probabilities=True):
    s = s.numpy().transpose(0, 2, 3, 1).reshape(-1, s.shape[1])
    t = t.numpy().transpose(0, 2, 3, 1).reshape(-1, t.shape[1])
    if probabilities:
        s, t = softmax(s / temperature, 1), softmax(t / temperature, 1)
    inter = 1 - np.mean([np.corrcoef(s[p], t[p])[0, 1] for p in range(s.shape[0])])
    intra = 1 - np.mean([np.corrcoef(s[:, k], t[:, k])[0, 1] for k in range(s.shape[1])])
    return temperature ** 2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize("beta,gamma,temperature,variant", [(1.0, 1.0, 1.0, "paper"),
                                                           (0.5, 2.0, 4.0, "paper"),
                                                           (1.0, 1.0, 1.0, "hwd")])
def test_dist_matches_brute_force(beta, gamma, temperature, variant):
    s, t = case()
    got = dist_loss(s, t, inter_weight=beta, intra_weight=gamma, temperature=temperature, variant=variant)
    assert got.item() == pytest.approx(ref_dist(s, t, beta, gamma, temperature, variant == "paper"), rel=1e-6)
    assert dist_loss(t, t, inter_weight=1.0, intra_weight=1.0, temperature=1.0).item() == pytest.approx(0.0, abs=1e-7)
    # Pearson is shift and scale invariant per pixel: raw logits shifted per pixel give the same inter term
    shifted = s + torch.randn(2, 1, 3, 4, dtype=torch.float64)
    if variant == "paper":  # softmax is shift invariant per pixel
        again = dist_loss(shifted, t, inter_weight=beta, intra_weight=gamma, temperature=temperature)
        assert again.item() == pytest.approx(got.item())


def naive(s, t):
    k = s.shape[1]
    s = torch.softmax(s.permute(0, 2, 3, 1).reshape(-1, k), 1)
    t = torch.softmax(t.permute(0, 2, 3, 1).reshape(-1, k), 1)

    def rho(a, b):
        a, b = a - a.mean(), b - b.mean()
        return (a * b).sum() / (a.norm() * b.norm() + 1e-8)

    inter = 1 - sum(rho(s[p], t[p]) for p in range(s.shape[0])) / s.shape[0]
    intra = 1 - sum(rho(s[:, c], t[:, c]) for c in range(k)) / k
    return inter + intra


def test_dist_gradient_matches_a_naive_implementation():
    _, t = case(1)
    grads = []
    for fn in (lambda s: dist_loss(s, t, inter_weight=1.0, intra_weight=1.0, temperature=1.0), lambda s: naive(s, t)):
        s = case(1)[0].requires_grad_(True)
        fn(s).backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0
