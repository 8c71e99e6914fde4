"""IFVD: the intra-class feature variation maps and the loss against numpy loops (class
prototypes per image, ignore pixels, absent classes), the mean over valid pixels, and the
gradient against a naive autograd version."""
import numpy as np
import pytest
import torch

from segdistill.modeling.distill.ifvd import ifv_loss, variation_map

K = 4



def case(seed=0, n=2, cs=3, ct=5, h=4, w=5):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, cs, h, w, generator=g, dtype=torch.float64)
    t = torch.randn(n, ct, h, w, generator=g, dtype=torch.float64)
    labels = torch.randint(0, K - 1, (n, h, w), generator=g)  # class K-1 absent
    labels[0, 0, :2] = -1  # ignore pixels (the distiller's convention: outside [0, K))
    return s, t, labels


def ref_map(f, labels):
    f, labels = f.numpy(), labels.numpy()
    n, c, h, w = f.shape
    out = np.ones((n, h, w))
    for b in range(n):
        for i in range(h):
            for j in range(w):
                k = labels[b, i, j]
                if not 0 <= k < K:
                    continue  # an ignore pixel is its own prototype: cos = 1
                mask = labels[b] == k
                proto = f[b][:, mask].sum(axis=1) / (mask.sum() + 1e-6)
                v = f[b, :, i, j]
                out[b, i, j] = v @ proto / (np.linalg.norm(v) * np.linalg.norm(proto))
    return out


@pytest.mark.parametrize("exclude_ignore", [False, True])
def test_ifvd_matches_brute_force(exclude_ignore):
    s, t, labels = case()
    np.testing.assert_allclose(variation_map(s, labels, K).numpy(), ref_map(s, labels), rtol=1e-10)
    diff = (ref_map(s, labels) - ref_map(t, labels)) ** 2
    valid = (labels >= 0) if exclude_ignore else None
    expected = diff[labels.numpy() >= 0].mean() if exclude_ignore else diff.mean()
    assert ifv_loss(s, t, labels, K, valid).item() == pytest.approx(expected, rel=1e-10)
    assert ifv_loss(s, s, labels, K).item() == pytest.approx(0.0, abs=1e-14)


def naive_loss(s, t, labels):
    total = 0
    n, _, h, w = s.shape
    for b in range(n):
        for i in range(h):
            for j in range(w):
                k = int(labels[b, i, j])
                if k < 0:
                    continue
                mask = (labels[b] == k).to(s.dtype)
                ps = (s[b] * mask).sum((1, 2)) / (mask.sum() + 1e-6)
                pt = (t[b] * mask).sum((1, 2)) / (mask.sum() + 1e-6)
                ms = s[b, :, i, j] @ ps / (s[b, :, i, j].norm() * ps.norm())
                mt = t[b, :, i, j] @ pt / (t[b, :, i, j].norm() * pt.norm())
                total = total + (ms - mt) ** 2
    return total / (n * h * w)


def test_ifvd_gradient_matches_a_naive_implementation():
    _, t, labels = case(1)
    grads = []
    for fn in (lambda s: ifv_loss(s, t, labels, K), lambda s: naive_loss(s, t, labels)):
        s = case(1)[0].requires_grad_(True)
        fn(s).backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-12)
    assert grads[0].abs().sum() > 0
