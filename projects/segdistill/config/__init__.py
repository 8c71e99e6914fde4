"""Configuration: every key the project adds (``add_segdistill_config``: the shared keys, then
each registered component's own keys through its config hook), the renamed keys' errors,
config errors and the checks that run before anything is built, and the checked keys and
overrides of lazy (``.py``) configs.

The bottom layer of the package with ``data``: it imports nothing of segdistill's.
"""
from .checks import ConfigError, check_dataset_names, check_device
from .command_line import config_tool_parser, load_yaml_config
from .defaults import add_segdistill_config
from .hooks import (
    KeysHook, SectionHook, SectionRegistry, config_hooks, register_config_hook, register_keys, remove_config_hook,
)
from .lazy_overrides import LazyOverrideError, apply_lazy_overrides, check_lazy_override_key
from .lazy_check import (
    LAZY_DATALOADER_PARTS, LazyConfigKeyError, check_lazy_config_keys, lazy_train_defaults, load_lazy_config,
)
from .precision import AMP_DTYPES, TEACHER_PRECISIONS, amp_dtype, device_type, precision_dtype, teacher_dtype
from .renamed_keys import RENAMED_KEYS

__all__ = ["add_segdistill_config", "register_config_hook", "remove_config_hook", "config_hooks", "register_keys",
           "KeysHook", "SectionHook",
           "SectionRegistry", "RENAMED_KEYS", "ConfigError", "check_dataset_names", "check_device", "LazyOverrideError",
           "apply_lazy_overrides", "check_lazy_override_key", "load_yaml_config", "config_tool_parser",
           "LazyConfigKeyError", "check_lazy_config_keys", "lazy_train_defaults", "load_lazy_config",
           "LAZY_DATALOADER_PARTS", "AMP_DTYPES", "TEACHER_PRECISIONS", "amp_dtype", "device_type", "precision_dtype",
           "teacher_dtype"]
