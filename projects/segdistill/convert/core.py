"""Key maps: ordered regex rules from a source format's tensor names to this project's.

A source format (one module of this package each) writes its map as a list of
:class:`Rule`; the first rule whose pattern matches a source key (``re.fullmatch``) gives
its new name, or drops it on purpose (a classifier, a training-only part of the source).
:func:`apply_rules` renames a state dict and :func:`check_fit` compares the result with
the target's own state dict: a key of the file without a rule, a renamed key the model
does not have, a model tensor the file does not give, or another shape, is an error
(:class:`CheckpointMismatchError`) naming the file, the expected architecture and the
first unmatched keys. Nothing is ever loaded partially without an error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "Rule", "rule", "drop", "convmodule", "conv_bn", "plain", "prefixed", "Conversion", "CheckpointMismatchError", "apply_rules",
    "check_fit", "IGNORED_SUFFIXES",
]

#: Tensors a model may have that a file need not give (BatchNorm's counter).
IGNORED_SUFFIXES = ("num_batches_tracked",)


@dataclass(frozen=True)
class Rule:
    """``pattern`` (full match) -> ``target`` (a ``re`` template with ``\\g<name>`` groups, or
    None to drop the key on purpose, ``why`` saying why)."""

    pattern: "re.Pattern"
    target: Optional[Union[str, Callable[["re.Match"], str]]]
    why: str = ""


def rule(pattern: str, target: Union[str, Callable[["re.Match"], str]]) -> Rule:
    return Rule(re.compile(pattern), target)


def drop(pattern: str, why: str) -> Rule:
    return Rule(re.compile(pattern), None, why)


_BN_PARAMS = r"(?P<p>weight|bias|running_mean|running_var|num_batches_tracked)"


def convmodule(src: str, dst: str) -> List[Rule]:
    """OpenMMLab's ``ConvModule`` (``src.conv.*``, ``src.bn.*``) -> the project's
    conv-norm-ReLU (detectron2 ``Conv2d`` with ``norm``: ``dst.weight``, ``dst.norm.*``)."""
    return [
        rule(rf"{src}\.conv\.(?P<p>weight|bias)", rf"{dst}.\g<p>"),
        rule(rf"{src}\.bn\.{_BN_PARAMS}", rf"{dst}.norm.\g<p>"),
    ]


def conv_bn(src_conv: str, src_bn: str, dst: str) -> List[Rule]:
    """A ``Conv2d`` and a ``BatchNorm2d`` named separately -> a conv with its ``norm``."""
    return [
        rule(rf"{src_conv}\.(?P<p>weight|bias)", rf"{dst}.\g<p>"),
        rule(rf"{src_bn}\.{_BN_PARAMS}", rf"{dst}.norm.\g<p>"),
    ]


def plain(src: str, dst: str) -> List[Rule]:
    """A plain layer (``src.weight``, ``src.bias``, BN buffers) renamed as a whole."""
    return [rule(rf"{src}\.(?P<p>weight|bias|running_mean|running_var|num_batches_tracked)", rf"{dst}.\g<p>")]


def prefixed(rules: Iterable[Rule], src_prefix: str, dst_prefix: str) -> List[Rule]:
    """The same rules under a prefix on both sides (a backbone's map inside a whole model)."""
    out = []
    for r in rules:
        target = r.target
        if isinstance(target, str):
            target = dst_prefix + target
        elif callable(target):
            target = (lambda f: (lambda m: dst_prefix + f(m)))(target)
        out.append(Rule(re.compile(re.escape(src_prefix) + r.pattern.pattern), target, r.why))
    return out


@dataclass
class Conversion:
    """The result of renaming a source state dict."""

    source: str  # the file (or a description)
    source_format: str
    state: Dict[str, torch.Tensor] = field(default_factory=dict)  # target names
    mapped: List[Tuple[str, str]] = field(default_factory=list)  # (source, target)
    dropped: List[Tuple[str, str]] = field(default_factory=list)  # (source, why)
    unmatched: List[str] = field(default_factory=list)  # source keys without a rule
    duplicates: List[Tuple[str, str]] = field(default_factory=list)  # two source keys -> one target

    def summary(self, limit: int = 0) -> str:
        lines = [f"{self.source} ({self.source_format}): {len(self.mapped)} tensors mapped, "
                 f"{len(self.dropped)} dropped on purpose"]
        reasons: Dict[str, int] = {}
        for _, why in self.dropped:
            reasons[why] = reasons.get(why, 0) + 1
        lines += [f"  dropped {n}: {why}" for why, n in sorted(reasons.items())]
        if limit:
            lines += [f"  {s} -> {t}" for s, t in self.mapped[:limit]]
            if len(self.mapped) > limit:
                lines.append(f"  ... ({len(self.mapped) - limit} more)")
        return "\n".join(lines)


def apply_rules(state: Dict[str, torch.Tensor], rules: Sequence[Rule], *, source: str, source_format: str) -> Conversion:
    conv = Conversion(source=source, source_format=source_format)
    for key, value in state.items():
        for r in rules:
            m = r.pattern.fullmatch(key)
            if m is None:
                continue
            if r.target is None:
                conv.dropped.append((key, r.why))
            else:
                new = r.target(m) if callable(r.target) else m.expand(r.target)
                if new in conv.state:
                    conv.duplicates.append((key, new))
                conv.state[new] = value
                conv.mapped.append((key, new))
            break
        else:
            conv.unmatched.append(key)
    return conv


class CheckpointMismatchError(ValueError):
    """A checkpoint file whose tensors do not fit the model the config builds."""


def _first(items: Sequence, n: int = 8) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def check_fit(conv: Conversion, target: Dict[str, torch.Tensor], *, expected: str, looks_like: str = "",
              hint: str = "") -> None:
    """Raise :class:`CheckpointMismatchError` unless ``conv.state`` gives every tensor of
    ``target`` (BatchNorm counters excepted) with its shape and nothing else."""
    wanted = {k for k in target if not k.endswith(IGNORED_SUFFIXES)}
    given = set(conv.state)
    missing = sorted(wanted - given)
    unexpected = sorted(k for k in given - set(target) if not k.endswith(IGNORED_SUFFIXES))
    shapes = sorted(
        (k, tuple(conv.state[k].shape), tuple(target[k].shape))
        for k in given & set(target)
        if not k.endswith(IGNORED_SUFFIXES) and tuple(conv.state[k].shape) != tuple(target[k].shape)
    )
    if not (conv.unmatched or missing or unexpected or shapes or conv.duplicates):
        return
    src_of = {t: s for s, t in conv.mapped}
    lines = [
        f"Checkpoint {conv.source!r} does not fit the model of this config.",
        f"  expected: {expected}",
        f"  the file: {conv.source_format} format{f', looks like {looks_like}' if looks_like else ''} "
        f"({len(conv.mapped) + len(conv.dropped) + len(conv.unmatched)} tensors)",
    ]
    if conv.unmatched:
        lines.append(f"  {len(conv.unmatched)} tensors of the file have no place in the model: {_first(conv.unmatched)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} tensors of the file map to names the model does not have: "
                     f"{_first(f'{src_of[k]} -> {k}' for k in unexpected)}")
    if missing:
        lines.append(f"  {len(missing)} tensors of the model are not in the file: {_first(missing)}")
    if shapes:
        lines.append(f"  {len(shapes)} tensors have another shape (file vs model): "
                     f"{_first(f'{k}: {a} vs {b}' for k, a, b in shapes)}")
    own = sorted(set(conv.unmatched) & wanted)
    if own:  # listed above both as the file's and as the model's: say why
        lines.append(f"  {len(own)} tensors of the file already have the model's names ({_first(own, 3)}): the file is "
                     f"in this project's own format, not {conv.source_format}'s")
    if conv.duplicates:
        lines.append(f"  {len(conv.duplicates)} tensors of the file map to the same name: {_first(conv.duplicates)}")
    if hint:
        lines.append(f"  hint: {hint}")
    raise CheckpointMismatchError("\n".join(lines))
