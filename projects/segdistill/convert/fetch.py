"""Weights named where people keep them: a URL fetched once into a cache, timm's named weights.

Every weights key (``MODEL.WEIGHTS``, ``MODEL.DISTILL.TEACHER.WEIGHTS``, ``MODEL.TIMM.CHECKPOINT``
and the lazy configs' ``train.init_checkpoint``, a backbone's ``checkpoint``, a teacher's
weights) goes through :func:`resolve_weights`, which returns a local file; the loaders then
read that file exactly as a file placed by hand (format detection, conversion,
``weights_only`` reading, the fit check, the source-option check).

* ``https://`` / ``http://`` URLs, and ``detectron2://`` (detectron2's model zoo,
  ``https://dl.fbaipublicfiles.com/detectron2/``), are downloaded once into the cache folder:
  ``$SEGDISTILL_CACHE`` when set, else torch.hub's checkpoints folder
  (``<torch.hub.get_dir()>/checkpoints``: ``$TORCH_HOME/hub/checkpoints``, by default
  ``~/.cache/torch/hub/checkpoints``), the folder ``torch.hub.load_state_dict_from_url`` and
  OpenMMLab's tools fill, so a file they fetched before is reused. A file is cached under the
  last part of its URL (torch.hub's rule); a later run finds it there and makes no request.
* A download is written to a temporary name in the cache folder and renamed when complete and
  checked, so an interrupted download never leaves a file that a later run trusts. A file whose
  name carries a hash (``name-<8 or more hex digits>.<ext>``, torch.hub's and OpenMMLab's
  convention, e.g. ``resnet18_v1c-b5776b93.pth``) must have a SHA-256 that starts with it.
* ``$SEGDISTILL_OFFLINE`` set to ``1`` never downloads: a remote file not in the cache is an
  error at once (what ``HF_HUB_OFFLINE=1`` is to the Hub's files; the test suite sets both).
  Without it, a machine without network fails within seconds too: name resolution fails at
  once, and a connection gets :data:`CONNECT_TIMEOUT_S` (a server that then stops sending,
  :data:`DOWNLOAD_TIMEOUT_S` without a byte). Every such error names the two ways out: the
  key set to a local copy of the file, or the key set to ``""`` (no weights: random start).
* ``MODEL.TIMM.PRETRAINED`` (:func:`fetch_timm_weights`): timm's weights of a ``model.tag``
  from the Hugging Face Hub through ``huggingface_hub`` into its usual cache (``$HF_HOME/hub``,
  by default ``~/.cache/huggingface/hub``; ``HF_HUB_OFFLINE=1`` never connects).
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional

import timm
import torch
from huggingface_hub import constants as hf_constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from detectron2.utils.file_io import Detectron2Handler

from ..config import ConfigError

__all__ = [
    "WeightsDownloadError", "REMOTE_PREFIXES", "CACHE_ENV", "is_remote", "weights_cache_dir", "cached_file_of",
    "hash_prefix", "resolve_weights", "fetch_timm_weights", "timm_weights_name", "DOWNLOAD_TIMEOUT_S",
    "CONNECT_TIMEOUT_S", "OFFLINE_ENV", "offline", "ways_out",
]

logger = logging.getLogger(__name__)

REMOTE_PREFIXES = ("https://", "http://", Detectron2Handler.PREFIX)
#: The environment variable naming the cache folder of downloaded weights.
CACHE_ENV = "SEGDISTILL_CACHE"
#: The environment variable that forbids downloads (``1``: a remote file must be in the cache).
OFFLINE_ENV = "SEGDISTILL_OFFLINE"
#: Seconds to reach the server (connection and TLS handshake): a machine whose network drops
#: packets fails after this, not after the operating system's minutes.
CONNECT_TIMEOUT_S = 10.0
#: Seconds without a byte from the server before a download is given up (no endless hang).
DOWNLOAD_TIMEOUT_S = 60.0
#: Seconds the Hub has to answer whether it holds a file (asked once, without retries).
HF_TIMEOUT_S = 10.0

# torch.hub's convention: the hash is the last "-<hex>" before the extension.
_HASH = re.compile(r"-([0-9a-f]{8,})\.[A-Za-z0-9]+$")


class WeightsDownloadError(ConfigError):
    """Weights named by a URL or a timm tag that could not be fetched (or failed their check)."""


def is_remote(path: str) -> bool:
    return bool(path) and path.startswith(REMOTE_PREFIXES)


def offline() -> bool:
    """``$SEGDISTILL_OFFLINE`` is set (``1``, ``true``, ``yes``, ``on``): nothing is downloaded."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def ways_out(key: str, filename: str) -> str:
    """The two ways past weights that cannot be fetched, as the KEY VALUE to write."""
    return (f"Either download the file on a machine with internet and point at the local copy: {key} "
            f"/path/to/{filename} ; or start without these weights (a random start): {key} \"\"")


