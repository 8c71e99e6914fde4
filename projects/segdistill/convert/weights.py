"""Loading whole-model weights, with a report of what matched and errors that say why not.

detectron2's checkpointer loads whatever keys match and only *logs* the rest, so a
checkpoint of another architecture (an undeployed ``Distiller`` checkpoint given to its
student's config) or no checkpoint at all leaves a randomly initialised model that
evaluates without a word. Here:

* :func:`load_weights` loads a checkpoint with detectron2's checkpointer and returns a
  :class:`LoadReport` (how much of the model's state the checkpoint covered, by number of
  elements, and which keys were missing, unexpected or of another shape);
* :func:`load_checked_weights` refuses a load that covered less than ``min_matched`` of
  the model (or any tensor of another shape, unless allowed), naming the checkpoint, the
  numbers and the likely reason: a training checkpoint of another meta-architecture (its
  weights under a prefix such as ``student.``), with the ``tools/deploy_model.py`` command
  that writes the deployed model;
* :func:`load_weights_for_evaluation` is what ``--eval-only`` uses: no weights at all is an
  error too, unless random weights are explicitly allowed (tests).

The teacher of a ``Distiller`` needs the same guarantees with ``min_matched=1.0``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import ConfigError
from .checkpointer import SegDistillCheckpointer
from .core import IGNORED_SUFFIXES
from .fetch import resolve_weights

__all__ = ["LoadReport", "WeightsMismatchError", "check_weights_file", "load_weights", "load_checked_weights",
           "load_weights_for_evaluation", "DEFAULT_MIN_MATCHED"]

logger = logging.getLogger(__name__)

#: Share of the model's state (tensor elements) a checkpoint must cover to be evaluated.
DEFAULT_MIN_MATCHED = 0.9


class WeightsMismatchError(ConfigError):
    """A checkpoint that does not fit the model it is loaded into (or no checkpoint at all)."""


def check_weights_file(path: str, key: str = "MODEL.WEIGHTS") -> str:
    """The local file of the weights ``path`` names (:func:`.fetch.resolve_weights`: a URL is
    downloaded into the cache unless it is there; ``""`` stays ``""``); FileNotFoundError for a
    local path that does not exist."""
    return resolve_weights(path, key)


@dataclass
class LoadReport:
    """What a checkpoint covered of a model's ``state_dict``."""

    path: str
    model_keys: Dict[str, int]  # key -> number of elements
    missing: List[str] = field(default_factory=list)  # includes the keys of another shape
    unexpected: List[str] = field(default_factory=list)
    incorrect_shapes: List[Tuple[str, tuple, tuple]] = field(default_factory=list)

    @property
    def counted_keys(self) -> Dict[str, int]:
        """The model's tensors that carry weights: BatchNorm's step counters are left out of every
        count (a checkpoint need not give them, and loading leaves them out of ``missing``)."""
        return {k: n for k, n in self.model_keys.items() if not k.endswith(IGNORED_SUFFIXES)}

    @property
    def loaded_keys(self) -> List[str]:
        missing = set(self.missing) | {k for k, _, _ in self.incorrect_shapes}
        return [k for k in self.counted_keys if k not in missing]

    @property
    def matched(self) -> float:
        """Share of the model's tensor elements (step counters excepted) that came from the checkpoint (0..1)."""
        counted = self.counted_keys
        total = sum(counted.values())
        return sum(counted[k] for k in self.loaded_keys) / total if total else 1.0

    def summary(self) -> str:
        n, total = len(self.loaded_keys), len(self.counted_keys)
        missing = [k for k in self.missing if not k.endswith(IGNORED_SUFFIXES)]
        unexpected = [k for k in self.unexpected if not k.endswith(IGNORED_SUFFIXES)]
        return (f"{self.matched:.1%} of the model's parameters and buffers by elements ({n} of {total} tensors; "
                f"BatchNorm step counters not counted) came from {self.path!r}; {len(missing)} missing, "
                f"{len(unexpected)} unexpected, {len(self.incorrect_shapes)} of another shape")


class _RecordingCheckpointer(SegDistillCheckpointer):
    """detectron2's checkpointer (foreign formats converted, :mod:`.checkpointer`),
    keeping the incompatible keys of its last model load (``_load_model`` is the
    checkpointer's documented override point)."""

    incompatible = None

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def load_weights(model: nn.Module, path: str, *, key: str = "MODEL.WEIGHTS", weights_format: str = "auto") -> LoadReport:
    """Load ``path`` into ``model`` (detectron2's checkpointer, its usual log; a foreign file of
    ``weights_format``, ``MODEL.WEIGHTS_FORMAT``, converted first) and report what matched."""
    local = check_weights_file(path, key)
    model = _unwrap(model)
    keys = {k: v.numel() for k, v in model.state_dict().items()}
    ckpt = _RecordingCheckpointer(model, weights_format=weights_format, key=key)
    ckpt.load(local, checkpointables=[])
    inc = ckpt.incompatible
    if inc is None:  # nothing was loaded (a checkpoint without "model")
        return LoadReport(local, keys, missing=list(keys))
    return LoadReport(local, keys, missing=list(inc.missing_keys), unexpected=list(inc.unexpected_keys),
                      incorrect_shapes=[tuple(s) for s in inc.incorrect_shapes])


