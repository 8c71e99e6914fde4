#!/usr/bin/env python
"""Serve a folder of weight files over HTTP on the loopback interface, and run the project's
weights-by-URL path end to end against it, with no internet.

    python tools/serve_weights.py serve FOLDER [--port 0] [--seconds 600]
    python tools/serve_weights.py end-to-end [--work DIR] [--iterations 2]

``serve``: ``http://127.0.0.1:PORT/<file>`` for every regular file under FOLDER (a free port
unless --port; nothing outside FOLDER, no listing); it stops after --seconds or on Ctrl-C and
prints the requests it answered. Configs can then name the files by URL, e.g.
``MODEL.WEIGHTS http://127.0.0.1:PORT/model-1a2b3c4d.pth``, to check a download, a cache or an
offline machine's setup before the real URLs are used.

``end-to-end`` makes, in --work (a temporary folder unless given):

* a Distiller teacher checkpoint in mmsegmentation's layout (``{"meta", "state_dict"}``,
  ``backbone.stem.*``, ``decode_head.aspp_modules.*``, ...; a ResNet-18 V1c with an ASPP
  head, random weights) under a hash-prefixed name, as OpenMMLab publishes them;
* an ImageNet-style backbone file (a timm ``mobilenetv2_100`` classifier's ``state_dict``,
  random weights: nothing here has the real ones) under a hash-prefixed name;

serves them on the loopback interface, and runs ``train_net.py`` (one process per run, as a
user does) on ``configs/demo/distill/pd.yaml`` at toy size with every weight named by URL:
a short distillation training (``MODEL.TIMM.CHECKPOINT`` and
``MODEL.DISTILL.TEACHER.WEIGHTS`` URLs), then ``--eval-only`` with ``MODEL.WEIGHTS`` the URL
of the trained checkpoint (served under a hash-prefixed name too), then both again. It prints
each command, the requests each run made, what landed in the cache (``$SEGDISTILL_CACHE``,
set to ``WORK/cache``) and checks that the second pair made no request. Exit status 0 when
every check holds.

The server (:class:`LoopbackServer`) is the one the tests use (tests/test_fetch_weights.py).
"""
from __future__ import annotations

import argparse
import hashlib
import http.server
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from typing import Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))

import timm  # noqa: E402
import torch  # noqa: E402

import segdistill  # noqa: E402,F401  (registers the models)
from detectron2.modeling import build_model  # noqa: E402
from segdistill.config import load_yaml_config  # noqa: E402

#: The longest a server lives unless told otherwise: a server a test or a run forgets to stop
#: still goes away.
DEFAULT_LIFETIME_S = 600.0


class FileHandler(http.server.BaseHTTPRequestHandler):
    """``GET`` / ``HEAD`` ``/<relative path>``: a regular file under the server's root, else 404.

    Subclasses may override :meth:`file_name` (the request path -> the file's relative name)
    and :meth:`write_body` (how the bytes go out), e.g. to serve a connection that breaks."""

    server: "_HTTPServer"

    def file_name(self) -> str:
        """The requested file's name relative to the root (URL-decoded, no query)."""
        return urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")

    def write_body(self, f, length: int) -> None:
        shutil.copyfileobj(f, self.wfile, 1 << 20)

    def _file(self) -> Optional[str]:
        root = self.server.root
        path = os.path.realpath(os.path.join(root, self.file_name()))
        if os.path.commonpath([root, path]) != root or not os.path.isfile(path):
            return None  # outside the root (../, a link out of it), a folder, or missing
        return path

    def _answer(self, body: bool) -> None:
        self.server.record(self.path)
        path = self._file()
        if path is None:
            self.send_error(404, "Not Found")
            return
        length = os.path.getsize(path)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if body:
            with open(path, "rb") as f:
                self.write_body(f, length)

    def do_GET(self):  # noqa: N802  (http.server's name)
        self._answer(body=True)

    def do_HEAD(self):  # noqa: N802
        self._answer(body=False)

    def log_message(self, *args):  # the requests are recorded, not printed per line
        pass


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler, root: str):
        super().__init__(address, handler)
        self.root = root
        self._lock = threading.Lock()
        self.requests: List[str] = []

    def record(self, path: str) -> None:
        with self._lock:
            self.requests.append(path)


