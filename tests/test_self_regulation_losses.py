"""Self-Regulation / deep-supervision losses against brute-force (loop / numpy) references."""
import math

import numpy as np
import pytest
import torch

from detectron2.config import get_cfg
from segdistill import add_segdistill_config
from segdistill.modeling.exits import DeepSupervisionObjective, ExitOutput, MultiExitOutputs
from segdistill.modeling.exits.self_regulation import (
    SelfRegulationObjective, anneal_temperature, class_presence, multilabel_bce, seg_cross_entropy, sr_f_code_loss,
    sr_f_loss, sr_l_code_loss, sr_l_loss, teacher_spread, tempered_soft_ce,
)

IGN = 255


def sr_objective(**overrides):
    """SelfRegulationObjective with its defaults (its add_config, the one source of them) and ``overrides``."""
    cfg = get_cfg()
    add_segdistill_config(cfg)
    return SelfRegulationObjective(**{**SelfRegulationObjective.from_config(cfg), **overrides})


def np_softmax(x, tau=1.0):
    e = np.exp((x - x.max()) / tau)
    return e / e.sum()


def labels(n=2, h=6, w=5, k=4, seed=0, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, k, (n, h, w), generator=g)
    t[torch.rand(n, h, w, generator=g) < ignore_frac] = IGN
    return t


# ------------------------------------------------------------------ MEA
def test_class_presence_ignores_ignore_pixels():
    t = labels(3, 5, 5, 6, ignore_frac=0.5)
    t[1] = IGN
    t[1, 0, 0] = 2  # image 1: only class 2 (and ignore)
    ref = np.zeros((3, 6), np.float32)
    for n in range(3):
        for v in t[n].flatten().tolist():
            if v != IGN:
                ref[n, v] = 1
    assert np.array_equal(class_presence(t, 6, IGN).numpy(), ref)
    assert class_presence(t, 6, IGN)[1].tolist() == [0, 0, 1, 0, 0, 0]
    with pytest.raises(ValueError, match=r"neither a class in \[0, 6\)"):
        class_presence(torch.full((1, 2, 2), 7), 6, IGN)


def test_multilabel_bce_brute_force():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 5, generator=g)
    y = (torch.rand(3, 5, generator=g) > 0.5).float()
    ref = 0.0
    for n in range(3):
        for k in range(5):
            p = 1 / (1 + math.exp(-z[n, k].item()))
            ref -= y[n, k].item() * math.log(p) + (1 - y[n, k].item()) * math.log(1 - p)
    assert multilabel_bce(z, y).item() == pytest.approx(ref / 15, rel=1e-5)


def test_seg_cross_entropy_brute_force_with_ignore():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 6, 5, generator=g)
    t = labels(2, 6, 5, 4, seed=3)
    total, count = 0.0, 0
    for n in range(2):
        for i in range(6):
            for j in range(5):
                v = t[n, i, j].item()
                if v == IGN:
                    continue
                p = np_softmax(logits[n, :, i, j].numpy().astype(np.float64))
                total -= math.log(p[v])
                count += 1
    assert seg_cross_entropy(logits, t, IGN).item() == pytest.approx(total / count, rel=1e-5)
    # logits at a coarser stride are upsampled to the labels (bilinear), as the head does
    small = torch.randn(2, 4, 3, 3, generator=g)
    up = torch.nn.functional.interpolate(small, size=(6, 5), mode="bilinear", align_corners=False)
    assert torch.allclose(seg_cross_entropy(small, t, IGN), seg_cross_entropy(up, t, IGN))
    # an all-ignore batch is 0, not NaN, and keeps a graph
    logits.requires_grad_(True)
    z = seg_cross_entropy(logits, torch.full((2, 6, 5), IGN), IGN)
    assert z.item() == 0.0 and z.requires_grad


# ------------------------------------------------------------------ SR-F / SR-L (paper, Eq. 1-4)
def brute_tempered_ce(t, s, tau):
    """Eq. 2 literally: sigma(t)^(1/tau) and sigma(s)^(1/tau), renormalised over channels."""
    t, s = t.double().numpy(), s.double().numpy()
    if t.ndim == 2:  # N x K logits: positions are images
        t, s = t[:, :, None, None], s[:, :, None, None]
    n, c, h, w = t.shape
    total = 0.0
    for a in range(n):
        for i in range(h):
            for j in range(w):
                pt = np_softmax(t[a, :, i, j]) ** (1 / tau)
                pt /= pt.sum()
                ps = np_softmax(s[a, :, i, j]) ** (1 / tau)
                ps /= ps.sum()
                total -= (pt * np.log(ps)).sum()
    return tau ** 2 * total / (n * h * w)


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_tempered_soft_ce_matches_eq2(tau):
    g = torch.Generator().manual_seed(4)
    t, s = torch.randn(2, 7, 3, 4, generator=g) * 3, torch.randn(2, 7, 3, 4, generator=g) * 3
    assert tempered_soft_ce(t, s, tau).item() == pytest.approx(brute_tempered_ce(t, s, tau), rel=1e-5)
    zl, sl = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    assert tempered_soft_ce(zl, sl, tau).item() == pytest.approx(brute_tempered_ce(zl, sl, tau), rel=1e-5)


