"""Config checks run before anything is built, so mistakes fail early and clearly."""
from __future__ import annotations

import torch

from detectron2.data import DatasetCatalog

__all__ = ["check_dataset_names", "check_device", "ConfigError"]


class ConfigError(ValueError):
    """A config value that cannot work, with what to write instead."""


def check_dataset_names(key: str, names) -> None:
    """Every name must be registered; a bare string (``("x")`` in YAML) is refused."""
    if isinstance(names, str):
        raise ConfigError(
            f"{key} is the string {names!r}, which would be read letter by letter: write a list "
            f"or tuple, e.g. {key.split('.')[-1]}: (\"{names}\",)"
        )
    registered = set(DatasetCatalog.list())
    missing = [n for n in names if n not in registered]
    if missing:
        raise ConfigError(
            f"{key} names unregistered dataset(s) {missing}. Registered datasets: "
            f"{sorted(registered)}. segdistill registers its datasets on `import segdistill`; "
            "a dataset of your own must be registered before the trainer is built."
        )


def check_device(key: str, device: str) -> None:
    """A CUDA device in the config on a machine without one is an error, not a silent CPU run."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"{key} is {device!r} but no CUDA device is available: add `{key} cpu` "
            "(or `train.device=cpu` for a lazy config) to the command line."
        )