class LoopbackServer:
    """Files under ``root`` at ``http://127.0.0.1:<port>/`` (``port`` 0: a free one), served
    from a background thread between :meth:`start` and :meth:`stop` (or as a context manager),
    at most ``lifetime_s`` seconds. :attr:`requests` lists the request paths, in order."""

    def __init__(self, root: str, *, port: int = 0, lifetime_s: float = DEFAULT_LIFETIME_S,
                 handler: Callable[..., FileHandler] = FileHandler):
        os.makedirs(root, exist_ok=True)
        self.root = os.path.realpath(root)
        self.lifetime_s = lifetime_s
        self._httpd = _HTTPServer(("127.0.0.1", port), handler, self.root)
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: Optional[threading.Thread] = None
        self._timer: Optional[threading.Timer] = None
        self._stopped = threading.Event()  # set once the socket is closed
        self._stop_lock = threading.Lock()

    @property
    def requests(self) -> List[str]:
        with self._httpd._lock:
            return list(self._httpd.requests)

    def url_of(self, name: str) -> str:
        return f"{self.url}/{urllib.parse.quote(name)}"

    def start(self) -> "LoopbackServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"loopback-server-{self.port}", daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent; also called by the lifetime's timer).
        Returns once the port no longer accepts connections."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            if self._timer is not None and self._timer is not threading.current_thread():
                self._timer.cancel()
            if self._thread is not None:
                self._httpd.shutdown()
                self._thread.join(timeout=10)
            self._httpd.server_close()
            self._stopped.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the server stops (its lifetime, or :meth:`stop`); True if it has."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# The files of the end-to-end run
# ---------------------------------------------------------------------------------------------
def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_hashed(obj, folder: str, stem: str) -> str:
    """``torch.save(obj)`` as ``folder/<stem>-<first 8 hex digits of its SHA-256>.pth`` (torch.hub's
    and OpenMMLab's naming, which the download is checked against); returns the file name."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    name = f"{stem}-{sha256_of(data)[:8]}.pth"
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)
    return name


def add_hashed(path: str, folder: str, stem: str) -> str:
    """Copy the file ``path`` into ``folder`` under a hash-prefixed name; returns the name."""
    with open(path, "rb") as f:
        data = f.read()
    name = f"{stem}-{sha256_of(data)[:8]}.pth"
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)
    return name


# The tiny teacher: mmsegmentation's ResNetV1c-18 (deep stem, its dilation rule) with its
# ASPPHead, in this project's mmseg layout; 10 classes, the demo dataset's.
TEACHER_YAML = """\
_BASE_: "{root}/configs/demo/Base-Demo.yaml"
MODEL:
  WEIGHTS_FORMAT: "mmseg"
  TIMM:
    NAME: "resnet18"
    OUTPUT_STRIDE: 8
    STEM_TYPE: "deep"
    STEM_WIDTH: 32
    DILATION_RULE: "mmseg"
  SEM_SEG_HEAD:
    NAME: "SegDeepLabV3Head"
    LAYOUT: "mmseg"
    ASPP_CHANNELS: 32
    ASPP_DILATIONS: [12, 24, 36]
    ASPP_DROPOUT: 0.0
    OUTPUT_RESIZE: "input"
"""

# This project's names of that teacher -> mmsegmentation's (EncoderDecoder, ResNetV1c, ASPPHead):
# the inverse of the conversion's rules for this one architecture, so that the file is one
# mmsegmentation would have written.
_STEM = {"conv1.0": "stem.0", "conv1.1": "stem.1", "conv1.3": "stem.3", "conv1.4": "stem.4", "conv1.6": "stem.6",
         "bn1": "stem.7"}
_HEAD = {"aspp.pool": "image_pool.1", "aspp.project": "bottleneck"}


def mmseg_name(key: str) -> str:
    """One tensor name of the tiny teacher in mmsegmentation's layout."""
    if key.startswith("backbone.body."):
        rest = key[len("backbone.body."):]
        for ours, theirs in _STEM.items():
            if rest.startswith(ours + "."):
                return f"backbone.{theirs}{rest[len(ours):]}"
        return f"backbone.{rest}"
    rest = key[len("sem_seg_head."):]
    if rest.startswith("predictor."):
        return f"decode_head.conv_seg.{rest[len('predictor.'):]}"
    module, _, param = rest.rpartition(".")
    bn = module.endswith(".norm")
    module = module[: -len(".norm")] if bn else module
    if module.startswith("aspp.branches."):
        module = "aspp_modules." + module[len("aspp.branches."):]
    else:
        module = _HEAD[module]
    return f"decode_head.{module}.{'bn' if bn else 'conv'}.{param}"


