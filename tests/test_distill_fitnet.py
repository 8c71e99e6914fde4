"""FitNet: the connector maps the student's channels to the teacher's, the loss is the MSE
against numpy, gradients reach the connector and the student, and channel counts that differ
without a connector are a clear error."""
import numpy as np
import pytest
import torch

from detectron2.layers import ShapeSpec
from segdistill.modeling.distill.fitnet import HintDistillation


def bound(connector="conv1x1", cs=3, ct=5):
    torch.manual_seed(0)
    loss = HintDistillation(loss_weight=10.0, student_tap="head_features", teacher_tap="head_features",
                            connector=connector, norm="BN")
    loss.bind({"head_features": ShapeSpec(channels=cs, stride=8)}, {"head_features": ShapeSpec(channels=ct, stride=8)},
              num_classes=4)
    return loss.double()


def test_fitnet_matches_brute_force_and_trains_its_connector():
    loss = bound()
    w = loss.connector.weight.detach()[:, :, 0, 0].numpy()
    assert loss.connector.bias is None  # CIRKD's 1x1 conv without bias
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64)
    got = loss(s, t)
    mapped = np.einsum("oc,nchw->nohw", w, s.detach().numpy())
    assert got.item() == pytest.approx(((mapped - t.numpy()) ** 2).mean(), rel=1e-12)
    got.backward()
    assert s.grad.abs().sum() > 0 and loss.connector.weight.grad.abs().sum() > 0


def test_mismatched_channels_without_a_connector_are_an_error():
    with pytest.raises(ValueError, match="3 channels and the teacher tap 5; without a connector they must match"):
        bound("none")
    assert isinstance(bound("none", 5, 5).connector, torch.nn.Identity)
    with pytest.raises(ValueError, match="CONNECTOR must be one of"):
        HintDistillation(loss_weight=1.0, student_tap="a", teacher_tap="b", connector="mlp", norm="BN")
