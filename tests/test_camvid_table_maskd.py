"""The CamVid table's MasKD rows: their tokens are learnt first, once, on the rows' teacher
(``tools/maskd_tokens.py`` as a job of the graph, on the teacher's training split, for a quarter
of the rows' iterations), the rows wait for them and read them, the tuning protocol learns its
own on its teacher, and the job resumes (an interrupted one leaves nothing that looks finished).
The trained teacher is stood in for by a random teacher's saved weights: the graph, not the
teacher, is tested."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_camvid_table import TINY, table_on_tiny_camvid  # noqa: E402


@pytest.fixture
def table(tmp_path, monkeypatch):
    return table_on_tiny_camvid(tmp_path, monkeypatch, n_train=4)


def fake_teacher(folder):
    """A finished teacher run: a random teacher's weights (from the table's teacher config) and its result."""
    from detectron2.modeling import build_model
    from segdistill.config import load_yaml_config

    cfg = load_yaml_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                        "configs", "camvid", "table", "teacher.yaml"), ["MODEL.TIMM.CHECKPOINT", ""])
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": build_model(cfg).state_dict()}, folder / "model_final.pth")
    (folder / "result.json").write_text("{}")


def test_maskd_rows_wait_for_tokens_learnt_on_their_teacher(table):
    mod, data, tmp = table
    out = tmp / "t"
    tiny = list(TINY)
    tiny[tiny.index("SOLVER.MAX_ITER") + 1] = "8"
    argv = ["--data-root", str(data), "--output", str(out), "--pretrained", "none", "--seeds", "2",
            "--methods", "teacher,maskd"] + tiny
    t = mod.Table(mod.parse_args(argv))
    jobs = {j.key: j for j in t.jobs()}
    assert list(jobs) == ["teacher/seed0", "maskd_tokens", "maskd/seed0", "maskd/seed1"]
    tok = jobs["maskd_tokens"]
    cmd = " ".join(tok.cmd)
    assert tok.needs == ["teacher"] and "tools/maskd_tokens.py" in cmd
    assert f"MODEL.DISTILL.TEACHER.WEIGHTS {out / 'runs' / 'teacher' / 'seed0' / 'model_final.pth'}" in cmd
    assert "MODEL.DISTILL.MASKD.TOKENS.ITERATIONS 2 " in cmd  # a quarter of the rows' 8
    assert "hs3_reduced" not in cmd  # the teacher's own training split
    tokens = out / "maskd_tokens" / "tokens.pth"
    for seed in (0, 1):
        row = jobs[f"maskd/seed{seed}"]
        assert "maskd_tokens" in row.needs
        assert f"MODEL.DISTILL.MASKD.TOKENS_FILE {tokens}" in " ".join(row.cmd)
    fake_teacher(out / "runs" / "teacher" / "seed0")
    assert t.ready(tok) and not t.ready(jobs["maskd/seed0"])
    # an interrupted job's file does not count
    tokens.parent.mkdir(parents=True)
    (tokens.parent / "tokens.pth.tmp").write_text("half written")
    assert not t.ready(jobs["maskd/seed0"]) and "maskd_tokens" in {j.key for j in mod.Table(mod.parse_args(argv)).jobs()}

    # the runner runs the tokens job (the rows' training is tested elsewhere): 2 iterations
    t.jobs = lambda: [tok]
    t.run()
    state = torch.load(tokens, weights_only=True)
    assert state["tokens"].shape == (8, 11) and state["iterations"] == 2
    assert state["teacher_weights"] == str(out / "runs" / "teacher" / "seed0" / "model_final.pth")
    assert not (tokens.parent / "tokens.pth.tmp").exists()
    # resumed: learnt once, every seed reads the same file
    t = mod.Table(mod.parse_args(argv))
    jobs = {j.key: j for j in t.jobs()}
    assert list(jobs) == ["maskd/seed0", "maskd/seed1"] and t.ready(jobs["maskd/seed0"])


def test_tuned_maskd_learns_its_tokens_on_the_tuning_teacher(table):
    mod, data, tmp = table
    out = tmp / "t"
    argv = ["--data-root", str(data), "--output", str(out), "--pretrained", "none", "--seeds", "1",
            "--blocks", "tuned", "--methods", "maskd@tuned"] + TINY
    t = mod.Table(mod.parse_args(argv))
    jobs = {j.key: j for j in t.jobs()}
    tok = jobs["tune/maskd_tokens"]
    cmd = " ".join(tok.cmd)
    assert tok.needs == ["tune_teacher"]
    assert f"MODEL.DISTILL.TEACHER.WEIGHTS {out / 'tune' / 'teacher' / 'seed0' / 'model_final.pth'}" in cmd
    assert "DATASETS.TRAIN (\"camvid_train_hs3_reduced\",)" in cmd  # the split that teacher trained on
    grid = [j for k, j in jobs.items() if k.startswith("tune/maskd/")]
    assert len(grid) == 8 and sum(k == "tune/maskd_tokens" for k in jobs) == 1
    tune_tokens = out / "tune" / "maskd_tokens" / "tokens.pth"
    for j in grid:
        assert "tune_maskd_tokens" in j.needs and f"MODEL.DISTILL.MASKD.TOKENS_FILE {tune_tokens}" in " ".join(j.cmd)
        assert "MODEL.DISTILL.MASKD.WEIGHT" in " ".join(j.cmd)  # the tuned weight
    # the tuned row on val reads the rows' tokens (learnt on the teacher it distils from)
    row = jobs["maskd@tuned/seed0"]
    assert "maskd_tokens" in row.needs and "maskd_tokens" in jobs
