"""The real-data configs name their ImageNet start (a publisher's URL or a timm tag), and
offline that start fails within seconds with an error naming both ways out: a local file
(``MODEL.TIMM.CHECKPOINT /path``) or a random start (``KEY ""``). Nothing here downloads:
conftest sets ``SEGDISTILL_OFFLINE=1`` and ``HF_HUB_OFFLINE=1``."""
from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO, no_imagenet_start
from detectron2.config import LazyConfig, get_cfg
from detectron2.modeling import build_model
from segdistill import add_segdistill_config
from segdistill.convert import WeightsDownloadError, hash_prefix
from segdistill.convert.fetch import timm_weights_name
from segdistill.engine.lazy import random_backbones

# The real-data config folders (those that exist); CamVid's configs start from the backbones
# that benchmarks/pretrain.py makes here, and the demo trains from scratch on purpose.
REAL = ("cityscapes", "coco_stuff", "ade20k", "voc", "context", "reproduce")
YAMLS = sorted(p for d in REAL for p in glob.glob(os.path.join(REPO, "configs", d, "**", "*.yaml"), recursive=True)
               if not os.path.basename(p).startswith("Base-"))
LAZY = sorted(p for d in REAL for p in glob.glob(os.path.join(REPO, "configs", d, "**", "*.py"), recursive=True))
# Publishers' download locations a config may name (docs/reproduce.md); OpenMMLab's file names
# carry a hash prefix, which the download is checked against
PUBLISHERS = ("https://download.openmmlab.com/", "https://github.com/winycg/CIRKD/releases/download/")
HASHED = ("https://download.openmmlab.com/",)
# Files with no direct URL (HWD's CIRKD teacher, a Google Drive file): files to place
PLACED = "checkpoints/cirkd/"


def _rel(p):
    return os.path.relpath(p, REPO)


def _yaml(path):
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(path)
    return cfg


def _check_start(value: str, where: str, model_name: str = "", pretrained: bool = False):
    if pretrained:
        timm_weights_name(model_name, value)  # a tag timm knows for this backbone (raises otherwise)
    elif value.startswith(("https://", "http://")):
        assert value.startswith(PUBLISHERS), f"{where}: {value} is not a publisher's URL"
        assert hash_prefix(value) or not value.startswith(HASHED), f"{where}: {value} carries no hash prefix to check the download against"
    else:
        assert value.startswith(PLACED), f"{where}: {value!r} is neither a URL nor a timm tag nor a documented file"


def test_every_real_data_config_names_a_start():
    assert len(YAMLS) > 40 and len(LAZY) > 30
    for path in YAMLS:
        cfg, where = _yaml(path), _rel(path)
        timm_ = cfg.MODEL.TIMM
        starts = [v for v in (cfg.MODEL.WEIGHTS, timm_.CHECKPOINT, timm_.PRETRAINED) if v]
        assert starts, f"{where} names no start: set MODEL.TIMM.PRETRAINED (a timm tag) or MODEL.TIMM.CHECKPOINT (a URL)"
        if cfg.MODEL.WEIGHTS:
            _check_start(cfg.MODEL.WEIGHTS, where)
        if timm_.CHECKPOINT:
            _check_start(timm_.CHECKPOINT, where)
        if timm_.PRETRAINED:
            _check_start(timm_.PRETRAINED, where, timm_.NAME, pretrained=True)
        if cfg.MODEL.META_ARCHITECTURE == "Distiller":
            if "://" in cfg.MODEL.DISTILL.TEACHER.WEIGHTS:  # else a teacher trained here first (output/...)
                _check_start(cfg.MODEL.DISTILL.TEACHER.WEIGHTS, where)
            # the trained teacher replaces every tensor: its config's ImageNet start is not fetched
            teacher = _yaml(os.path.join(REPO, cfg.MODEL.DISTILL.TEACHER.CONFIG_FILE))
            teacher.merge_from_list(list(cfg.MODEL.DISTILL.TEACHER.OPTS))
            assert not teacher.MODEL.TIMM.PRETRAINED, f"{where}: the teacher downloads {teacher.MODEL.TIMM.PRETRAINED}"
    for path in LAZY:
        cfg, where = LazyConfig.load(path), _rel(path)
        if "model" not in cfg:
            continue
        assert cfg.train.init_checkpoint or random_backbones(cfg.model) == 0, f"{where} names no start"
        student = cfg.model.student if "student" in cfg.model else cfg.model
        body = student.backbone
        if body.get("pretrained", ""):
            _check_start(body.pretrained, where, body.model_name, pretrained=True)
        if body.get("checkpoint", ""):
            _check_start(body.checkpoint, where)
        if "teacher" in cfg.model and "opts" in cfg.model.teacher:
            opts = list(cfg.model.teacher.opts)
            teacher = _yaml(os.path.join(REPO, cfg.model.teacher.config_file))
            teacher.merge_from_list(opts)
            assert not teacher.MODEL.TIMM.PRETRAINED, f"{where}: the teacher downloads {teacher.MODEL.TIMM.PRETRAINED}"


