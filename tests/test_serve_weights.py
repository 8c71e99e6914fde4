"""tools/serve_weights.py: the loopback server (serves its folder only, counts requests, stops
when told and at the end of its lifetime), the mmsegmentation-layout teacher file it writes
(mmsegmentation's own model reads it), and the end-to-end run of weights by URL at toy size."""
from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request

import pytest
import torch

from conftest import load_script

serve_weights = load_script("serve_weights", "tools/serve_weights.py")
train_net = load_script("train_net", "train_net.py")


def _get(url: str, method: str = "GET"):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy for 127.0.0.1
    with opener.open(urllib.request.Request(url, method=method), timeout=10) as r:
        return r.status, r.headers.get("Content-Length"), r.read()


def _raw_get(server, path: str) -> int:
    """A GET of ``path`` as written (urllib would normalise ``..``): the status."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_server_serves_its_folder_only_counts_and_stops(tmp_path):
    root = tmp_path / "served"
    (root / "sub").mkdir(parents=True)
    (root / "a-0123abcd.pth").write_bytes(b"weights" * 1000)
    (root / "sub" / "b c.pth").write_bytes(b"b")
    (tmp_path / "secret.txt").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.txt", root / "link.txt")  # a link out of the folder
    with serve_weights.LoopbackServer(str(root), lifetime_s=60) as server:
        assert server.url == f"http://127.0.0.1:{server.port}" and server.port > 0
        assert _get(server.url_of("a-0123abcd.pth")) == (200, "7000", b"weights" * 1000)
        assert _get(server.url_of("sub/b c.pth")) == (200, "1", b"b")
        assert _get(server.url_of("a-0123abcd.pth"), "HEAD") == (200, "7000", b"")
        for missing in ("nope.pth", "sub", "link.txt"):
            with pytest.raises(urllib.error.HTTPError, match="404"):
                _get(server.url_of(missing))
        assert _raw_get(server, "/../secret.txt") == 404 and _raw_get(server, "/sub/../../secret.txt") == 404
        assert server.requests == ["/a-0123abcd.pth", "/sub/b%20c.pth", "/a-0123abcd.pth", "/nope.pth", "/sub",
                                   "/link.txt", "/../secret.txt", "/sub/../../secret.txt"]
    assert server.wait(0)  # stopped on leaving the block; the port no longer answers
    with pytest.raises(urllib.error.URLError):
        _get(server.url_of("a-0123abcd.pth"))
    server.stop()  # a second stop is harmless


def test_server_stops_at_the_end_of_its_lifetime(tmp_path):
    server = serve_weights.LoopbackServer(str(tmp_path), lifetime_s=0.5).start()
    (tmp_path / "w.pth").write_bytes(b"w")
    assert _get(server.url_of("w.pth"))[2] == b"w"
    assert server.wait(10)  # nobody called stop()
    with pytest.raises(urllib.error.URLError):
        _get(server.url_of("w.pth"))


def test_teacher_file_is_mmsegmentations_layout(tmp_path):
    """mmsegmentation's own EncoderDecoder (ResNetV1c-18, ASPPHead) loads the file strictly, and
    the teacher this project builds from the same file by URL-free loading gives its logits."""
    from mmseg_oracle import build_mmseg, mmseg_logits
    from segdistill.convert import load_checkpoint_file
    from segdistill.modeling.meta_arch.distill import build_teacher

    config = tmp_path / "teacher.yaml"
    config.write_text(serve_weights.TEACHER_YAML.format(root=serve_weights.ROOT))
    name = serve_weights.make_teacher_file(str(tmp_path), str(config))
    path = tmp_path / name
    assert serve_weights.sha256_of(path.read_bytes()).startswith(name.rsplit("-", 1)[1][:-len(".pth")])
    state = load_checkpoint_file(str(path))["state_dict"]
    mm = build_mmseg(dict(
        type="EncoderDecoder",
        backbone=dict(type="ResNetV1c", depth=18, num_stages=4, out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4),
                      strides=(1, 2, 1, 1), norm_cfg=dict(type="BN", requires_grad=True), norm_eval=False,
                      style="pytorch", contract_dilation=True),
        decode_head=dict(type="ASPPHead", in_channels=512, in_index=3, channels=32, dilations=(1, 12, 24, 36),
                         dropout_ratio=0.0, num_classes=10, norm_cfg=dict(type="BN", requires_grad=True),
                         align_corners=False, loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False,
                                                               loss_weight=1.0)),
    ))
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in mm.state_dict().items()}
    mm.load_state_dict(state, strict=True)
    teacher = build_teacher(str(config), str(path)).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = teacher.sem_seg_head(teacher.backbone(x))[0]
    assert (ours - mmseg_logits(mm, x)).abs().max() < 1e-4


def test_end_to_end_toy(tmp_path, monkeypatch):
    """The documented run, each train_net.py run in this process (the same main, without a
    process start): downloads in the first training and evaluation only, the cache holds the
    three files, the printed lines say so."""
    lines = []

    def in_process(argv, env, log):
        with monkeypatch.context() as m:
            for k in set(os.environ) | set(env):
                if k in env:
                    m.setenv(k, env[k])
                else:
                    m.delenv(k)
            train_net.main(train_net.argument_parser().parse_args(list(argv)))

    requests = serve_weights.end_to_end(str(tmp_path / "work"), iterations=1, out=lines.append, runner=in_process)
    assert [len(requests[k]) for k in ("train1", "eval1", "train2", "eval2")] == [2, 1, 0, 0]
    text = "\n".join(lines)
    cache = tmp_path / "work" / "cache"
    assert sorted(os.listdir(cache)) == sorted(r[1:] for r in requests["train1"] + requests["eval1"])
    assert "[train2] done" in text and "[eval2] done" in text and text.count("requests: none") == 2
    # what the runs logged: downloads first, the cache afterwards
    assert "(MODEL.DISTILL.TEACHER.WEIGHTS) to " + str(cache) in text
    assert "(MODEL.TIMM.CHECKPOINT) to " + str(cache) in text
    assert "MODEL.TIMM.CHECKPOINT = http://127.0.0.1:" in text and ": using the cached " + str(cache) in text
    assert "the backbone's ImageNet initialisation (http://127.0.0.1:" in text  # not read by --eval-only
    assert text.count("Task: sem_seg_teacher") == 2  # both evaluations scored student and teacher
    assert "the second training and evaluation made no request" in text
