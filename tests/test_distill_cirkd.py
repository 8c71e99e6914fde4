"""CIRKD: the batch (pixel-to-pixel across images) term and the memory terms against numpy
loops, the memories' update rule against a direct computation (pointers, wrap-around, both
enqueue modes), gradients (projection and student, never the teacher). Two processes:
tests/test_distill_ddp.py."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detectron2.layers import ShapeSpec
from segdistill.modeling.distill.cirkd import (
    ClassMemory, CrossImageRelationalDistillation, batch_relation_loss, memory_relation_loss,
)

K, D = 3, 4



def normed(seed, n=3, c=D, h=3, w=2):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, c, h, w, generator=g, dtype=torch.float64), dim=1)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_batch(s, t, tau):
    s, t = s.numpy(), t.numpy()
    b, hw = s.shape[0], s.shape[2] * s.shape[3]
    total = 0.0
    for i in range(b):
        for j in range(b):
            fs_i, fs_j = s[i].reshape(s.shape[1], -1), s[j].reshape(s.shape[1], -1)
            ft_i, ft_j = t[i].reshape(t.shape[1], -1), t[j].reshape(t.shape[1], -1)
            kl = 0.0
            for p in range(hw):
                ps, pt = softmax(fs_i[:, p] @ fs_j / tau), softmax(ft_i[:, p] @ ft_j / tau)
                kl += np.sum(pt * np.log(pt / ps))
            total += kl / hw
    return total / (b * b)


def test_batch_term_matches_brute_force():
    s, t = normed(0), normed(1, c=5)  # different channel counts: only similarities meet
    got = batch_relation_loss(s, t, s, t, 0.1)
    assert got.item() == pytest.approx(ref_batch(s, t, 0.1), rel=1e-9)
    assert batch_relation_loss(t, t, t, t, 0.1).item() == pytest.approx(0.0, abs=1e-12)


def test_memory_term_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    s = F.normalize(torch.randn(7, D, generator=g, dtype=torch.float64), dim=1)
    t = F.normalize(torch.randn(7, D, generator=g, dtype=torch.float64), dim=1)
    x = F.normalize(torch.randn(9, D, generator=g, dtype=torch.float64), dim=1)
    got = memory_relation_loss(s, t, x, temperature=0.1, kd_temperature=2.0)
    ref = np.mean([np.sum(pt * np.log(pt / ps)) for ps, pt in
                   ((softmax(s[i].numpy() @ x.numpy().T / 0.1 / 2), softmax(t[i].numpy() @ x.numpy().T / 0.1 / 2))
                    for i in range(7))]) * 4
    assert got.item() == pytest.approx(ref, rel=1e-9)


def ref_update(pixel, pixel_ptr, region, region_ptr, keys, labels, gen, freq, mode):
    """The authors' rule, written out with explicit loops over images and classes. The draw: one
    random rank per pixel of the batch (``randperm`` of the step's generator); a class enqueues
    its ``min(n_k, freq)`` pixels of lowest rank ("paper"), or, as the authors' code indexes them,
    the image's pixels at those pixels' positions within the class ("code")."""
    n, d = keys.shape[:2]
    hw = labels[0].numel()
    rank = torch.randperm(n * hw, generator=gen).tolist()
    for b in range(n):
        feat = keys[b].reshape(d, -1)
        label = labels[b].reshape(-1)
        for k in sorted(set(label.tolist())):
            if not 0 <= k < K:
                continue
            idxs = [i for i in range(label.numel()) if label[i] == k]
            mean = feat[:, idxs].mean(dim=1)
            region[k, region_ptr[k]] = mean / mean.norm()
            region_ptr[k] = (region_ptr[k] + 1) % region.shape[1]
            count = min(len(idxs), freq)
            drawn = sorted(range(len(idxs)), key=lambda j: rank[b * hw + idxs[j]])[:count]
            chosen = [idxs[j] for j in drawn] if mode == "paper" else drawn
            values = np.stack([feat[:, i].numpy() / np.linalg.norm(feat[:, i].numpy()) for i in chosen])
            if pixel_ptr[k] + count >= pixel.shape[1]:
                pixel[k, pixel.shape[1] - count:] = values
                pixel_ptr[k] = 0
            else:
                pixel[k, pixel_ptr[k]:pixel_ptr[k] + count] = values
                pixel_ptr[k] += count


@pytest.mark.parametrize("mode", ["paper", "code"])
def test_memory_update_matches_a_direct_computation(mode):
    memory = ClassMemory(K, D, pixel_size=7, region_size=3, update_freq=2, variant=mode, seed=5).double()
    pixel, region = memory.pixel_queue.clone().numpy(), memory.region_queue.clone().numpy()
    pixel_ptr, region_ptr = [0] * K, [0] * K
    for step in range(5):  # enough steps for both pointers to wrap around
        keys = normed(10 + step, n=2)
        g = torch.Generator().manual_seed(20 + step)
        labels = torch.randint(0, K, (2, 3, 2), generator=g)
        labels[0, 0, 0] = -1
        if step == 1:
            labels[labels == 2] = 0  # class 2 absent from one step
        memory.update(keys, labels)
        gen = torch.Generator().manual_seed(5 * 1_000_003 + step)
        ref_update(pixel, pixel_ptr, region, region_ptr, keys, labels, gen, 2, mode)
        np.testing.assert_allclose(memory.pixel_queue.numpy(), pixel, rtol=1e-12)
        np.testing.assert_allclose(memory.region_queue.numpy(), region, rtol=1e-12)
        assert memory.pixel_ptr.tolist() == pixel_ptr and memory.region_ptr.tolist() == region_ptr
    assert int(memory.draws) == 5
    norms = memory.pixel_queue.norm(dim=2)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def bound_loss(**kw):
    torch.manual_seed(0)
    settings = dict(student_tap="head_features", teacher_tap="head_features", batch_weight=1.0,
                    pixel_memory_weight=0.1, region_memory_weight=0.1, temperature=0.1, kd_temperature=1.0,
                    pixel_memory_size=20, region_memory_size=6, pixel_contrast_size=1000, region_contrast_size=1000,
                    pixel_update_freq=4, gather=True, variant="paper", seed=0, norm="BN")
    loss = CrossImageRelationalDistillation(**{**settings, **kw})
    loss.bind({"head_features": ShapeSpec(channels=3, stride=8)}, {"head_features": ShapeSpec(channels=D, stride=8)},
              num_classes=K)
    return loss.double()


def test_memory_terms_use_the_whole_queue_and_train_the_projection_only():
    loss = bound_loss()
    assert set(dict(loss.named_buffers())) >= {"memory.pixel_queue", "memory.pixel_ptr", "memory.region_queue",
                                              "memory.region_ptr", "memory.draws"}
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, D, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, K, (2, 3, 2), generator=g)
    labels[1, 0] = -1
    s_proj = F.normalize(loss.projection(s), dim=1)
    pixel, region = loss.memory_terms(s_proj, F.normalize(t, dim=1), labels)
    # contrast sizes above the memory: every entry of every class, in a random order (which KL ignores)
    valid = (labels >= 0).flatten()
    sv = s_proj.permute(0, 2, 3, 1).reshape(-1, D)[valid]
    tv = F.normalize(t, dim=1).permute(0, 2, 3, 1).reshape(-1, D)[valid]
    for got, queue in ((pixel, loss.memory.pixel_queue), (region, loss.memory.region_queue)):
        ref = memory_relation_loss(sv, tv, queue.reshape(-1, D), temperature=0.1, kd_temperature=1.0)
        assert got.item() == pytest.approx(ref.item(), rel=1e-9)
    (pixel + region).backward()
    assert s.grad.abs().sum() > 0 and all(p.grad is not None for p in loss.projection.parameters())
    assert t.grad is None or t.grad.abs().sum() == 0  # the teacher's side is a target


@pytest.mark.parametrize("mode", ["paper", "code"])
def test_memory_update_writes_a_slot_several_times_in_one_step_as_sequential_writes(mode):
    # three images per step into a 1-entry region queue and a 3-entry pixel queue: every slot is
    # written by several (image, class) groups in one step; the last write must win
    memory = ClassMemory(K, D, pixel_size=3, region_size=1, update_freq=2, variant=mode, seed=1).double()
    pixel, region = memory.pixel_queue.clone().numpy(), memory.region_queue.clone().numpy()
    pixel_ptr, region_ptr = [0] * K, [0] * K
    for step in range(3):
        keys = normed(40 + step, n=3, h=4, w=3)
        labels = torch.randint(0, K, (3, 4, 3), generator=torch.Generator().manual_seed(50 + step))
        memory.update(keys, labels)
        ref_update(pixel, pixel_ptr, region, region_ptr, keys, labels,
                   torch.Generator().manual_seed(1 * 1_000_003 + step), 2, mode)
        np.testing.assert_allclose(memory.pixel_queue.numpy(), pixel, rtol=1e-12)
        np.testing.assert_allclose(memory.region_queue.numpy(), region, rtol=1e-12)
        assert memory.pixel_ptr.tolist() == pixel_ptr and memory.region_ptr.tolist() == region_ptr


def test_memory_pointers_follow_a_loaded_state():
    a = ClassMemory(K, D, pixel_size=7, region_size=3, update_freq=2, variant="paper", seed=5).double()
    b = ClassMemory(K, D, pixel_size=7, region_size=3, update_freq=2, variant="paper", seed=5).double()
    labels = torch.randint(0, K, (2, 3, 2), generator=torch.Generator().manual_seed(3))
    a.update(normed(1, n=2), labels)
    b.update(normed(2, n=2), labels)  # b's host pointers and draw counter are now in use...
    b.update(normed(3, n=2), labels)
    b.load_state_dict(a.state_dict())  # ...and must be those of the loaded state after this
    a.update(normed(4, n=2), labels)
    b.update(normed(4, n=2), labels)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0)