def weights_cache_dir() -> str:
    """Where downloaded weights are kept: ``$SEGDISTILL_CACHE``, else torch.hub's checkpoints folder."""
    return os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join(torch.hub.get_dir(), "checkpoints"))


def _url_of(path: str) -> str:
    if path.startswith(Detectron2Handler.PREFIX):
        return Detectron2Handler.S3_DETECTRON2_PREFIX + path[len(Detectron2Handler.PREFIX):]
    return path


def cached_file_of(path: str) -> str:
    """The cache file of a remote ``path`` (whether or not it is there yet)."""
    name = os.path.basename(urllib.parse.urlparse(_url_of(path)).path)
    if not name:
        raise WeightsDownloadError(f"{path!r} names no file (its path ends with '/').")
    return os.path.join(weights_cache_dir(), name)


def hash_prefix(filename: str) -> Optional[str]:
    """The SHA-256 prefix a file name carries (``name-<hex>.ext``), or None."""
    m = _HASH.search(os.path.basename(filename))
    return m.group(1) if m else None


def _fail(url: str, key: str, why: str) -> WeightsDownloadError:
    name = os.path.basename(urllib.parse.urlparse(url).path) or "weights.pth"
    return WeightsDownloadError(
        f"Cannot download {key} = {url!r}: {why}. Nothing was cached. Check the URL and the network (a proxy: "
        f"https_proxy). {ways_out(key, name)}"
    )


class _ReadTimeout:
    """After the connection (``CONNECT_TIMEOUT_S``), reads wait ``DOWNLOAD_TIMEOUT_S`` for a byte."""

    def connect(self):
        super().connect()
        self.sock.settimeout(DOWNLOAD_TIMEOUT_S)


class _HTTPConnection(_ReadTimeout, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_ReadTimeout, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_HTTPSConnection, req)


def _download(url: str, dst: str, key: str) -> None:
    """``url`` -> ``dst`` through a temporary file in the same folder, renamed only when complete and checked."""
    folder = os.path.dirname(dst)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(dst) + ".", suffix=".partial", dir=folder)
    sha, got, start = hashlib.sha256(), 0, time.monotonic()
    logger.info("Downloading %s (%s) to %s ...", url, key, dst)
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "segdistill"})
            opener = urllib.request.build_opener(_HTTPHandler, _HTTPSHandler)
            with opener.open(request, timeout=CONNECT_TIMEOUT_S) as response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                while True:
                    chunk = response.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
                    sha.update(chunk)
                    got += len(chunk)
        # http.client returns what arrived when a connection with a Content-Length closes early
        if total is not None and got != total:
            raise _fail(url, key, f"the connection ended after {got} of {total} bytes")
        expected = hash_prefix(dst)
        digest = sha.hexdigest()
        if expected and not digest.startswith(expected):
            raise WeightsDownloadError(
                f"{key} = {url!r}: the downloaded file's SHA-256 is {digest[:len(expected)]}..., but its name says "
                f"{expected} (name-<hash>.ext: the hash prefix of the file's SHA-256). The download was deleted. "
                "The file on the server is not the one its name promises (or was corrupted on the way); download it "
                f"again, or check it and set {key} to a local copy."
            )
        os.replace(tmp, dst)
    except WeightsDownloadError:
        raise
    except urllib.error.HTTPError as e:
        raise _fail(url, key, f"HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise _fail(url, key, f"{type(reason).__name__}: {reason} (after {got} bytes, "
                              f"{time.monotonic() - start:.1f} s)") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("Downloaded %s: %d bytes in %.1f s%s.", dst, got, time.monotonic() - start,
                ", SHA-256 prefix checked" if hash_prefix(dst) else "")


def resolve_weights(path: str, key: str, *, missing_hint: str = "") -> str:
    """A local file holding the weights ``path`` names (a remote one fetched into the cache
    unless it is there), or ``""`` for an empty ``path``. A missing local file is a
    FileNotFoundError naming ``key`` (``missing_hint`` says what else to write)."""
    if not path:
        return ""
    if path.startswith("file://"):
        path = path[len("file://"):]
    if is_remote(path):
        dst = cached_file_of(path)
        if os.path.isfile(dst):
            logger.info("%s = %s: using the cached %s", key, path, dst)
            return dst
        if offline():
            raise WeightsDownloadError(
                f"{key} = {path!r} is not in the cache {dst} and ${OFFLINE_ENV} is set: nothing is downloaded. "
                f"Unset ${OFFLINE_ENV} on a machine with internet to download it once, or put the file at {dst}. "
                f"{ways_out(key, os.path.basename(dst))}")
        _download(_url_of(path), dst, key)
        return dst
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Weights file not found: {path!r} ({key}). Point {key} at a checkpoint file or at its URL "
            f"(https://..., detectron2://...; downloaded once into {weights_cache_dir()}, set ${CACHE_ENV} to "
            f"change it), or set {key} \"\" to start from random weights.{(' ' + missing_hint) if missing_hint else ''}"
        )
    return path