def test_the_offline_override_switches_the_start_off():
    cfg = no_imagenet_start(_yaml(os.path.join(REPO, "configs/cityscapes/baseline/deeplabv3_r18.yaml")))
    assert cfg.MODEL.TIMM.PRETRAINED == "" and cfg.MODEL.TIMM.CHECKPOINT == ""
    lazy = no_imagenet_start(LazyConfig.load(os.path.join(REPO, "configs/reproduce/fakd/pspnet_r18_student.py")))
    assert random_backbones(lazy.model) == 1


def _ways_out(message: str, key: str, filename: str):
    assert f"{key} /path/to/{filename}" in message, message
    assert f'{key} ""' in message, message


# huggingface_hub reads HF_HOME when it is imported: a process of its own with an empty one
_BUILD = textwrap.dedent("""\
    import sys, time
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from segdistill import add_segdistill_config

    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(sys.argv[1])
    cfg.MODEL.DEVICE, cfg.MODEL.NORM = "cpu", "BN"
    start = time.monotonic()
    try:
        build_model(cfg)
    except Exception as e:
        print(f"ELAPSED {time.monotonic() - start:.2f}")
        print(f"ERROR {type(e).__name__}: {e}")
        sys.exit(3)
""")


def test_offline_timm_tag_fails_fast_naming_both_ways_out(tmp_path):
    script = tmp_path / "build.py"
    script.write_text(_BUILD)
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "projects"), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, str(script), os.path.join(REPO, "configs/cityscapes/baseline/deeplabv3_r18.yaml")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert float(proc.stdout.split("ELAPSED ")[1].split()[0]) < 10.0
    error = proc.stdout.split("ERROR ", 1)[1]
    assert error.startswith("WeightsDownloadError") and "resnet18.tv_in1k" in error
    assert "MODEL.TIMM.CHECKPOINT /path/to/resnet18.tv_in1k" in error
    assert 'MODEL.TIMM.PRETRAINED ""' in error


def test_offline_url_fails_at_once_naming_both_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGDISTILL_CACHE", str(tmp_path / "cache"))
    cfg = _yaml(os.path.join(REPO, "configs/reproduce/fakd/pspnet_r18_student.yaml"))
    cfg.MODEL.DEVICE, cfg.MODEL.NORM = "cpu", "BN"
    start = time.monotonic()
    with pytest.raises(WeightsDownloadError, match="SEGDISTILL_OFFLINE is set") as e:
        build_model(cfg)
    assert time.monotonic() - start < 10.0
    _ways_out(str(e.value), "MODEL.TIMM.CHECKPOINT", "resnet18_v1c-b5776b93.pth")
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")


def test_a_server_that_never_answers_is_given_up_after_the_socket_timeout(tmp_path, monkeypatch):
    """A network that swallows requests: the connection's reads are bounded, no endless hang."""
    from segdistill.convert import fetch, resolve_weights

    monkeypatch.delenv("SEGDISTILL_OFFLINE")
    monkeypatch.setenv("SEGDISTILL_CACHE", str(tmp_path / "cache"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(fetch, "DOWNLOAD_TIMEOUT_S", 1.0)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # the kernel completes the connection; nobody ever answers
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/resnet18_v1c-b5776b93.pth"
        start = time.monotonic()
        with pytest.raises(WeightsDownloadError, match="timed out") as e:
            resolve_weights(url, "MODEL.TIMM.CHECKPOINT")
        assert time.monotonic() - start < 5.0
    finally:
        silent.close()
    _ways_out(str(e.value), "MODEL.TIMM.CHECKPOINT", "resnet18_v1c-b5776b93.pth")
    assert os.listdir(tmp_path / "cache") == []