def test_sr_f_and_sr_l_sum_over_students():
    g = torch.Generator().manual_seed(5)
    teacher = torch.randn(2, 6, 4, 4, generator=g)
    students = [torch.randn(2, 6, 4, 4, generator=g) for _ in range(3)]
    ref = sum(brute_tempered_ce(teacher, s, 1.7) for s in students)
    assert sr_f_loss(teacher, students, 1.7).item() == pytest.approx(ref, rel=1e-5)
    zt = torch.randn(2, 5, generator=g)
    zs = [torch.randn(2, 5, generator=g) for _ in range(2)]
    ref = sum(brute_tempered_ce(zt, z, 1.3) for z in zs)
    assert sr_l_loss(zt, zs, 1.3).item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("detach", [True, False])
def test_teacher_gets_no_gradient_when_detached(detach):
    g = torch.Generator().manual_seed(6)
    for shape in [(2, 6, 4, 4), (2, 5)]:
        t = torch.randn(*shape, generator=g).requires_grad_(True)
        s = torch.randn(*shape, generator=g).requires_grad_(True)
        (sr_f_loss if len(shape) == 4 else sr_l_loss)(t, [s], 2.0, detach_teacher=detach).backward()
        assert s.grad is not None and s.grad.abs().sum() > 0
        if detach:
            assert t.grad is None
        else:
            assert t.grad is not None and t.grad.abs().sum() > 0
    t = torch.randn(2, 5, generator=g).requires_grad_(True)
    s = torch.randn(2, 5, generator=g).requires_grad_(True)
    sr_l_code_loss(t, [s], detach_teacher=detach).backward()
    assert (t.grad is None) == detach


# ------------------------------------------------------------------ the authors' code variant
def test_code_variant_sr_f_is_ce_towards_teacher_argmax():
    g = torch.Generator().manual_seed(7)
    teacher = torch.randn(2, 4, 3, 3, generator=g)
    students = [torch.randn(2, 4, 3, 3, generator=g) for _ in range(2)]
    ref = 0.0
    for s in students:
        tot = 0.0
        for n in range(2):
            for i in range(3):
                for j in range(3):
                    lab = int(np.argmax(teacher[n, :, i, j].numpy()))
                    tot -= math.log(np_softmax(s[n, :, i, j].double().numpy())[lab])
        ref += tot / 18
    assert sr_f_code_loss(teacher, students).item() == pytest.approx(ref, rel=1e-5)


def test_code_variant_sr_l_is_bce_towards_teacher_sigmoid():
    g = torch.Generator().manual_seed(8)
    zt, zs = torch.randn(2, 5, generator=g), [torch.randn(2, 5, generator=g)]
    pt, ps = 1 / (1 + np.exp(-zt.double().numpy())), 1 / (1 + np.exp(-zs[0].double().numpy()))
    ref = -(pt * np.log(ps) + (1 - pt) * np.log(1 - ps)).mean()
    assert sr_l_code_loss(zt, zs).item() == pytest.approx(ref, rel=1e-5)


# ------------------------------------------------------------------ adaptive temperature
def test_annealing_rule():
    g = torch.Generator().manual_seed(9)
    feats = torch.randn(3, 4, 2, 2, generator=g) * 0.3
    feats[1, 2, 0, 0] = 6.0  # image 1 has a dominant channel at one pixel
    for tau in (1.0, 3.0):
        ref = []
        for n in range(3):
            p = np.stack([np_softmax(feats[n, :, i, j].double().numpy(), tau) for i in range(2) for j in range(2)])
            ref.append(p.max() - p.min())
        assert np.allclose(teacher_spread(feats, tau).numpy(), ref, atol=1e-6)
    spread = teacher_spread(feats, 1.0)
    assert spread[1] > 0.5 and (spread[[0, 2]] < 0.5).all()
    assert anneal_temperature(1.0, spread) == pytest.approx(1.05)
    assert anneal_temperature(1.0, spread[[0, 2]]) == 1.0
    # the objective keeps multiplying by 1.05 until no teacher map spreads more than 0.5
    obj = sr_objective()
    taus = []
    for _ in range(200):
        obj.update_temperature(feats, float(obj.temperature))
        taus.append(float(obj.temperature))
    assert taus[0] == pytest.approx(1.05)
    k = taus.index(taus[-1])
    assert all(b == pytest.approx(a * 1.05) for a, b in zip(taus[:k], taus[1:k + 1]))
    assert (teacher_spread(feats, taus[-1]) <= 0.5).all()
    assert (teacher_spread(feats, taus[-1] / 1.05) > 0.5).any()


