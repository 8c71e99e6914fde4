"""Lazy config files whose keys nothing reads are refused when they load; Ctrl-C during training
prints one line (last checkpoint, resume command) and exits with 130, and the run resumes."""
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from detectron2.config import LazyConfig
from detectron2.utils import comm

from conftest import LAZY_TINY, REPO, YAML_TINY, load_script
from segdistill.config import LazyConfigKeyError, check_lazy_config_keys, load_lazy_config
from segdistill.engine import RunOutput, exit_on_interrupt


train_net = load_script("train_net", "train_net.py")
LAZY = os.path.join(REPO, "configs/demo/deeplabv3_r18.py")


def args(*argv):
    return train_net.argument_parser().parse_args([str(a) for a in argv])


# ----------------------------------------------------------------------------- lazy config files
def copied_config(tmp_path, *lines):
    """configs/demo/deeplabv3_r18.py copied (with the configs/common it imports) plus ``lines``."""
    root = tmp_path / "configs"
    shutil.copytree(os.path.join(REPO, "configs", "common"), root / "common")
    (root / "demo").mkdir()
    path = root / "demo" / "mine.py"
    path.write_text(open(LAZY).read() + "".join(f"{line}\n" for line in lines))
    return str(path)


@pytest.mark.parametrize("line, key, nearest", [
    ("train.max_iters = 5", "train.max_iters", "train.max_iter"),
    ('train.devcie = "cpu"', "train.devcie", "train.device"),
    ("train.checkpointer.perido = 2", "train.checkpointer.perido", "train.checkpointer.period"),
    ("dataloader.tset = dataloader.test", "dataloader.tset", "dataloader.test"),
    ("model.backbone.output_strid = 16", "model.backbone.output_strid", "model.backbone.output_stride"),
])
def test_a_key_nothing_reads_in_a_lazy_file_is_refused_naming_file_and_nearest_key(tmp_path, line, key, nearest):
    path = copied_config(tmp_path, line)
    out = tmp_path / "out"
    with pytest.raises(LazyConfigKeyError) as e:
        train_net.main(args("--config-file", path, *LAZY_TINY, f"train.output_dir={out}"))
    msg = str(e.value)
    assert path in msg and repr(key) in msg and re.search(rf"Nearest valid keys: {re.escape(nearest)}\b", msg), msg
    assert not out.exists()  # refused before anything was built or written


def test_the_copied_original_and_every_lazy_config_of_the_project_load(tmp_path):
    cfg = load_lazy_config(copied_config(tmp_path), ["train.max_iter=5"])
    assert cfg.train.max_iter == 5 and cfg.train.device == "cpu"
    # arguments the receivers of train.ddp / train.checkpointer take are settings too
    ok = load_lazy_config(copied_config(tmp_path / "b", "train.ddp.gradient_as_bucket_view = True",
                                        'train.checkpointer.file_prefix = "m"'))
    assert ok.train.ddp.gradient_as_bucket_view is True
    configs = [f for f in glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True)
               if os.sep + "common" + os.sep not in f]
    assert len(configs) > 50
    for f in configs:
        check_lazy_config_keys(LazyConfig.load(f), f)


