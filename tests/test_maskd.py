"""MasKD: the masks, the distillation term and the two token-learning terms against loops over
their formulas (values and gradients), the tokens file (written, read with weights_only, the
authors' format, refusals naming the command), the deployed student (exactly the plain
student's parameters), and the two stages end to end: tools/maskd_tokens.py on the YAML demo
config, then two iterations of train_net.py (with --resume) and of the lazy twin."""
import itertools
import math
import os

import numpy as np
import pytest
import torch

from conftest import REPO, LAZY_TINY, load_script, random_batch, assert_deploys_as_the_plain_student, distill_run_opts
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from segdistill import add_segdistill_config
from segdistill.modeling.distill import distill_losses_from_names
from segdistill.modeling.distill.maskd import (
    MaskedDistillation, initial_tokens, learn_receptive_tokens, load_receptive_tokens, mask_diversity, maskd_loss,
    receptive_masks, save_receptive_tokens, token_learning_loss,
)
from test_distill_taps import K, distill_cfg

SETTINGS = dict(student_tap="logits", teacher_tap="logits", weight=0.5, num_tokens=3, tokens_file="", eps=1e-5,
                seed=0, allow_random_tokens=True)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def ref_masks(tokens, logits):
    """M[n][i][y][x] = sigmoid(sum_k t_ik z_nkyx), one pixel at a time (floats)."""
    n, k, h, w = logits.shape
    return np.array([[[[sigmoid(sum(float(tokens[i, c]) * float(logits[b, c, y, x]) for c in range(k)))
                        for x in range(w)] for y in range(h)] for i in range(tokens.shape[0])] for b in range(n)])


def ref_maskd(s, t, m, eps):
    """L_maskd with explicit loops (torch scalars for s, so autograd gives the reference gradient)."""
    n, k, h, w = s.shape
    total = 0.0
    for b, i, c in itertools.product(range(n), range(m.shape[1]), range(k)):
        area = sum(float(m[b, i, y, x]) for y in range(h) for x in range(w))
        num = sum((float(m[b, i, y, x]) * (s[b, c, y, x] - float(t[b, c, y, x]))) ** 2
                  for y in range(h) for x in range(w))
        total = total + num / (area + eps)
    return total / (n * m.shape[1] * k)


def ref_dice(m):
    """L_dice: every ordered pair of distinct masks of every image."""
    n, tt = m.shape[:2]
    total, pairs = 0.0, 0
    for b, i, j in itertools.product(range(n), range(tt), range(tt)):
        if i == j:
            continue
        a, c = m[b, i].flatten(), m[b, j].flatten()
        total = total + 2 * (a * c).sum() / ((a * a).sum() + 1e-12 + (c * c).sum() + 1e-12)
        pairs += 1
    return total / pairs


def test_masks_and_the_distillation_term_and_its_gradient_match_the_formula():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 4, generator=g, dtype=torch.float64)
    s = torch.randn(2, 4, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    masks = receptive_masks(tokens, t.detach())
    np.testing.assert_allclose(masks.numpy(), ref_masks(tokens, t.detach()), rtol=1e-12)
    got = maskd_loss(s, t, masks, 1e-5)
    s_ref = s.detach().clone().requires_grad_(True)
    ref = ref_maskd(s_ref, t.detach(), masks, 1e-5)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    got.backward()
    ref.backward()
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-10, atol=1e-14)
    assert t.grad is None or t.grad.abs().sum() == 0  # the teacher's side is a target
    # EPS enters the normaliser; equal logits teach nothing
    assert maskd_loss(s, t, masks, 1.0).item() == pytest.approx(ref_maskd(s_ref, t.detach(), masks, 1.0).item())
    assert maskd_loss(t.detach(), t.detach(), masks).item() == 0


def test_the_bound_loss_weights_the_term_and_masks_ignore_pixels():
    loss = MaskedDistillation(**SETTINGS)
    loss.bind({"logits": ShapeSpec(channels=4)}, {"logits": ShapeSpec(channels=4)}, num_classes=4)
    torch.testing.assert_close(loss.tokens, initial_tokens(3, 4, 0))  # a random teacher: the authors' init, seeded
    assert loss.tokens.abs().max() < 0.1 and not list(loss.parameters())  # fixed tokens: nothing to optimise
    loss = loss.double()
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, 3, generator=g,
                                                                                  dtype=torch.float64)
    valid = torch.rand(2, 3, 3, generator=g) > 0.3
    m = receptive_masks(loss.tokens, t) * valid[:, None]
    assert loss(s, t, valid).item() == pytest.approx(ref_maskd(s, t, m, 1e-5).item(), rel=1e-12)
    assert loss(s, t).item() == pytest.approx(ref_maskd(s, t, receptive_masks(loss.tokens, t), 1e-5).item(), rel=1e-12)

    class Batch:
        def pair(self, _):
            return s, t

        def valid(self, _):
            return None

    assert loss.distill(Batch())["loss_maskd"].item() == pytest.approx(0.5 * loss(s, t).item(), rel=1e-14)


