"""MGD: the seeded mask (its rule, its ratio, its reproducibility), the loss against a direct
computation with that mask, and gradients into the aligner, the generator and the student."""
import pytest
import torch

from detectron2.layers import ShapeSpec
from segdistill.modeling.distill.mgd import MaskedGenerativeDistillation, mgd_mask


def test_mask_is_seeded_and_follows_the_authors_rule():
    a = mgd_mask(4, 16, 16, 0.75, generator=torch.Generator().manual_seed(3))
    b = mgd_mask(4, 16, 16, 0.75, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (4, 1, 16, 16)
    r = torch.rand((4, 1, 16, 16), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, torch.where(r > 1 - 0.75, 0.0, 1.0))  # 0 where rand > 1 - ratio (yzd-v/MGD)
    assert abs(1 - a.mean().item() - 0.75) < 0.05  # about 75 % masked out of 1024 positions
    c = mgd_mask(4, 16, 16, 0.75, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(a, c)
    assert mgd_mask(1, 3, 3, 0.0, generator=torch.Generator()).min() == 1


def test_mgd_matches_a_direct_computation():
    torch.manual_seed(0)
    loss = MaskedGenerativeDistillation(loss_weight=2e-5, mask_ratio=0.5, student_tap="res5", teacher_tap="res5",
                                        connector="conv1x1_bias")
    loss.bind({"res5": ShapeSpec(channels=3, stride=8)}, {"res5": ShapeSpec(channels=4, stride=8)}, num_classes=2)
    loss.double()
    assert loss.align.bias is not None  # the authors' align conv has a bias
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)
    got = loss(s, t, generator=torch.Generator().manual_seed(9))
    mask = mgd_mask(2, 5, 6, 0.5, generator=torch.Generator().manual_seed(9)).double()
    with torch.no_grad():
        aligned = torch.nn.functional.conv2d(s, loss.align.weight, loss.align.bias)
        gen = loss.generation(aligned * mask)
    expected = ((gen.numpy() - t.numpy()) ** 2).sum() / 2
    assert got.item() == pytest.approx(expected, rel=1e-12)
    got.backward()
    assert s.grad.abs().sum() > 0 and loss.align.weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in loss.generation.parameters())
    # masked positions give the student no gradient through the mask
    masked = mask[:, 0] == 0
    assert s.grad.permute(0, 2, 3, 1)[masked].abs().max() == 0
    # same channel counts: no aligner (the authors build it only when they differ)
    same = MaskedGenerativeDistillation(loss_weight=1.0, mask_ratio=0.5, student_tap="res5", teacher_tap="res5",
                                        connector="conv1x1_bias")
    same.bind({"res5": ShapeSpec(channels=4)}, {"res5": ShapeSpec(channels=4)}, num_classes=2)
    assert isinstance(same.align, torch.nn.Identity)
