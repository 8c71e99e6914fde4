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
that a component imported after a first call still gets its keys.

This module imports nothing of segdistill: the config layer is the bottom of the package.
"""
from __future__ import annotations

from typing import Callable, List

__all__ = ["register_config_hook", "remove_config_hook", "config_hooks", "run_config_hooks"]

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