# ---------------------------------------------------------------------------------------------
# timm's named weights (MODEL.TIMM.PRETRAINED)
# ---------------------------------------------------------------------------------------------
def timm_weights_name(model_name: str, pretrained: str, key: str = "MODEL.TIMM.PRETRAINED") -> str:
    """``model.tag`` of the weights ``pretrained`` names for ``model_name``: ``"default"`` is
    timm's default tag of the model; a ``model.tag`` must be of ``model_name`` itself."""
    arch, _ = timm.models.split_model_name_tag(pretrained)
    if pretrained != "default" and arch != model_name:
        raise ConfigError(
            f"{key} {pretrained!r} names weights of {arch!r}, but MODEL.TIMM.NAME is {model_name!r}: write "
            f"'default' or one of {timm.list_pretrained(model_name + '.*')[:8]}."
        )
    name = model_name if pretrained == "default" else pretrained
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # timm's answer to a tag the model does not have
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ConfigError(
            f"{key} {pretrained!r}: timm has no weights {name!r}; those of {model_name}: "
            f"{timm.list_pretrained(model_name + '.*') or 'none'}."
        )
    return f"{model_name}.{cfg.tag}" if cfg.tag else model_name


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def fetch_timm_weights(model_name: str, pretrained: str, *, key: str = "MODEL.TIMM.PRETRAINED") -> str:
    """A local file of timm's weights ``pretrained`` (see :func:`timm_weights_name`) for
    ``model_name``: from the Hugging Face Hub's cache, downloaded there when missing (timm's own
    source); weights timm keeps only at a URL go through :func:`resolve_weights`.

    With no network and nothing cached, the error comes within seconds and names the weights,
    the cache folder and ``MODEL.TIMM.CHECKPOINT``: the cache is read first without a request
    (``HF_HUB_OFFLINE=1`` stops there), then the Hub is asked once, without huggingface_hub's
    retries (which wait tens of seconds on a machine without network), before downloading."""
    name = timm_weights_name(model_name, pretrained, key)
    cfg = timm.models.get_pretrained_cfg(name)
    if not cfg.hf_hub_id:
        return resolve_weights(cfg.url, f"{key} {pretrained!r} ({cfg.url})")
    repo, _, revision = cfg.hf_hub_id.partition("@")
    revision = revision or None
    filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for filename in filenames:
        try:
            path = hf_hub_download(repo, filename, revision=revision, local_files_only=True)
        except LocalEntryNotFoundError:
            continue
        logger.info("%s %r: timm's %s, cached at %s", key, pretrained, name, path)
        return path
    why = "HF_HUB_OFFLINE is set" if hf_constants.HF_HUB_OFFLINE else ""
    reasons = []
    for filename in [] if why else filenames:
        try:
            get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision), timeout=HF_TIMEOUT_S)
        except EntryNotFoundError:  # the repository holds the other file
            reasons.append(f"{filename}: not in the repository")
            continue
        except Exception as e:  # noqa: BLE001  (no network, a proxy, a missing repository: all end here)
            why = f"the Hub did not answer: {_first_line(e)}"
            break
        path = hf_hub_download(repo, filename, revision=revision, etag_timeout=HF_TIMEOUT_S,
                               library_name="timm", library_version=timm.__version__)
        logger.info("%s %r: timm's %s downloaded to %s", key, pretrained, name, path)
        return path
    why = why or "; ".join(reasons)
    raise WeightsDownloadError(
        f"{key} {pretrained!r}: timm's weights {name} (Hugging Face repository {repo}) are not in the cache "
        f"{hf_constants.HF_HUB_CACHE} and could not be downloaded ({why}). Offline, either fetch them once on a "
        f"machine with internet (the same config, or `python -c \"import timm; timm.create_model('{name}', "
        f"pretrained=True)\"`) and copy that cache folder ($HF_HOME/hub); or save the file and point at it: "
        f"MODEL.TIMM.CHECKPOINT /path/to/{name}.safetensors {key} \"\" ; or train the backbone from random "
        f"weights: {key} \"\""
    )