# ------------------------------------------------------------------ objectives on named outputs
def fake_outputs(n=2, k=4, c=6, h=3, w=3, seed=10, grad=False):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g).requires_grad_(grad)

    exits = {name: ExitOutput(r(n, c, h, w), r(n, k, h, w), r(n, k), 8) for name in ("a", "b", "c")}
    final = ExitOutput(r(n, 5, h, w), r(n, k, h, w), r(n, k), 8)
    return MultiExitOutputs(exits=exits, final=final, image_size=(12, 12))


def test_sr_objective_combines_the_terms_with_the_paper_weights():
    out = fake_outputs()
    t = labels(2, 12, 12, 4, seed=11)
    obj = sr_objective(temperature=2.0, anneal_factor=1.0)
    losses = obj(out, t)
    assert set(losses) == {"loss_mea_cls", "loss_mea_seg", "loss_sr_f", "loss_sr_l"}
    pres = class_presence(t, 4, IGN)
    ex = list(out.exits.values())
    cls = sum(multilabel_bce(e.cls_logits, pres) for e in ex) + multilabel_bce(out.final.cls_logits, pres)
    seg = sum(seg_cross_entropy(e.seg_logits, t, IGN) for e in ex)
    srf = sum(brute_tempered_ce(ex[0].features, e.features, 2.0) for e in ex[1:])
    srl = sum(brute_tempered_ce(out.final.cls_logits, e.cls_logits, 2.0) for e in ex)
    assert losses["loss_mea_cls"].item() == pytest.approx(0.2 * cls.item(), rel=1e-5)
    assert losses["loss_mea_seg"].item() == pytest.approx(0.8 * seg.item(), rel=1e-5)
    assert losses["loss_sr_f"].item() == pytest.approx(srf, rel=1e-5)
    assert losses["loss_sr_l"].item() == pytest.approx(srl, rel=1e-5)
    code = sr_objective(variant="code", f_weight=0.5)(out, t)
    ref_f = sr_f_code_loss(ex[0].seg_logits, [e.seg_logits for e in ex[1:]] + [out.final.seg_logits])
    assert code["loss_sr_f"].item() == pytest.approx(0.5 * ref_f.item(), rel=1e-6)
    # weights 0 drop the terms
    assert set(sr_objective(f_weight=0, l_weight=0)(out, t)) == {"loss_mea_cls", "loss_mea_seg"}


def test_warmup_runs_mea_only_then_sr():
    out = fake_outputs()
    t = labels(2, 12, 12, 4, seed=12)
    obj = sr_objective(warmup_iters=5, anneal_threshold=0.0).train()
    obj.set_training_progress(4, 100)
    losses = obj(out, t)
    assert losses["loss_sr_f"].item() == 0 and losses["loss_sr_l"].item() == 0 and losses["loss_mea_seg"] > 0
    assert float(obj.temperature) == 1.0  # no annealing while SR is off
    obj.set_training_progress(5, 100)
    losses = obj(out, t)
    assert losses["loss_sr_f"].item() > 0 and losses["loss_sr_l"].item() > 0
    assert float(obj.temperature) == pytest.approx(1.05)


def test_ds_objective_and_per_exit_targets():
    out = fake_outputs(k=3)
    t = labels(2, 12, 12, 5, seed=13)
    lut = torch.tensor([0, 0, 1, 2, 2])  # 5 dataset classes -> 3 exit classes
    obj = DeepSupervisionObjective(weight=0.7, ignore_value=IGN)
    obj.label_luts = {"a": lut, "b": lut, "c": lut}
    mapped = obj.exit_targets("a", t)
    ref = t.clone()
    for idx in np.ndindex(*t.shape):
        if t[idx] != IGN:
            ref[idx] = lut[t[idx]]
    assert torch.equal(mapped, ref) and torch.equal(mapped == IGN, t == IGN)
    total = sum(seg_cross_entropy(e.seg_logits, ref, IGN) for e in out.exits.values())
    assert obj(out, t)["loss_ds"].item() == pytest.approx(0.7 * total.item(), rel=1e-6)
