"""The keys of a lazy (``.py``) config file, checked before anything is built.

A lazy config is Python: ``train.max_iters = 5`` or ``train.devcie = "cpu"`` in a file only
adds a key nobody reads, and the run goes on with the defaults. :func:`check_lazy_config_keys`
walks the loaded config and refuses, in one :class:`LazyConfigKeyError` naming the file:

* a key of ``train`` (and of its ``amp``, ``ddp``, ``checkpointer``) that is not one of
  :func:`lazy_train_defaults` (the project's ``train`` settings, a superset of detectron2's
  lazy ``train``); ``train.ddp`` and ``train.checkpointer`` also take any argument of what
  receives them (``DistributedDataParallel``, ``PeriodicCheckpointer``);
* a key of ``dataloader`` other than ``train``, ``test`` and ``evaluator``;
* an argument of a ``LazyCall`` node (a dict with ``_target_``) that its target does not
  take (its signature, or any name when it takes ``**kwargs``), anywhere in the file.

Other plain nodes (the file's own top-level helper values, dicts passed as a call's
argument) are values, not settings: their keys are not checked, the calls inside them are.
:func:`load_lazy_config` loads a file, checks it, and applies command-line overrides (checked
by :mod:`.lazy_overrides`).
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple

from detectron2.config import LazyConfig
from detectron2.engine.hooks import PeriodicCheckpointer
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

from .checks import ConfigError
from .lazy_overrides import apply_lazy_overrides, target_accepts

__all__ = ["LazyConfigKeyError", "lazy_train_defaults", "LAZY_DATALOADER_PARTS", "check_lazy_config_keys",
           "load_lazy_config"]


class LazyConfigKeyError(ConfigError):
    """A lazy config file sets a key that nothing reads."""


def lazy_train_defaults() -> Dict[str, Any]:
    """The ``train`` settings of a lazy config and their defaults (``configs/common/train.py``
    takes them; train_net.py's lazy loop reads them); a new dict at every call."""
    return dict(
        output_dir="./output",
        init_checkpoint="",  # a local detectron2 checkpoint of the whole model, or ""
        max_iter=800,
        amp=dict(enabled=False, dtype="auto"),  # dtype: "auto" (fp16 on CUDA, bf16 on CPU), "bf16", "fp16"
        channels_last=False,  # the model's weights and input batches in channels_last memory format
        test_precision="fp32",  # evaluation under autocast: "fp32", "bf16", "fp16" (CUDA only)
        fold_bn=False,  # evaluation and inference with each convolution's BatchNorm folded into it
        ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
        checkpointer=dict(period=400, max_to_keep=100),
        eval_period=400,
        log_period=20,
        device="cuda",  # set "cpu" on a machine without a GPU (train.device=cpu)
        seed=-1,  # >= 0: a fixed seed (model init, data order, augmentation); -1: a random one
        cudnn_benchmark=False,
        # --eval-only: an empty init_checkpoint is an error unless allow_random_weights (tests); a
        # checkpoint covering less than min_matched_weights of the model (elements) is refused.
        allow_random_weights=False,
        min_matched_weights=0.9,
    )


#: The parts of ``dataloader`` the lazy loop reads.
LAZY_DATALOADER_PARTS = ("train", "test", "evaluator")


def _parameters(fn, skip: int) -> List[str]:
    return list(inspect.signature(fn).parameters)[skip:]


# Plain nodes passed as keyword arguments: besides their defaults' keys, the arguments of the
# receiver (``create_ddp_model`` passes what it does not use itself to DistributedDataParallel;
# the first parameter is given by the loop).
_RECEIVERS = {
    "train.ddp": lambda: _parameters(DistributedDataParallel, 1),
    "train.checkpointer": lambda: _parameters(PeriodicCheckpointer, 1),
}


def _schema() -> Dict[str, Any]:
    """Plain nodes whose keys are checked: a dict of their keys (a dict value: a checked sub-node)."""
    return {"train": lazy_train_defaults(), "dataloader": {part: None for part in LAZY_DATALOADER_PARTS}}


def _nearest(name: str, names: Sequence[str], prefix: str) -> List[str]:
    return [prefix + n for n in difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)]


def _walk(node: Any, path: str, schema: Optional[dict], problems: List[Tuple[str, str, List[str]]]) -> None:
    """Append (key, why, nearest valid keys) for every unknown key under ``node``."""
    prefix = f"{path}." if path else ""
    if isinstance(node, dict) and "_target_" in node:
        for k, v in node.items():
            if k == "_target_":
                continue
            ok, label, params = target_accepts(node["_target_"], k)
            if not ok:
                problems.append((prefix + k, f"{path} calls {label}, which takes no argument {k!r}",
                                 _nearest(k, params, prefix)))
            _walk(v, prefix + k, None, problems)
    elif isinstance(node, dict):
        if schema is not None:
            valid = list(schema) + [p for p in _RECEIVERS.get(path, list)() if p not in schema]
            for k in node:
                if k not in valid:
                    shown = ", ".join(valid[:20]) + (" ..." if len(valid) > 20 else "")
                    problems.append((prefix + str(k), f"{path or 'the config'} has no key {k!r} (its keys: {shown})",
                                     _nearest(str(k), valid, prefix)))
        for k, v in node.items():
            sub = schema.get(k) if schema is not None else None
            _walk(v, prefix + str(k), sub if isinstance(sub, dict) else None, problems)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _walk(v, f"{prefix}{i}", None, problems)


def check_lazy_config_keys(cfg, source: str) -> None:
    """Raise :class:`LazyConfigKeyError` for every key of the loaded lazy config ``cfg`` that
    nothing reads (module docstring); ``source`` is the file it was loaded from."""
    tree = OmegaConf.to_container(cfg, resolve=False)
    problems: List[Tuple[str, str, List[str]]] = []
    schema = _schema()
    for k, v in tree.items():
        _walk(v, k, schema.get(k) if isinstance(schema.get(k), dict) else None, problems)
    if not problems:
        return
    lines = []
    for key, why, near in problems:
        hint = f" Nearest valid keys: {', '.join(near)}." if near else ""
        lines.append(f"  {key!r}: {why}.{hint}")
    raise LazyConfigKeyError(
        f"{source} (or a file it imports) sets {len(problems)} key(s) that nothing reads (a misspelled "
        "setting would leave its default in force):\n" + "\n".join(lines)
        + "\nCorrect each name (nearest valid keys above) or remove it."
    )


def load_lazy_config(path: str, overrides: Sequence[str] = ()):
    """``LazyConfig.load(path)``, its keys checked (:func:`check_lazy_config_keys`), then the
    command-line ``overrides`` applied and checked (:func:`apply_lazy_overrides`)."""
    cfg = LazyConfig.load(path)
    check_lazy_config_keys(cfg, path)
    return apply_lazy_overrides(cfg, overrides)