def _prefix_hint(report: LoadReport) -> Optional[Tuple[str, str]]:
    """("checkpoint", p): the checkpoint holds the model under prefix p; ("model", p): the
    model holds the checkpoint's weights under p. None when neither explains the miss."""
    missing = set(report.missing)
    prefixes = {k.split(".", 1)[0] + "." for k in report.unexpected if "." in k}
    for p in sorted(prefixes):
        stripped = {k[len(p):] for k in report.unexpected if k.startswith(p)}
        if stripped and len(stripped & missing) >= 0.5 * len(missing):
            return "checkpoint", p
    prefixes = {k.split(".", 1)[0] + "." for k in report.missing if "." in k}
    unexpected = set(report.unexpected)
    for p in sorted(prefixes):
        stripped = {k[len(p):] for k in report.missing if k.startswith(p)}
        if stripped and len(stripped & unexpected) >= 0.5 * len(stripped):
            return "model", p
    return None


def _deploy_command(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    cfg = os.path.join(folder, "config.yaml")
    cfg = cfg if os.path.isfile(cfg) else "<the config it was trained with>"
    out = os.path.join(folder, "model_deploy.pth")
    return f"python tools/deploy_model.py --config-file {cfg} --output {out} MODEL.WEIGHTS {path}"


def load_checked_weights(
    model: nn.Module,
    path: str,
    *,
    key: str = "MODEL.WEIGHTS",
    min_matched: float = DEFAULT_MIN_MATCHED,
    allow_incorrect_shapes: bool = False,
    what: str = "the model",
    weights_format: str = "auto",
) -> LoadReport:
    """:func:`load_weights`, then :class:`WeightsMismatchError` when the checkpoint covered less
    than ``min_matched`` of the model's state (elements) or, unless ``allow_incorrect_shapes``,
    any tensor had another shape. The error names ``key``, the file, the numbers and the fix."""
    report = load_weights(model, path, key=key, weights_format=weights_format)
    shapes = report.incorrect_shapes if not allow_incorrect_shapes else []
    if report.matched >= min_matched and not shapes:
        return report
    lines = [f"{key} = {path!r} does not fit {what} ({type(_unwrap(model)).__name__}): {report.summary()}; "
             f"at least {min_matched:.0%} must match."]
    if shapes:
        lines.append("Tensors of another shape (checkpoint vs model): " + ", ".join(
            f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in shapes[:5]) + (" ..." if len(shapes) > 5 else "")
            + " (a checkpoint of another class count or width).")
    hint = _prefix_hint(report)
    if hint and hint[0] == "checkpoint":
        lines.append(
            f"The checkpoint holds this model's weights under {hint[1]!r}: it is a training checkpoint of another "
            f"meta-architecture (a Distiller keeps its student under 'student.'). Write its deployed model first:\n"
            f"  {_deploy_command(path)}\nand set {key} to the file it writes."
        )
    elif hint and hint[0] == "model":
        lines.append(
            f"This config's model keeps the checkpoint's weights under {hint[1]!r} (e.g. a Distiller config given "
            f"a deployed student checkpoint): evaluate the checkpoint with the config of the model it holds."
        )
    else:
        lines.append(f"Missing: {report.missing[:5]}{' ...' if len(report.missing) > 5 else ''}; unexpected: "
                     f"{report.unexpected[:5]}{' ...' if len(report.unexpected) > 5 else ''}. Is it a checkpoint "
                     "of this config's model?")
    raise WeightsMismatchError("\n".join(lines))


def load_weights_for_evaluation(
    model: nn.Module,
    path: str,
    *,
    key: str = "MODEL.WEIGHTS",
    allow_random: bool = False,
    allow_key: str = "TEST.ALLOW_RANDOM_WEIGHTS",
    min_matched: float = DEFAULT_MIN_MATCHED,
    weights_format: str = "auto",
) -> Optional[LoadReport]:
    """The weights of a model about to be evaluated: an empty ``path`` is an error unless
    ``allow_random`` (then a loud warning), a checkpoint that does not fit is an error
    (:func:`load_checked_weights`). Returns the report (None for random weights)."""
    if not path:
        if not allow_random:
            raise WeightsMismatchError(
                f"{key} is empty: the evaluation would run a randomly initialised model. Set {key} to a trained "
                f"checkpoint (e.g. OUTPUT_DIR/model_final.pth, or --resume to evaluate OUTPUT_DIR's last "
                f"checkpoint). Tests may set {allow_key} True to evaluate random weights."
            )
        logger.warning("%s\n%s is set: evaluating a model with RANDOM weights (%s is empty).\n%s",
                       "!" * 80, allow_key, key, "!" * 80)
        return None
    report = load_checked_weights(model, path, key=key, min_matched=min_matched, what="the evaluated model",
                                  weights_format=weights_format)
    if report.matched < 1.0:
        logger.warning("Evaluation weights: %s.", report.summary())
    return report
