"""AT: the attention maps and both forms of the loss against numpy, several taps summed, and
the gradient against a naive version."""
import numpy as np
import pytest
import torch

from segdistill.modeling.distill.at import AttentionTransfer, at_loss, attention_map


def case(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64),
            torch.randn(2, 6, 4, 5, generator=g, dtype=torch.float64))


def ref_q(f, p):
    a = (np.abs(f.numpy()) ** p).mean(axis=1).reshape(f.shape[0], -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_at_matches_brute_force(p):
    s, t = case()
    np.testing.assert_allclose(attention_map(s, p).numpy(), ref_q(s, p), rtol=1e-12)
    d = ref_q(s, p) - ref_q(t, p)
    assert at_loss(s, t, p=p, variant="code").item() == pytest.approx((d ** 2).mean(), rel=1e-12)
    assert at_loss(s, t, p=p, variant="paper").item() == pytest.approx(
        np.mean([0.5 * np.linalg.norm(d[n]) for n in range(2)]), rel=1e-12)
    # scale of a feature map does not matter (normalised maps)
    assert at_loss(3 * s, t, p=p, variant="code").item() == pytest.approx((d ** 2).mean(), rel=1e-10)


def test_at_sums_its_taps_and_its_gradient_matches():
    s, t = case(1)
    loss = AttentionTransfer(loss_weight=1.0, student_tap=["res4", "res5"], teacher_tap=["res4", "res5"], p=2.0,
                             variant="code")
    assert [tuple(pair) for pair in loss.taps] == [("res4", "res4"), ("res5", "res5")]
    s.requires_grad_(True)
    at_loss(s, t, p=2.0, variant="code").backward()
    s2 = case(1)[0].requires_grad_(True)
    a_s = (s2 ** 2).mean(1).flatten(1)
    a_t = (t ** 2).mean(1).flatten(1)
    ((a_s / a_s.norm(dim=1, keepdim=True) - a_t / a_t.norm(dim=1, keepdim=True)) ** 2).mean().backward()
    torch.testing.assert_close(s.grad, s2.grad)