# ----------------------------------------------------------------------------- Ctrl-C
def test_interrupt_message_names_the_last_checkpoint_and_the_resume_command(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    cfg = LazyConfig.load(LAZY)
    cfg.train.output_dir = str(out)
    argv = ["train_net.py", "--config-file", "c.py", "--overwrite-output", "train.max_iter=9"]
    with pytest.raises(SystemExit) as e, exit_on_interrupt(RunOutput(cfg, mode="train"), argv):
        raise KeyboardInterrupt
    assert e.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    cmd = shlex.join([sys.executable, "train_net.py", "--resume", "--config-file", "c.py", "train.max_iter=9"])
    assert err == [f"Training interrupted before its first checkpoint (nothing to keep in {out}); to start again: {cmd}"]

    # a run from scratch over a folder holding an older checkpoint: that checkpoint is not this run's
    out.mkdir()
    (out / "last_checkpoint").write_text("model_0000001.pth")
    fresh, resumed = RunOutput(cfg, mode="train"), RunOutput(cfg, mode="resume")
    assert "before its first checkpoint" in fresh.interrupted_message(argv)
    assert f"last checkpoint: {out / 'model_0000001.pth'}; to resume" in resumed.interrupted_message(argv)
    (out / "last_checkpoint").write_text("model_0000003.pth")
    assert fresh.interrupted_message(argv) == \
        f"Training interrupted; last checkpoint: {out / 'model_0000003.pth'}; to resume from it: {cmd}"

    # several processes: only rank 0 prints; every process exits with 130
    monkeypatch.setattr(comm, "get_rank", lambda: 1)
    with pytest.raises(SystemExit) as e, exit_on_interrupt(fresh, argv):
        raise KeyboardInterrupt
    assert e.value.code == 130 and capsys.readouterr().err == ""


def test_ctrl_c_in_a_lazy_run_prints_one_line_and_exits_130(tmp_path, monkeypatch, capsys):
    import segdistill.engine.lazy as lazy

    class Curves(lazy.TrainingCurvesHook):  # Ctrl-C after iteration 2 (checkpoint of iteration 1)
        def after_step(self):
            super().after_step()
            if self.trainer.iter == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(lazy, "TrainingCurvesHook", Curves)
    out = tmp_path / "lazy"
    argv = ["train_net.py", "--config-file", LAZY, *LAZY_TINY, "train.max_iter=50", "train.checkpointer.period=2",
            f"train.output_dir={out}"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        train_net.main(args(*argv[1:]))
    assert e.value.code == 130
    err = [line for line in capsys.readouterr().err.splitlines() if "interrupted" in line.lower()]
    assert err == [f"Training interrupted; last checkpoint: {out / 'model_0000001.pth'}; to resume from it: "
                   + shlex.join([sys.executable, "train_net.py", "--resume", *argv[1:]])]
    assert (out / "model_0000001.pth").is_file() and not (out / "model_final.pth").exists()


@pytest.mark.slow
def test_a_ctrl_c_that_python_dropped_is_delivered_again(tmp_path, capsys):
    """Python drops a KeyboardInterrupt raised inside a finalizer; the run still stops: the
    interrupt is delivered again, and the handler before the block is back after it."""
    cfg = LazyConfig.load(LAZY)
    cfg.train.output_dir = str(tmp_path / "run")
    before = signal.getsignal(signal.SIGINT)
    start = time.time()
    with pytest.raises(SystemExit) as e, exit_on_interrupt(RunOutput(cfg, mode="train"), ["train_net.py"]):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)  # the handler runs here
        except KeyboardInterrupt:
            pass  # dropped, as in a finalizer
        while time.time() - start < 15:  # the run goes on
            time.sleep(0.05)
    assert e.value.code == 130 and time.time() - start < 10
    assert signal.getsignal(signal.SIGINT) is before


def test_sigint_during_a_yaml_run_then_resume_finishes(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "projects") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "train_net.py", "--config-file", "configs/demo/deeplabv3_r18.yaml", *YAML_TINY,
           "SOLVER.MAX_ITER", "100000", "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "last_checkpoint").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no checkpoint after 300 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stdout + stderr and "KeyboardInterrupt" not in stdout + stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("Training interrupted")]
    assert len(lines) == 1, stderr[-3000:]
    m = re.fullmatch(r"Training interrupted; last checkpoint: (\S+); to resume from it: (.+)", lines[0])
    assert m, lines[0]
    checkpoint = m.group(1)
    assert os.path.isfile(checkpoint) and os.path.dirname(checkpoint) == str(out)
    resume = shlex.split(m.group(2))
    assert resume == [sys.executable, "train_net.py", "--resume", *cmd[2:]]

    # the printed command resumes (here up to two iterations past the checkpoint) and finishes
    saved = int(re.search(r"model_(\d+)\.pth", checkpoint).group(1))
    done = subprocess.run(resume + ["SOLVER.MAX_ITER", str(saved + 3)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Starting training from iteration {saved + 1}" in done.stdout + done.stderr
    assert (out / "model_final.pth").is_file()


# ----------------------------------------------------------------------------- dataset converters
def _script(name):
    return load_script(name, f"datasets/{name}.py", register=True)


def _png(path, value, shape=(6, 8)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)


def _read(path):
    from PIL import Image

    return np.asarray(Image.open(path))


def _set_mtime_ns(path, ns):
    os.utime(path, ns=(ns, ns))


def test_coco_stuff_converter_converts_a_map_edited_after_conversion_again(tmp_path):
    prep = _script("prepare_coco_stuff_164k")
    lut = prep.load_meta().raw_to_contiguous_lut()
    raw = tmp_path / "coco" / "stuffthingmaps" / "val2017"
    out = tmp_path / "coco" / "stuffthingmaps_detectron2" / "val2017"
    report = tmp_path / "coco" / "stuffthingmaps_detectron2" / "val2017_report.json"
    _png(raw / "000000000001.png", 0)
    _png(raw / "000000000002.png", 1)
    run = ["--root", str(tmp_path), "--workers", "1", "--splits", "val2017"]
    assert prep.main(run) == 0 and json.load(open(report))["converted_this_run"] == 2
    assert (_read(out / "000000000001.png") == lut[0]).all()
    kept = os.stat(out / "000000000002.png").st_mtime_ns
    assert prep.main(run) == 0 and json.load(open(report))["converted_this_run"] == 0  # unchanged: skipped

    # edited after conversion (same size, its modification time even set back before the output's)
    before = os.stat(out / "000000000001.png").st_mtime_ns - 10**9
    _png(raw / "000000000001.png", 5)
    _set_mtime_ns(raw / "000000000001.png", before)
    assert prep.main(run) == 0 and json.load(open(report))["converted_this_run"] == 1
    assert (_read(out / "000000000001.png") == lut[5]).all() and lut[5] != lut[0]
    assert os.stat(out / "000000000002.png").st_mtime_ns == kept  # the unchanged one was not touched
    assert prep.main(run) == 0 and json.load(open(report))["converted_this_run"] == 0


def test_label_jobs_convert_a_source_edited_after_conversion_again(tmp_path):
    prep = _script("prepare_ade20k_sem_seg")
    base = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        _png(base / "annotations" / split / "a.png", 3)
        _png(base / "annotations" / split / "b.png", 4)
    run = ["--root", str(tmp_path), "--workers", "1"]
    assert prep.main(run) == 0
    out = base / "annotations_detectron2" / "validation"
    kept = os.stat(out / "b.png").st_mtime_ns
    _png(base / "annotations" / "validation" / "a.png", 7)
    _set_mtime_ns(base / "annotations" / "validation" / "a.png", os.stat(out / "a.png").st_mtime_ns + 10**9)
    assert prep.main(run) == 0
    assert (_read(out / "a.png") == 6).all() and os.stat(out / "b.png").st_mtime_ns == kept
