"""A run's setup and its output folder: nothing is written before the model and data exist.

detectron2's ``default_setup`` creates ``OUTPUT_DIR``, opens ``log.txt`` and replaces
``config.yaml`` before anything is built, so a run that fails at build time (a bad key
value, a missing file) leaves a folder whose ``config.yaml`` no longer describes its
checkpoints, and ``--resume`` from it breaks. Here the same work is split in two:

* :func:`setup_run` (instead of ``default_setup``): loggers on the console, the same
  environment/config log lines, seeds, cuDNN flag; the log lines are kept in memory;
  and a read-only check of the folder (:meth:`RunOutput.check`) so that a conflict fails
  before anything is built. It returns a :class:`RunOutput`.
* :meth:`RunOutput.open`, called by the trainer (and the evaluation path) once the model
  and the data loaders are built: creates the folder, writes the kept log lines and every
  later one to ``log.txt`` (``log.txt.rank<N>`` for other processes), then the config.

The config file rule. A folder "holds checkpoints" when it has ``last_checkpoint`` or a
``model_*.pth``. When it does and its ``config.yaml`` differs from this run's config:

* training without ``--resume`` is an error (:class:`OutputDirConflictError`) naming the
  differing keys, unless ``--overwrite-output`` is given;
* ``--resume`` replaces ``config.yaml`` (the config of the checkpoints written from now
  on) and logs the differing keys;
* ``--eval-only`` keeps ``config.yaml`` and writes its own config to ``config_eval.yaml``.

Ctrl-C during training (:func:`exit_on_interrupt`): the checkpoints written so far stay as
they are; the main process prints one line naming the last checkpoint and the command that
resumes from it, and the process exits with 130 (the shell's code for SIGINT), with no traceback.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import logging.handlers
import os
import shlex
import signal
import sys
import tempfile
import threading
from typing import Dict, Iterator, List, Optional, Sequence

from detectron2.config import CfgNode, LazyConfig
from detectron2.utils import comm
from detectron2.utils.collect_env import collect_env_info
from detectron2.utils.env import seed_all_rng
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from ..config import ConfigError

__all__ = ["RunOutput", "OutputDirConflictError", "setup_run", "output_dir_of", "LOGGER_NAMES", "exit_on_interrupt",
           "INTERRUPTED_EXIT_CODE"]

#: Loggers whose lines go to the console and to ``log.txt``.
LOGGER_NAMES = ("detectron2", "fvcore", "segdistill")
_PLAIN = logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s", datefmt="%m/%d %H:%M:%S")
_MODES = ("train", "resume", "eval")


class OutputDirConflictError(ConfigError):
    """OUTPUT_DIR holds checkpoints of another config and the run was not told what to do."""


def output_dir_of(cfg) -> str:
    """``OUTPUT_DIR`` of a YAML config or ``train.output_dir`` of a lazy one."""
    return cfg.OUTPUT_DIR if isinstance(cfg, CfgNode) else cfg.train.output_dir


class _Buffer(logging.handlers.BufferingHandler):
    """Keeps the records of a run until its output folder may be written (at most
    ``capacity``; never flushes by itself)."""

    def __init__(self, capacity: int = 100_000):
        super().__init__(capacity=capacity)
        self.setLevel(logging.DEBUG)

    def shouldFlush(self, record):  # noqa: N802 (logging's API)
        return False

    def emit(self, record):
        if len(self.buffer) < self.capacity:
            self.buffer.append(record)


# One run's handlers at a time in a process: a new run (setup_run, or a RunOutput opened
# without one) detaches the previous run's buffer and log file.
_buffer: Optional[_Buffer] = None
_file_handler: Optional[logging.Handler] = None


def _detach(handler: Optional[logging.Handler]) -> None:
    if handler is None:
        return
    for name in LOGGER_NAMES:
        logging.getLogger(name).removeHandler(handler)
    handler.close()


def _start_buffering() -> _Buffer:
    global _buffer
    _detach(_buffer)
    _buffer = _Buffer()
    for name in LOGGER_NAMES:
        logging.getLogger(name).addHandler(_buffer)
    return _buffer


def _take_records(buffer: Optional[_Buffer]) -> List[logging.LogRecord]:
    """The records ``buffer`` kept (none when it is not the current run's any more)."""
    global _buffer
    if buffer is None or buffer is not _buffer:
        return []
    records = list(buffer.buffer)
    _detach(buffer)
    _buffer = None
    return records


def _flatten(d, prefix="") -> Dict[str, object]:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def _differences(old_text: str, new_text: str, limit: int = 10) -> str:
    import yaml

    try:
        old, new = _flatten(yaml.safe_load(old_text) or {}), _flatten(yaml.safe_load(new_text) or {})
    except yaml.YAMLError:
        return "(the files differ)"
    keys = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))
    shown = "; ".join(f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in keys[:limit])
    return shown + (f"; ... ({len(keys)} keys)" if len(keys) > limit else "")