def test_the_token_learning_terms_and_their_gradient_match_the_formulas():
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(2, 4, 2, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 2, 3), generator=g)
    labels[0, 1, 2] = 255  # ignored
    ce, dice = token_learning_loss(tokens, logits, labels, ignore_value=255)
    # reference: the masked sum, then CE pixel by pixel (labels at the logits' size: the upsampling is the identity)
    t_ref = tokens.detach().clone().requires_grad_(True)
    m = torch.sigmoid(torch.einsum("ik,nkyx->niyx", t_ref, logits))
    total, count = 0.0, 0
    for b, y, x in itertools.product(range(2), range(2), range(3)):
        if labels[b, y, x] == 255:
            continue
        z = [sum(m[b, i, y, x] * logits[b, c, y, x] for i in range(3)) for c in range(4)]
        total = total - (z[int(labels[b, y, x])] - torch.log(sum(torch.exp(v) for v in z)))
        count += 1
    ref_ce, ref_d = total / count, ref_dice(m)
    assert ce.item() == pytest.approx(ref_ce.item(), rel=1e-12)
    assert dice.item() == pytest.approx(ref_d.item(), rel=1e-12)
    (ce + 0.7 * dice).backward()
    (ref_ce + 0.7 * ref_d).backward()
    torch.testing.assert_close(tokens.grad, t_ref.grad, rtol=1e-10, atol=1e-14)
    # identical masks have Dice 1; a single token has no pair
    same = torch.full((1, 2, 2, 2), 0.3, dtype=torch.float64)
    assert mask_diversity(same).item() == pytest.approx(1.0)
    assert mask_diversity(same[:, :1]).item() == 0


def test_learning_the_tokens_lowers_the_objective_and_is_seeded():
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(2, 3, 4, 4, generator=g), torch.randint(0, 3, (2, 8, 8), generator=g)) for _ in range(4)]
    proj = torch.randn(3, 3, generator=g)

    def teacher(x):  # a frozen "teacher": per-pixel logits from the image
        return torch.einsum("kc,nchw->nkhw", proj, x)

    def run(iterations, seed=0):
        return learn_receptive_tokens(itertools.cycle(data), teacher, num_tokens=4, num_classes=3,
                                      iterations=iterations, base_lr=0.1, momentum=0.9, weight_decay=1e-3,
                                      dice_weight=1.0, ignore_value=255, seed=seed, log_period=0)

    def objective(tokens):
        return sum(sum(token_learning_loss(tokens, teacher(x), y, ignore_value=255)).item() for x, y in data)

    tokens, last = run(20)
    assert tokens.shape == (4, 3)
    assert objective(tokens) < objective(initial_tokens(4, 3, 0)) - 0.05
    assert last["lr"] == pytest.approx(0.1 * (1 / 20) ** 0.9)  # poly 0.9: the last step's rate
    torch.testing.assert_close(run(20)[0], tokens, rtol=0, atol=0)
    assert not torch.equal(run(20, seed=1)[0], tokens)


def test_the_tokens_file_round_trip_the_authors_format_and_the_refusals(tmp_path):
    tokens = torch.randn(3, K)
    path = save_receptive_tokens(str(tmp_path / "t" / "tokens.pth"), tokens, iterations=5, teacher_config="t.yaml")
    torch.testing.assert_close(load_receptive_tokens(path), tokens)
    torch.save({"mask_token": tokens.double()}, tmp_path / "authors.pth")  # their MaskModule's state dict
    torch.testing.assert_close(load_receptive_tokens(str(tmp_path / "authors.pth")), tokens)
    with pytest.raises(ValueError, match=r"TOKENS_FILE is empty: .*python tools/maskd_tokens.py --config-file"):
        distill_losses_from_names(["maskd"])  # a trained teacher's tokens must be learnt first
    with pytest.raises(FileNotFoundError, match=r"'nope.pth' does not exist. Make it with python tools/maskd_tokens"):
        MaskedDistillation(**{**SETTINGS, "tokens_file": "nope.pth"})
    with pytest.raises(ValueError, match=r"holds 3 tokens but MODEL.DISTILL.MASKD.NUM_TOKENS is 8; set NUM_TOKENS 3"):
        distill_losses_from_names(["maskd"], opts=["MODEL.DISTILL.MASKD.TOKENS_FILE", path])
    loss = MaskedDistillation(**{**SETTINGS, "tokens_file": path})
    with pytest.raises(ValueError, match=r"its tokens have 5 entries but the teacher tap 'logits' has 7 channels"):
        loss.bind({"logits": ShapeSpec(channels=7)}, {"logits": ShapeSpec(channels=7)}, num_classes=7)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"holds no T x K tensor 'tokens'.*found \['weights'\]"):
        load_receptive_tokens(str(tmp_path / "other.pth"))
    torch.save({"tokens": np.zeros((3, K))}, tmp_path / "pickled.pth")  # not a plain tensor file: never unpickled
    with pytest.raises(Exception, match="Weights only load failed"):
        load_receptive_tokens(str(tmp_path / "pickled.pth"))


