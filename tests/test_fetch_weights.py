"""Weights named by URL or timm tag, all offline: tools/serve_weights.py's loopback server, started
by each test over a temporary folder, serves the files; a temporary folder is the cache, a
temporary HF_HOME is timm's Hub cache.

A downloaded file takes the path of a local one (conversion, ``weights_only`` reading, the fit
check); a second load makes no request; a file whose name's hash does not match, a 404 and a
connection dropped mid-file are clear errors that leave nothing in the cache."""
from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO, load_script, make_backbone, tiny_cfg
from detectron2.modeling import build_model
from segdistill.convert import SegDistillCheckpointer, WeightsDownloadError, load_checked_weights

PROJECTS = os.path.join(REPO, "projects")


serve_weights = load_script("serve_weights", "tools/serve_weights.py")


class _DroppingHandler(serve_weights.FileHandler):
    """The tool's file handler, plus ``/drop/<name>``: half of the file, then the connection
    closes (the headers announce all of it)."""

    def file_name(self) -> str:
        name = super().file_name()
        return name[len("drop/"):] if name.startswith("drop/") else name

    def write_body(self, f, length: int) -> None:
        if not self.path.startswith("/drop/"):
            return super().write_body(f, length)
        self.wfile.write(f.read(length // 2))
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def server(tmp_path, monkeypatch):
    """tools/serve_weights.py's loopback server on a free port over a temporary folder (bounded:
    stopped when the test ends), and an empty cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SEGDISTILL_CACHE", str(cache))
    monkeypatch.delenv("SEGDISTILL_OFFLINE", raising=False)  # conftest's guard: this server is loopback
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with serve_weights.LoopbackServer(str(tmp_path / "served"), lifetime_s=120, handler=_DroppingHandler) as httpd:
        httpd.cache = cache
        yield httpd


def _serve(server, stem: str, obj, *, hashed: bool = True, suffix: str = ".pth") -> str:
    """Write ``obj`` (torch.save) into the served folder as ``stem-<sha256[:8]>.pth``; returns its URL."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    name = f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}{suffix}" if hashed else f"{stem}{suffix}"
    with open(os.path.join(server.root, name), "wb") as f:
        f.write(data)
    return f"{server.url}/{name}"


def _cache_files(server):
    return sorted(os.listdir(server.cache)) if server.cache.exists() else []


def _tiny_cfg(**keys):
    return tiny_cfg("mobilenetv2_050", **keys)


def test_model_weights_url_downloads_once_and_loads(server):
    torch.manual_seed(0)
    source = build_model(_tiny_cfg())
    url = _serve(server, "tiny_deeplabv3", {"model": source.state_dict()})
    torch.manual_seed(1)
    model = build_model(_tiny_cfg(**{"MODEL.WEIGHTS": url}))
    report = load_checked_weights(model, url, min_matched=1.0)
    assert report.matched == 1.0
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert server.requests == ["/" + url.rsplit("/", 1)[1]]
    assert _cache_files(server) == [url.rsplit("/", 1)[1]]  # no temporary file left beside it
    # a second load, here by the trainer's checkpointer, reads the cached file: no request
    torch.manual_seed(2)
    again = build_model(_tiny_cfg())
    SegDistillCheckpointer(again).resume_or_load(url, resume=False)
    assert len(server.requests) == 1
    assert all(torch.equal(again.state_dict()[k], v) for k, v in source.state_dict().items())


def test_backbone_checkpoint_url(server):
    import timm

    torch.manual_seed(0)
    imagenet = timm.create_model("mobilenetv2_050")  # a timm ImageNet file: classifier included
    url = _serve(server, "mobilenetv2_050_imagenet", imagenet.state_dict())
    backbone = make_backbone("mobilenetv2_050", output_stride=32, checkpoint=url)
    body = backbone.body.state_dict()
    assert torch.equal(body["conv_stem.weight"], imagenet.state_dict()["conv_stem.weight"])
    assert all(torch.equal(body[k], imagenet.state_dict()[k]) for k in body if not k.endswith("num_batches_tracked"))
    # the same URL through the checked conversion, a second time: from the cache
    make_backbone("mobilenetv2_050", output_stride=32, checkpoint=url)
    assert len(server.requests) == 1


def test_teacher_weights_mmseg_url(server):
    """An mmsegmentation model-zoo file by URL as MODEL.DISTILL.TEACHER.WEIGHTS: converted and
    checked as a local one; the teacher gives mmsegmentation's logits."""
    from mmseg_oracle import TINY_DEEPLABV3, TINY_DEEPLABV3_YAML, build_mmseg, mmseg_logits
    from segdistill.modeling.meta_arch.distill import build_teacher

    mm = build_mmseg(TINY_DEEPLABV3)
    url = _serve(server, "deeplabv3_r18-d8_512x1024_80k_cityscapes_20201225_021506",
                 {"meta": {"CLASSES": ("a", "b", "c", "d", "e")}, "state_dict": mm.state_dict()})
    config = server.cache.parent / "teacher.yaml"
    config.write_text(TINY_DEEPLABV3_YAML.format(repo=REPO, weights_format="auto"))
    teacher = build_teacher(str(config), url)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    teacher.eval()
    with torch.no_grad():
        logits = teacher.sem_seg_head(teacher.backbone(x))[0]
    assert (logits - mmseg_logits(mm, x)).abs().max() < 1e-4
    assert len(server.requests) == 1


def test_wrong_hash_is_refused_and_deleted(server):
    url = _serve(server, "weights", {"model": {"w": torch.ones(3)}}, hashed=False)
    os.rename(os.path.join(server.root, "weights.pth"), os.path.join(server.root, "weights-deadbeef.pth"))
    url = url.replace("weights.pth", "weights-deadbeef.pth")
    with pytest.raises(WeightsDownloadError, match=r"(?s)MODEL\.WEIGHTS.*SHA-256 is [0-9a-f]{8}.*deadbeef.*deleted"):
        load_checked_weights(build_model(_tiny_cfg()), url)
    assert _cache_files(server) == []
    # the next try downloads again (nothing was kept) and fails the same way
    with pytest.raises(WeightsDownloadError, match="deadbeef"):
        load_checked_weights(build_model(_tiny_cfg()), url)
    assert len(server.requests) == 2 and _cache_files(server) == []


def test_404_and_dropped_connection_are_clear_and_leave_nothing(server):
    model = build_model(_tiny_cfg())
    missing = f"{server.url}/no_such_model.pth"
    with pytest.raises(WeightsDownloadError, match=rf"(?s)MODEL\.WEIGHTS = '{missing}'.*HTTP 404.*local copy: MODEL\.WEIGHTS /path/to/no_such_model\.pth"):
        load_checked_weights(model, missing)
    assert _cache_files(server) == []
    url = _serve(server, "big", {"model": {"w": torch.arange(100000.0)}})
    dropped = url.replace(server.url + "/", server.url + "/drop/")
    with pytest.raises(WeightsDownloadError, match=r"MODEL\.TIMM\.CHECKPOINT = .*/drop/big-.*ended after \d+ of \d+ bytes"):
        make_backbone("mobilenetv2_050", output_stride=32, checkpoint=dropped)
    assert _cache_files(server) == []
    assert len(server.requests) == 2


# ---------------------------------------------------------------------------------------------
# timm's named weights (MODEL.TIMM.PRETRAINED) through huggingface_hub's cache
# ---------------------------------------------------------------------------------------------
# huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported: each case runs in a
# process of its own with those variables set.
_SCRIPT = textwrap.dedent("""\
    import sys, time
    import torch
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from segdistill import add_segdistill_config
    from segdistill.modeling.backbones import TimmBackbone

    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.MODEL.TIMM.NAME = "mobilenetv2_050"
    cfg.MODEL.TIMM.OUTPUT_STRIDE = 32
    cfg.MODEL.TIMM.PRETRAINED = sys.argv[1]
    start = time.monotonic()
    try:
        backbone = TimmBackbone(**TimmBackbone.from_config(cfg, ShapeSpec(channels=3)))
    except Exception as e:
        print(f"ELAPSED {time.monotonic() - start:.2f}")
        print(f"ERROR {type(e).__name__}: {e}")
        sys.exit(3)
    torch.save(backbone.body.state_dict(), sys.argv[2])
""")


def _run_pretrained(tmp_path, hf_home, value, **env_vars):
    script = tmp_path / "pretrained.py"
    script.write_text(_SCRIPT)
    out = tmp_path / "body.pth"
    env = dict(os.environ, PYTHONPATH=PROJECTS, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    for var in ("HF_HUB_CACHE", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(var, None)
    env.update(env_vars)
    proc = subprocess.run([sys.executable, str(script), value, str(out)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    return proc, out


def test_timm_pretrained_from_the_hub_cache(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    imagenet = timm.create_model("mobilenetv2_050")
    state = {k: v.contiguous() for k, v in imagenet.state_dict().items()}
    # huggingface_hub's cache layout: models--<org>--<name>/snapshots/<revision>/..., refs/main
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--timm--mobilenetv2_050.lamb_in1k"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text('{"architecture": "mobilenetv2_050"}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for value in ("default", "mobilenetv2_050.lamb_in1k"):
        proc, out = _run_pretrained(tmp_path, tmp_path / "hf", value)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        body = torch.load(out, weights_only=True)
        assert body and all(torch.equal(v, state[k]) for k, v in body.items() if not k.endswith("num_batches_tracked"))
        assert torch.equal(body["conv_stem.weight"], state["conv_stem.weight"])


def test_timm_pretrained_offline_without_cache_fails_fast(tmp_path):
    from conftest import free_port

    # HF_HUB_OFFLINE=1; then a Hub that refuses connections (a closed loopback port), where
    # huggingface_hub's own retries would wait tens of seconds
    for offline, env in ((True, {}), (False, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"})):
        proc, _ = _run_pretrained(tmp_path, tmp_path / "empty_hf", "default", **env)
        assert proc.returncode == 3, proc.stdout + proc.stderr
        elapsed = float(proc.stdout.split("ELAPSED ")[1].split()[0])
        assert elapsed < 10.0
        error = proc.stdout.split("ERROR ", 1)[1]
        assert error.startswith("WeightsDownloadError")
        assert "mobilenetv2_050.lamb_in1k" in error and str(tmp_path / "empty_hf" / "hub") in error
        assert "MODEL.TIMM.CHECKPOINT" in error
        assert ("HF_HUB_OFFLINE is set" in error) == offline and ("did not answer" in error) != offline


def test_pretrained_values_are_checked():
    from segdistill.convert.fetch import timm_weights_name

    assert timm_weights_name("resnet18", "default") == "resnet18.a1_in1k"
    assert timm_weights_name("resnet18", "resnet18.tv_in1k") == "resnet18.tv_in1k"
    with pytest.raises(ValueError, match=r"names weights of 'resnet50'.*MODEL.TIMM.NAME is 'resnet18'"):
        timm_weights_name("resnet18", "resnet50.a1_in1k")
    with pytest.raises(ValueError, match=r"no weights 'resnet18.nope'.*resnet18.tv_in1k"):
        timm_weights_name("resnet18", "resnet18.nope")
    with pytest.raises(ValueError, match="set one of them"):
        make_backbone("resnet18", checkpoint="x.pth", pretrained="default")


def test_file_scheme_and_missing_local_file(tmp_path):
    from segdistill.convert import resolve_weights

    f = tmp_path / "w.pth"
    f.write_bytes(b"x")
    assert resolve_weights(f"file://{f}", "MODEL.WEIGHTS") == str(f)
    assert resolve_weights("", "MODEL.WEIGHTS") == ""
    with pytest.raises(FileNotFoundError, match=r"missing\.pth.*MODEL\.WEIGHTS.*https://"):
        resolve_weights(str(tmp_path / "missing.pth"), "MODEL.WEIGHTS")



# ---------------------------------------------------------------------------------------------
# A model for real data trained from a random backbone says so at the start
# ---------------------------------------------------------------------------------------------
def _warnings(caplog):
    records = {id(r): r for r in caplog.records}.values()  # a record reaches the handler once or twice
    return [r.getMessage() for r in records if r.levelno == logging.WARNING and "RANDOMLY" in r.getMessage()]


@pytest.fixture
def trainer_log(caplog):
    """The engine's log, also where detectron2's setup stops propagation to the root logger."""
    logger = logging.getLogger("segdistill.engine")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_random_backbone_warning_for_real_data_only(tmp_path, trainer_log, write_label_dataset):
    import numpy as np

    import train_net
    from test_loading_checks import TINY, YAML, args

    labels = [np.random.default_rng(i).integers(0, 3, (64, 64)) for i in range(4)]
    own = write_label_dataset("own_folder_data_train", labels, 3)
    base = ["SOLVER.MAX_ITER", "1", "TEST.EVAL_PERIOD", "0"]
    # the demo trains from scratch on purpose: quiet
    train_net.main(args("--config-file", YAML, *TINY, *base, "OUTPUT_DIR", tmp_path / "demo"))
    assert _warnings(trainer_log) == []
    # a dataset of one's own from a random backbone: one WARNING naming it and the keys to set
    train_net.main(args("--config-file", YAML, *TINY, *base, "DATASETS.TRAIN", f"('{own}',)",
                        "OUTPUT_DIR", tmp_path / "own"))
    (message,) = _warnings(trainer_log)
    assert own in message and "MODEL.TIMM.PRETRAINED" in message and "MODEL.TIMM.CHECKPOINT" in message


def test_random_backbone_warning_names_the_datasets(trainer_log):
    from detectron2.config import LazyConfig
    from segdistill.engine.lazy import random_backbones
    from segdistill.engine.trainer import warn_random_backbone

    assert not warn_random_backbone(["segdistill_demo_mini_train", "segdistill_demo_train_hs3_reduced"], "x")
    assert _warnings(trainer_log) == []
    assert warn_random_backbone(["segdistill_demo_train", "cityscapes_fine_sem_seg_train"], "MODEL.WEIGHTS empty")
    (message,) = _warnings(trainer_log)
    assert "cityscapes_fine_sem_seg_train" in message and "segdistill_demo_train," not in message
    # lazy configs: a backbone without checkpoint and pretrained counts
    cfg = LazyConfig.load(os.path.join(REPO, "configs/cityscapes/baseline/deeplabv3_r18.py"))
    cfg.model.backbone.pretrained = ""
    assert random_backbones(cfg.model) == 1
    cfg.model.backbone.pretrained = "default"
    assert random_backbones(cfg.model) == 0


# ---------------------------------------------------------------------------------------------
# tools/convert_checkpoint.py takes a URL: the same cache and checks
# ---------------------------------------------------------------------------------------------
def test_convert_checkpoint_tool_takes_a_url(server, tmp_path, capsys):
    from mmseg_oracle import TINY_DEEPLABV3, TINY_DEEPLABV3_YAML, build_mmseg, mmseg_logits

    tool = load_script("convert_checkpoint_tool", "tools/convert_checkpoint.py")
    mm = build_mmseg(TINY_DEEPLABV3)
    url = _serve(server, "deeplabv3_r18-d8_tiny", {"meta": {"CLASSES": tuple("abcde")}, "state_dict": mm.state_dict()})
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_DEEPLABV3_YAML.format(repo=REPO, weights_format="auto"))
    out = tmp_path / "converted.pth"
    assert tool.main(["--config-file", str(config), url, str(out)]) == 0
    name = url.rsplit("/", 1)[1]
    assert f"cached at {server.cache / name}" in capsys.readouterr().out
    assert _cache_files(server) == [name] and len(server.requests) == 1
    model = build_model(_cfg_with_weights(config, str(out)))
    SegDistillCheckpointer(model).load(str(out))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        logits = model.sem_seg_head(model.backbone(x))[0]
    assert (logits - mmseg_logits(mm, x)).abs().max() < 1e-4
    # again: from the cache, no request
    assert tool.main(["--config-file", str(config), url, str(tmp_path / "again.pth")]) == 0
    assert len(server.requests) == 1
    # a file whose name's hash does not match: refused, nothing written or cached
    shutil.copyfile(os.path.join(server.root, name), os.path.join(server.root, "bad-deadbeef.pth"))
    assert tool.main(["--config-file", str(config), f"{server.url}/bad-deadbeef.pth", str(tmp_path / "bad.pth")]) == 1
    err = capsys.readouterr().err
    assert "deadbeef" in err and "deleted" in err
    assert not (tmp_path / "bad.pth").exists() and _cache_files(server) == [name]


def _cfg_with_weights(config, weights):
    from detectron2.config import get_cfg
    from segdistill import add_segdistill_config

    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(str(config))
    cfg.MODEL.WEIGHTS = weights
    return cfg