def _last_checkpoint(folder: str) -> Optional[str]:
    """The file ``folder/last_checkpoint`` names (detectron2's checkpointer writes it), or None."""
    path = os.path.join(folder, "last_checkpoint")
    if not folder or not os.path.isfile(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    return os.path.join(folder, name) if name else None


def _has_checkpoints(folder: str) -> List[str]:
    if not os.path.isdir(folder):
        return []
    files = os.listdir(folder)
    return sorted(f for f in files if f == "last_checkpoint" or (f.startswith("model_") and f.endswith(".pth")))


class RunOutput:
    """The output folder of one run (see the module docstring).

    ``mode``: "train", "resume" (``--resume``) or "eval" (``--eval-only``); ``overwrite``:
    ``--overwrite-output``. ``mode=None``: decided later, by :meth:`write_config` (a
    ``Trainer(cfg)`` built without one learns it from ``resume_or_load(resume)``); until then
    :meth:`open` creates the folder and the log but writes no config. The config is
    serialised when the object is made, so later changes to a lazy config (the trainer puts
    the model into ``optimizer.params``) do not reach ``config.yaml``.
    """

    def __init__(self, cfg, *, mode: Optional[str] = "train", overwrite: bool = False,
                 log_buffer: Optional[_Buffer] = None):
        if mode is not None and mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.output_dir = output_dir_of(cfg)
        self.mode = mode
        self.overwrite = overwrite
        self._is_yaml = isinstance(cfg, CfgNode)
        self._cfg = cfg.clone() if self._is_yaml else copy.deepcopy(cfg)
        self.config_text = self._serialise()
        self.opened = False
        self.config_written = False
        self._buffer = log_buffer  # the log lines of setup_run, written to log.txt by open()
        # A run from scratch (not --resume) writes over a folder's older checkpoints: until it
        # saves its own, the one there is not this run's.
        self._checkpoint_at_start = _last_checkpoint(self.output_dir)

    @classmethod
    def from_args(cls, cfg, args, log_buffer: Optional[_Buffer] = None) -> "RunOutput":
        mode = "eval" if args.eval_only else ("resume" if args.resume else "train")
        return cls(cfg, mode=mode, overwrite=args.overwrite_output, log_buffer=log_buffer)

    def _serialise(self) -> str:
        if self._is_yaml:
            return self._cfg.dump()
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "config.yaml")
            LazyConfig.save(self._cfg, path)
            with open(path) as f:
                return f.read()

    def interrupted_message(self, argv: Sequence[str]) -> str:
        """One line after Ctrl-C: this run's last checkpoint and the command (``argv``: the
        interrupted one, with ``--resume``) that continues from it."""
        last = _last_checkpoint(self.output_dir)
        if last is not None and self.mode == "train" and last == self._checkpoint_at_start:
            last = None  # the folder's older run, which this run started over
        args = [a for a in argv[1:] if a not in ("--resume", "--overwrite-output")]
        command = shlex.join([sys.executable, argv[0], "--resume", *args])
        if last is None:
            return (f"Training interrupted before its first checkpoint (nothing to keep in {self.output_dir}); "
                    f"to start again: {command}")
        return f"Training interrupted; last checkpoint: {last}; to resume from it: {command}"

    # -- the rule ----------------------------------------------------------------------------
    def _decide(self):
        """(where this run's config goes, the differences it replaces or None). Raises on a conflict."""
        folder = self.output_dir
        existing = os.path.join(folder, "config.yaml")
        checkpoints = _has_checkpoints(folder)
        if not checkpoints or not os.path.isfile(existing):
            return existing, None
        with open(existing) as f:
            old = f.read()
        if old == self.config_text:
            return existing, None
        diff = _differences(old, self.config_text)
        if self.mode == "eval":
            return os.path.join(folder, "config_eval.yaml"), None
        if self.mode == "train" and not self.overwrite:
            shown = ", ".join(checkpoints[:3]) + (" ..." if len(checkpoints) > 3 else "")
            raise OutputDirConflictError(
                f"OUTPUT_DIR {folder!r} holds checkpoints ({shown}) of another config; this run's config differs "
                f"in: {diff}. Pass --resume to continue that run with this config, choose another OUTPUT_DIR, or "
                "pass --overwrite-output to train from scratch there and replace its config.yaml."
            )
        return existing, diff

    def check(self) -> None:
        """Read-only: raise :class:`OutputDirConflictError` now rather than after the build."""
        if self.output_dir and self.mode is not None:
            self._decide()

    # -- writing -----------------------------------------------------------------------------
    def open(self) -> None:
        """Create the folder, start ``log.txt`` (with the lines logged so far), write the config."""
        global _file_handler
        if self.opened:
            return
        self.opened = True
        records = _take_records(self._buffer)
        if not self.output_dir:
            return
        rank = comm.get_rank()
        PathManager.mkdirs(self.output_dir)
        log = os.path.join(self.output_dir, "log.txt" + (f".rank{rank}" if rank > 0 else ""))
        handler = logging.StreamHandler(open(log, "a"))
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(_PLAIN)
        for r in records:
            handler.handle(r)
        _detach(_file_handler)
        _file_handler = handler
        for name in LOGGER_NAMES:
            logging.getLogger(name).addHandler(handler)
        if self.mode is not None:
            self.write_config()

    def write_config(self, mode: Optional[str] = None) -> None:
        """Write this run's config (main process) by the rule of the module docstring; ``mode``
        sets a mode that was left undecided."""
        if mode is not None and self.mode is None:
            self.mode = mode
        if self.mode is None:
            raise ValueError("RunOutput.write_config: the run's mode (train / resume / eval) is not known")
        if self.config_written or not self.output_dir or not comm.is_main_process():
            return
        path, replaced = self._decide()
        self.config_written = True
        if replaced:
            logging.getLogger("detectron2").warning(
                "%s: replacing the config of %s with this run's; it differs in: %s", path,
                "the run being resumed" if self.mode == "resume" else "the folder's checkpoints (--overwrite-output)",
                replaced)
        elif path.endswith("config_eval.yaml"):
            logging.getLogger("detectron2").info(
                "%s holds checkpoints of its own config.yaml: this evaluation's config goes to %s.",
                self.output_dir, path)
        PathManager.mkdirs(self.output_dir)
        if self._is_yaml:
            with PathManager.open(path, "w") as f:
                f.write(self.config_text)
        else:
            LazyConfig.save(self._cfg, path)
        logging.getLogger("detectron2").info("Full config saved to %s", path)


