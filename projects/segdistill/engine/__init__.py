"""Training: the Trainer, lazy-config loops, CPU-safe DDP, hooks, checked weight loading and the run's output folder."""
from .ddp import broadcast_batchnorm_buffers, create_ddp_model
from .hooks import ExactResumeHook, TrainingCurvesHook, TrainingProgressHook, unwrap_model
from .lazy import check_lazy_config, lazy_evaluate, lazy_test, lazy_train
from .run import OutputDirConflictError, RunOutput, setup_run
from .trainer import Trainer
from .weights import (
    LoadReport, WeightsMismatchError, check_weights_file, load_checked_weights, load_weights, load_weights_for_evaluation,
)

__all__ = ["Trainer", "create_ddp_model", "broadcast_batchnorm_buffers", "ExactResumeHook", "TrainingCurvesHook",
           "TrainingProgressHook", "unwrap_model", "lazy_train", "lazy_test", "lazy_evaluate", "check_lazy_config",
           "check_weights_file", "OutputDirConflictError", "RunOutput", "setup_run", "LoadReport",
           "WeightsMismatchError", "load_weights", "load_checked_weights", "load_weights_for_evaluation"]