def test_the_deployed_student_has_exactly_the_plain_students_parameters(tmp_path):
    path = save_receptive_tokens(str(tmp_path / "tokens.pth"), torch.randn(8, K))
    cfg = distill_cfg(tmp_path, ["maskd"], **{"MODEL.DISTILL.MASKD.TOKENS_FILE": path})
    torch.manual_seed(0)
    model = build_model(cfg).train()
    torch.testing.assert_close(model.distill_losses["maskd"].tokens, load_receptive_tokens(path))
    losses = model(random_batch(2, 64, 64, K))
    assert set(losses) == {"loss_sem_seg", "loss_maskd"} and losses["loss_maskd"] > 0
    sum(losses.values()).backward()
    assert not list(model.distill_losses.parameters())  # the tokens are fixed (a buffer)
    assert "distill_losses.maskd.tokens" in model.state_dict()  # saved with the checkpoint
    assert_deploys_as_the_plain_student(cfg, model)



@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    """Stage 1 at toy size: tools/maskd_tokens.py on the YAML demo config (3 iterations)."""
    out = str(tmp_path_factory.mktemp("maskd") / "tokens.pth")
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        tool = load_script("maskd_tokens", "tools/maskd_tokens.py")
        doc = tool.main(["--config-file", "configs/demo/distill/maskd.yaml", "--output", out,
                         *distill_run_opts(os.path.dirname(out)), "MODEL.DISTILL.MASKD.TOKENS.ITERATIONS", "3"])
    finally:
        os.chdir(cwd)
    return out, doc


@pytest.mark.slow
def test_the_tokens_tool_writes_a_file_the_loss_reads(tokens_file):
    path, doc = tokens_file
    assert doc["tokens"] == [8, 10] and doc["iterations"] == 3 and 0 < doc["final_ce"] < math.log(10) + 1  # a cross-entropy over 10 classes near its start
    state = torch.load(path, weights_only=True)
    assert not torch.equal(state["tokens"], initial_tokens(8, 10, 0))  # trained, not the initialisation
    assert state["teacher_config"] == "configs/demo/distill/teacher.yaml"


@pytest.mark.slow
def test_train_net_yaml_two_iterations_then_resume(tmp_path, monkeypatch, tokens_file):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from test_train_net import run

    out_dir = str(tmp_path / "yaml")
    config, opts = ["--config-file", "configs/demo/distill/maskd.yaml"], distill_run_opts(out_dir)
    opts += ["MODEL.DISTILL.MASKD.TOKENS_FILE", tokens_file[0]]
    _, out = run(config + opts + ["SOLVER.MAX_ITER", "2"])
    assert "loss_maskd" in out
    saved = torch.load(os.path.join(out_dir, "model_final.pth"), weights_only=False)["model"]
    torch.testing.assert_close(saved["distill_losses.maskd.tokens"], load_receptive_tokens(tokens_file[0]))
    assert not any(k.startswith("teacher") for k in saved)
    _, out = run(config + ["--resume"] + opts + ["SOLVER.MAX_ITER", "3"])
    assert "Starting training from iteration 2" in out


@pytest.mark.slow
def test_train_net_lazy_two_iterations(tmp_path, monkeypatch, tokens_file):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from test_train_net import run

    out_dir = str(tmp_path / "lazy")
    lazy_tiny = [o for o in LAZY_TINY if not o.startswith("model.sem_seg_head")]  # the student's head is model.student's
    run(["--config-file", "configs/demo/distill/maskd.py", *lazy_tiny, "train.max_iter=2",
         f"train.output_dir={out_dir}", "model.teacher.weights=", "model.teacher.allow_random=True",
         "model.eval_teacher=False", "model.student.sem_seg_head.aspp_channels=32",
         f"model.losses.opts=[MODEL.NORM,BN,MODEL.DISTILL.MASKD.TOKENS_FILE,{tokens_file[0]}]"])
    saved = torch.load(os.path.join(out_dir, "model_final.pth"), weights_only=False)["model"]
    torch.testing.assert_close(saved["distill_losses.maskd.tokens"], load_receptive_tokens(tokens_file[0]))


def test_demo_configs_name_the_row():
    from detectron2.config import LazyConfig

    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs/demo/distill/maskd.yaml"))
    assert list(cfg.MODEL.DISTILL.LOSSES) == ["maskd"] and cfg.MODEL.DISTILL.MASKD.NUM_TOKENS == 8
    assert cfg.MODEL.DISTILL.MASKD.TOKENS_FILE == "output/demo/distill/maskd_tokens.pth"
    assert cfg.MODEL.DISTILL.MASKD.WEIGHT == 0.5 and cfg.MODEL.DISTILL.MASKD.TOKENS.BASE_LR == 0.1
    lazy = LazyConfig.load(os.path.join(REPO, "configs/demo/distill/maskd.py"))
    assert list(lazy.model.losses.names) == ["maskd"]
    assert list(lazy.model.losses.opts)[-2:] == ["MODEL.DISTILL.MASKD.TOKENS_FILE", "output/demo/distill/maskd_tokens.pth"]