def make_teacher_file(folder: str, teacher_yaml: str, seed: int = 0) -> str:
    """A random tiny teacher (``teacher_yaml``) saved as mmsegmentation saves a model: returns the
    file name (``deeplabv3_r18-d8_tiny_demo-<hash>.pth``)."""
    cfg = load_yaml_config(teacher_yaml, ["MODEL.WEIGHTS", "", "MODEL.TIMM.PRETRAINED", "", "MODEL.TIMM.CHECKPOINT", ""])
    torch.manual_seed(seed)
    model = build_model(cfg)
    state = {mmseg_name(k): v for k, v in model.state_dict().items()}
    classes = tuple(f"class{i}" for i in range(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES))
    return save_hashed({"meta": {"CLASSES": classes, "mmseg_version": "1.2.2"}, "state_dict": state}, folder,
                       "deeplabv3_r18-d8_tiny_demo")


def make_imagenet_file(folder: str, model_name: str = "mobilenetv2_100", seed: int = 0) -> str:
    """A timm ImageNet classifier's ``state_dict`` (random weights, classifier included, as timm's
    files are): returns the file name (``<model_name>_imagenet-<hash>.pth``)."""
    torch.manual_seed(seed)
    return save_hashed(timm.create_model(model_name).state_dict(), folder, f"{model_name}_imagenet")


# ---------------------------------------------------------------------------------------------
# The end-to-end run
# ---------------------------------------------------------------------------------------------
STUDENT_CONFIG = "configs/demo/distill/pd.yaml"


def train_opts(iterations: int) -> List[str]:
    """A toy schedule on the demo's mini training set (no evaluation: the next run's job)."""
    return [
        "DATASETS.TRAIN", '("segdistill_demo_mini_train",)', "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.WARMUP_ITERS", "1", "SOLVER.MAX_ITER", str(iterations), "SOLVER.CHECKPOINT_PERIOD", "1000",
        "INPUT.CROP.SIZE", "(64,64)", "DATALOADER.NUM_WORKERS", "0",
    ]


#: The evaluation: the demo's mini validation set.
EVAL_OPTS = ["DATASETS.TEST", '("segdistill_demo_mini_val",)', "DATALOADER.NUM_WORKERS", "0"]


def _cache_listing(cache: str) -> Dict[str, int]:
    return {n: os.path.getsize(os.path.join(cache, n)) for n in sorted(os.listdir(cache))} if os.path.isdir(cache) else {}


def run_train_net(argv: Sequence[str], env: Dict[str, str], log: str) -> None:
    """``python train_net.py ARGV`` in a process of its own with the environment ``env``; its
    output goes to ``log``."""
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_net.py"), *argv], cwd=ROOT, env=env,
                              stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"train_net.py exited with {proc.returncode} (log: {log}):\n{tail}")


# how detectron2's log file names the lines this run reports: the weights' downloads and cache
# hits (convert/fetch.py), what the trainer does with them, the evaluation's results
_REPORTED = re.compile(r"\] (segdistill\.convert\.fetch|segdistill\.engine\.trainer|d2\.evaluation\.testing) INFO: (.*)")


def _reported_lines(log: str) -> List[str]:
    """The lines of a run's ``OUTPUT_DIR/log.txt`` about its weights, and its results."""
    with open(log) as f:
        return [m[2].rstrip().replace("copypaste: ", "") for m in map(_REPORTED.search, f) if m]


