"""Configuration: every key the project adds (``add_segdistill_config``), config errors and the
checks that run before anything is built, and checked overrides of lazy (``.py``) configs.

The bottom layer of the package with ``data``: it imports nothing of segdistill's.
"""
from .checks import ConfigError, check_dataset_names, check_device
from .command_line import config_tool_parser, load_yaml_config
from .defaults import add_segdistill_config
from .lazy_overrides import LazyOverrideError, apply_lazy_overrides, check_lazy_override_key

__all__ = ["add_segdistill_config", "ConfigError", "check_dataset_names", "check_device", "LazyOverrideError",
           "apply_lazy_overrides", "check_lazy_override_key", "load_yaml_config", "config_tool_parser"]
