"""Training: the Trainer, lazy-config loops, CPU-safe DDP, hooks and config checks."""
from .checks import ConfigError, check_dataset_names, check_device
from .ddp import create_ddp_model
from .hooks import TrainingCurvesHook, TrainingProgressHook, unwrap_model
from .lazy import check_lazy_config, lazy_test, lazy_train
from .trainer import Trainer, check_weights_file

__all__ = ["Trainer", "create_ddp_model", "TrainingCurvesHook", "TrainingProgressHook", "unwrap_model", "lazy_train", "lazy_test",
           "check_lazy_config", "check_weights_file", "check_dataset_names", "check_device", "ConfigError"]