def _quote(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def end_to_end(work: str, *, iterations: int = 2, out: Callable[[str], None] = print,
               runner: Callable[[Sequence[str], Dict[str, str], str], None] = run_train_net) -> Dict[str, List[str]]:
    """The documented run (see the module's docstring) in ``work``; returns each run's requests.
    ``runner(argv, env, log)`` runs ``train_net.py`` (default: :func:`run_train_net`).
    Raises RuntimeError when a run fails or a check does not hold."""
    work = os.path.abspath(work)
    served, cache, runs = (os.path.join(work, d) for d in ("served", "cache", "runs"))
    for d in (served, runs):
        os.makedirs(d, exist_ok=True)
    teacher_yaml = os.path.join(work, "teacher_mmseg_r18.yaml")
    with open(teacher_yaml, "w") as f:
        f.write(TEACHER_YAML.format(root=ROOT))
    teacher = make_teacher_file(served, teacher_yaml)
    body = make_imagenet_file(served, "mobilenetv2_100")
    out(f"served folder {served}: {teacher}, {body}")

    # the runs are processes of their own, as a user's are; the cache is theirs to fill
    env = dict(os.environ, SEGDISTILL_CACHE=cache, PYTHONPATH=os.pathsep.join(
        p for p in (os.path.join(ROOT, "projects"), os.environ.get("PYTHONPATH", "")) if p))
    env.pop("SEGDISTILL_OFFLINE", None)  # the server is on this machine: downloads allowed
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(var, None)  # a proxy would be asked for 127.0.0.1 too
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1"
    requests: Dict[str, List[str]] = {}
    with LoopbackServer(served) as server:
        out(f"serving on {server.url}; SEGDISTILL_CACHE={cache}")
        config = ["--config-file", STUDENT_CONFIG]
        # the model: a narrower student head, the tiny teacher; every weight by URL
        model = ["MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "16", "MODEL.DISTILL.TEACHER.CONFIG_FILE", teacher_yaml,
                "MODEL.DISTILL.TEACHER.WEIGHTS", server.url_of(teacher), "MODEL.TIMM.CHECKPOINT", server.url_of(body)]

        def run(name: str, argv: List[str]) -> List[str]:
            before = len(server.requests)
            argv = argv + ["OUTPUT_DIR", os.path.join(runs, name)]
            out(f"\n[{name}] python train_net.py {_quote(argv)}")
            start = time.monotonic()
            runner(argv, env, os.path.join(runs, f"{name}.log"))
            made = server.requests[before:]
            requests[name] = made
            out(f"[{name}] done in {time.monotonic() - start:.1f} s; requests: {made or 'none'}")
            for line in _reported_lines(os.path.join(runs, name, "log.txt")):
                out(f"[{name}]   log: {line}")
            return made

        for rnd in (1, 2):
            train_dir = os.path.join(runs, f"train{rnd}")
            run(f"train{rnd}", config + model + train_opts(iterations))
            if rnd == 1:
                # the trained model, published as a model zoo would publish it
                trained = add_hashed(os.path.join(train_dir, "model_final.pth"), served, "pd_mobilenetv2_demo")
                out(f"published {os.path.join(train_dir, 'model_final.pth')} as {trained}")
            run(f"eval{rnd}", config + ["--eval-only"] + model + ["MODEL.WEIGHTS", server.url_of(trained)] + EVAL_OPTS)

    listing = _cache_listing(cache)
    out(f"\ncache {cache}:")
    for name, size in listing.items():
        out(f"  {name}  {size} bytes")
    expected = {"train1": sorted(["/" + teacher, "/" + body]), "eval1": ["/" + trained], "train2": [], "eval2": []}
    got = {k: sorted(v) for k, v in requests.items()}
    if got != expected:
        raise RuntimeError(f"requests per run {got}, expected {expected}")
    if sorted(listing) != sorted([teacher, body, trained]):
        raise RuntimeError(f"the cache holds {sorted(listing)}, expected {sorted([teacher, body, trained])}")
    out("check: the first training downloaded the teacher and the ImageNet body, the first evaluation the trained "
        "model (the teacher from the cache, no ImageNet body: the weights hold the whole model); the second "
        "training and evaluation made no request.")
    return requests


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _serve(args) -> int:
    server = LoopbackServer(args.folder, port=args.port, lifetime_s=args.seconds)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    with server:
        files = sorted(os.path.relpath(os.path.join(d, f), server.root)
                       for d, _, fs in os.walk(server.root) for f in fs)
        print(f"Serving {server.root} on {server.url} for at most {args.seconds:.0f} s (Ctrl-C stops):")
        for f in files:
            print(f"  {server.url_of(f)}")
        sys.stdout.flush()
        try:
            server.wait()
        except KeyboardInterrupt:
            pass
    print(f"Stopped; {len(server.requests)} requests: {server.requests}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a folder on 127.0.0.1")
    s.add_argument("folder")
    s.add_argument("--port", type=int, default=0, help="0 (default): a free port")
    s.add_argument("--seconds", type=float, default=DEFAULT_LIFETIME_S, help="stop after this long (default 600)")
    e = sub.add_parser("end-to-end", help="weights by URL through train_net.py against a loopback server")
    e.add_argument("--work", default="", help="folder for the files, the cache and the runs (default: a temporary one)")
    e.add_argument("--iterations", type=int, default=2, help="training iterations of each run (default 2)")
    args = p.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    work = args.work or tempfile.mkdtemp(prefix="segdistill_weights_")
    try:
        end_to_end(work, iterations=args.iterations)
    except RuntimeError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
