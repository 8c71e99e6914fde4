"""Config hooks: how a component adds its own keys to ``add_segdistill_config``.

A *config hook* is a function ``hook(cfg)`` that adds the keys of one component (a
distillation loss's ``MODEL.DISTILL.<NAME>``, an exit mode's ``MODEL.EXITS.<MODE>``) with
their defaults. ``add_segdistill_config`` adds the shared keys first (those several
components read, in ``defaults.py``), then calls every registered hook in registration
order. The registries of the components register their classes' hooks
(``register_distill_loss``, ``register_exit_objective``), so a component's defaults live in
its own file and importing that file is all it takes for its keys to exist.

A hook must be idempotent, adding its keys only where they are absent:
``add_segdistill_config`` may run twice on one config, and it runs every hook each time so
that a component imported after a first call still gets its keys. :class:`SectionHook` is
the hook of a registered component: it creates the component's section once and lets the
component fill it; :class:`SectionRegistry` is a registry of such components (the
distillation losses, the exit modes) that registers their hooks.

This module imports nothing of segdistill: the config layer is the bottom of the package.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from detectron2.config import CfgNode as CN

__all__ = ["register_config_hook", "remove_config_hook", "config_hooks", "run_config_hooks", "SectionHook",
           "SectionRegistry", "KeysHook", "register_keys"]

ConfigHook = Callable[[object], None]

_HOOKS: List[ConfigHook] = []


def register_config_hook(hook: ConfigHook) -> ConfigHook:
    """Register ``hook(cfg)`` (usable as a decorator); registering it again changes nothing."""
    if not callable(hook):
        raise TypeError(f"A config hook must be callable, got {hook!r}.")
    if hook not in _HOOKS:
        _HOOKS.append(hook)
    return hook


def remove_config_hook(hook: ConfigHook) -> None:
    """Forget ``hook`` (a no-op when it is not registered): what unregistering a component does."""
    if hook in _HOOKS:
        _HOOKS.remove(hook)


def config_hooks() -> List[ConfigHook]:
    """The registered hooks, in the order ``add_segdistill_config`` calls them."""
    return list(_HOOKS)


def run_config_hooks(cfg) -> None:
    """Call every registered hook on ``cfg``."""
    for hook in config_hooks():
        hook(cfg)


@dataclass(frozen=True)
class SectionHook:
    """The config hook of a registered component: when ``<parent>.<NAME>`` (``name``
    upper-cased, e.g. ``MODEL.DISTILL.PD``) is absent, create it empty and call ``fill(cfg)``,
    which sets its keys (and may add a section it shares with other components, when absent).
    Two hooks of the same parent, name and ``fill`` are equal, so a registry can remove the
    hook it registered."""

    parent: str  # dotted path of the node that holds the sections, e.g. "MODEL.DISTILL"
    name: str  # the registered name
    fill: Callable[[CN], None]

    def __call__(self, cfg: CN) -> None:
        node = _node(cfg, self.parent)
        key = self.name.upper()
        if key in node:
            return
        node[key] = CN()
        self.fill(cfg)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one hook per file
class KeysHook:
    """The config hook of a component whose own keys sit in a node other components share
    (a head's ``MODEL.SEM_SEG_HEAD.PSP_*``): every key of ``defaults`` that ``parent`` lacks is
    set to (a copy of) its default. ``name``: the hook's name in logs and tests."""

    name: str
    parent: str  # dotted path of the shared node, e.g. "MODEL.SEM_SEG_HEAD"
    defaults: Tuple[Tuple[str, Any], ...]

    @property
    def __name__(self) -> str:
        return self.name

    def __call__(self, cfg: CN) -> None:
        node = _node(cfg, self.parent)
        for key, value in self.defaults:
            if key not in node:
                node[key] = copy.deepcopy(value)


def register_keys(name: str, parent: str, **defaults) -> KeysHook:
    """Register (and return) the :class:`KeysHook` adding ``defaults`` under ``parent``."""
    return register_config_hook(KeysHook(name, parent, tuple(defaults.items())))


def _node(cfg: CN, path: str) -> CN:
    node = cfg
    for part in path.split("."):
        node = node[part]
    return node


class SectionRegistry(dict):
    """``name -> class`` of registered components whose keys are the sections ``<parent>.<NAME>``.

    :meth:`register` is the class decorator: it checks the class (a subclass of ``base``, a
    name not registered to another class nor ``reserved``), sets ``cls.name`` and registers the
    :class:`SectionHook` that creates the class's section and calls its classmethod
    ``add_config(cfg)``; :meth:`unregister` undoes both.
    """

    def __init__(self, *, parent: str, base: type, what: str, reserved: Optional[Dict[str, str]] = None):
        """``parent``: e.g. ``"MODEL.DISTILL"``; ``what``: the components' name in errors;
        ``reserved``: names that cannot be registered, with the reason."""
        super().__init__()
        self.parent, self.base, self.what = parent, base, what
        self.reserved = dict(reserved or {})

    def register(self, name: str):
        def deco(cls):
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"{self.what} {name!r} must subclass {self.base.__name__}, got {cls!r}.")
            if name in self.reserved:
                raise ValueError(f"{self.what} {name!r} cannot be registered: {self.reserved[name]}.")
            if name in self and self[name] is not cls:
                raise ValueError(f"{self.what} {name!r} is already registered ({self[name].__name__}).")
            self[name] = cls
            cls.name = name
            register_config_hook(self._hook(cls))
            return cls

        return deco

    def unregister(self, name: str) -> None:
        """Remove ``name`` and its config hook; configs already made keep its keys."""
        remove_config_hook(self._hook(self.pop(name)))

    def _hook(self, cls) -> SectionHook:
        return SectionHook(self.parent, cls.name, cls.add_config)
