"""Command-line overrides of lazy (``.py``) configs, checked against the config tree.

detectron2's ``LazyConfig.apply_overrides`` creates any key it is given, so a typo
(``train.max_iters=10``) is accepted silently and the run uses the default. Here every
``key=value`` is checked first, with this rule:

1. a key that exists in the config (a dict key, or a list index) is overridden;
2. a key that does not exist yet is accepted when its parent is a ``LazyCall`` node (a
   dict with ``_target_``) and the target accepts an argument of that name (a parameter
   of its signature, or any name when it takes ``**kwargs``): the override adds an
   argument of the call, e.g. ``dataloader.test.dataset.filter_empty=False``;
3. ``+key=value`` (Hydra's syntax for adding a key) adds any key on purpose;
4. anything else is a :class:`LazyOverrideError` naming the key, where the path stops
   matching, and the nearest valid keys, as yacs does for YAML configs.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Iterable, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from .checks import ConfigError

__all__ = ["LazyOverrideError", "apply_lazy_overrides", "check_lazy_override_key", "target_accepts"]

_ABSENT = object()


class LazyOverrideError(ConfigError):
    """A lazy-config override whose key is not in the config tree."""


def _parse(overrides: Sequence[str]) -> List[Tuple[str, bool]]:
    """(key, adds a key on purpose) for every override, with Hydra's parser when present."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
    except ImportError:  # detectron2's own fallback: plain key=value
        out = []
        for o in overrides:
            key = o.split("=", 1)[0].strip()
            out.append((key.lstrip("+"), key.startswith("+")))
        return out
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [(o.key_or_group, o.is_add() or o.is_force_add()) for o in parsed]


def _flat_keys(node: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "_target_":
                continue
            key = f"{prefix}{k}"
            yield key
            yield from _flat_keys(v, key + ".")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            key = f"{prefix}{i}"
            yield key
            yield from _flat_keys(v, key + ".")


def target_accepts(target: Any, name: str) -> Tuple[bool, str, List[str]]:
    """(accepted, the target's name, its parameters) for an argument ``name`` of a LazyCall
    ``target`` (a callable or its dotted name); a target that cannot be located or has no
    signature accepts anything (``instantiate`` reports it)."""
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        try:
            target = locate(target)
        except Exception:  # noqa: BLE001  (instantiate reports an unknown target itself)
            return True, str(target), []
    label = getattr(target, "__qualname__", None) or repr(target)
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # builtins without a signature: cannot tell
        return True, label, []
    names = [p for p in params if p != "self"]
    if name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True, label, names
    return False, f"{label}({', '.join(names)})", names


def _child(node: Any, part: str) -> Any:
    if isinstance(node, dict):
        return node.get(part, _ABSENT)
    if isinstance(node, list):
        try:
            i = int(part)
        except ValueError:
            return _ABSENT
        return node[i] if -len(node) <= i < len(node) else _ABSENT
    return _ABSENT


def check_lazy_override_key(tree: Any, key: str) -> None:
    """Raise :class:`LazyOverrideError` unless ``key`` may be set in ``tree`` (a config as
    plain containers, ``OmegaConf.to_container(cfg, resolve=False)``); see the module docstring."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts):
        parent_key = ".".join(parts[:i])
        child = _child(node, part)
        if child is not _ABSENT:
            node = child
            continue
        last = i == len(parts) - 1
        if not isinstance(node, (dict, list)):
            raise LazyOverrideError(
                f"Unknown config key {key!r}: {parent_key!r} is a value ({type(node).__name__} {node!r}), "
                "not a config with keys."
            )
        reason: Optional[str] = None
        if last and isinstance(node, dict) and "_target_" in node:
            ok, label, _ = target_accepts(node["_target_"], part)
            if ok:
                return
            reason = f"{parent_key or 'the config'} calls {label}, which takes no argument {part!r}"
        raise LazyOverrideError(_unknown_message(tree, key, parent_key, node, part, reason))


def _unknown_message(tree, key: str, parent_key: str, node, part: str, reason: Optional[str]) -> str:
    where = f"{parent_key!r} has no key {part!r}" if parent_key else f"the config has no top-level key {part!r}"
    all_keys = list(_flat_keys(tree))
    near = difflib.get_close_matches(key, all_keys, n=5, cutoff=0.6)
    prefix = f"{parent_key}." if parent_key else ""
    if isinstance(node, dict):
        names = [k for k in node if k != "_target_"]
        for k in difflib.get_close_matches(part, names, n=3, cutoff=0.5):
            if prefix + k not in near:
                near.append(prefix + k)
        siblings = [prefix + k for k in names]
    else:
        siblings = [f"{prefix}{i}" for i in range(len(node))]
    msg = f"Unknown config key {key!r}: {where}"
    if reason:
        msg += f" ({reason})"
    msg += "."
    if near:
        msg += f" Nearest valid keys: {', '.join(near)}."
    if siblings:
        shown = ", ".join(siblings[:20]) + (" ..." if len(siblings) > 20 else "")
        msg += f" Keys under {parent_key or 'the top level'}: {shown}."
    msg += f" To add a key the config does not set on purpose, write '+{key}=...'."
    return msg


def apply_lazy_overrides(cfg, overrides: Sequence[str]):
    """Check every ``key=value`` of ``overrides`` (module docstring), then apply them with
    detectron2's ``LazyConfig.apply_overrides``. Returns ``cfg``."""
    from detectron2.config import LazyConfig

    overrides = list(overrides)
    if not overrides:
        return cfg
    tree = OmegaConf.to_container(cfg, resolve=False)
    for key, adds in _parse(overrides):
        if not adds:
            check_lazy_override_key(tree, key)
    return LazyConfig.apply_overrides(cfg, overrides)