def setup_run(cfg, args) -> RunOutput:
    """detectron2's ``default_setup`` without writing anything (see the module docstring).
    Returns the run's :class:`RunOutput`, already checked (a conflict raises here)."""
    buffer = _start_buffering()
    rank = comm.get_rank()
    for name in LOGGER_NAMES:
        setup_logger(None, distributed_rank=rank, name=name)
    logger = logging.getLogger("detectron2")
    logger.info("Rank of current process: %d. World size: %d", rank, comm.get_world_size())
    logger.info("Environment info:\n%s", collect_env_info())
    logger.info("Command line arguments: %s", args)
    if args.config_file:
        with PathManager.open(args.config_file, "r") as f:
            logger.info("Contents of args.config_file=%s:\n%s", args.config_file, f.read())
    output = RunOutput.from_args(cfg, args, log_buffer=buffer)
    if isinstance(cfg, CfgNode):
        logger.info("Running with full config:\n%s", output.config_text)
    output.check()
    seed = cfg.SEED if isinstance(cfg, CfgNode) else cfg.train.get("seed", -1)
    seed_all_rng(None if seed < 0 else seed + rank)
    if not args.eval_only:
        import torch

        torch.backends.cudnn.benchmark = bool(
            cfg.CUDNN_BENCHMARK if isinstance(cfg, CfgNode) else cfg.train.get("cudnn_benchmark", False))
    return output


#: The exit status of a run stopped by Ctrl-C (128 + SIGINT, as a shell reports it).
INTERRUPTED_EXIT_CODE = 130


#: Seconds after a Ctrl-C that did not stop the run before it is delivered again.
INTERRUPT_REPEAT_S = 2.0


class _RepeatedInterrupt:
    """SIGINT raises KeyboardInterrupt, as Python's default handler does, and delivers SIGINT
    again after :data:`INTERRUPT_REPEAT_S` while the block is still running: Python drops a
    KeyboardInterrupt raised inside a finalizer (``__del__``, a weakref callback: "Exception
    ignored in ..."), so a single Ctrl-C could otherwise be lost and the run go on. Installed
    from the main thread only (signal handlers live there); removed when the block ends."""

    def __init__(self):
        self.timer: Optional[threading.Timer] = None
        self.previous = None

    def _again(self) -> None:
        self.timer = None
        os.kill(os.getpid(), signal.SIGINT)

    def handle(self, signum, frame):
        if self.timer is None:
            self.timer = threading.Timer(INTERRUPT_REPEAT_S, self._again)
            self.timer.daemon = True
            self.timer.start()
        raise KeyboardInterrupt

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return True

    def remove(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        signal.signal(signal.SIGINT, self.previous)


@contextlib.contextmanager
def exit_on_interrupt(output: RunOutput, argv: Optional[Sequence[str]] = None) -> Iterator[None]:
    """Turn Ctrl-C (KeyboardInterrupt) inside the block into one line on stderr from the main
    process (:meth:`RunOutput.interrupted_message`, ``argv`` defaults to ``sys.argv``) and
    ``SystemExit(130)``; checkpoints already written are kept, nothing new is saved (the
    interrupted iteration may be half done). A Ctrl-C that Python dropped (raised inside a
    finalizer) is delivered again (:class:`_RepeatedInterrupt`), so one Ctrl-C always stops the run."""
    repeat = _RepeatedInterrupt()
    installed = repeat.install()
    try:
        yield
    except KeyboardInterrupt:
        if installed:
            repeat.remove()
            installed = False
        if comm.is_main_process():
            print(output.interrupted_message(list(sys.argv if argv is None else argv)), file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
    finally:
        if installed:
            repeat.remove()
