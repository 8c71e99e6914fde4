"""Training and running: the Trainer, lazy-config loops, CPU-safe DDP, hooks, the run's output folder, and the
anytime calibration driver (:mod:`.anytime`). Checked weight loading and deployed checkpoints are
:mod:`segdistill.convert`'s."""
from .ddp import broadcast_batchnorm_buffers, create_ddp_model
from .mixed_precision import (MixedPrecisionTrainer, build_train_step, fold_for_inference, inference_precision,
                              use_channels_last)
from .hooks import ExactResumeHook, TrainingCurvesHook, TrainingProgressHook, unwrap_model
from .lazy import check_lazy_config, lazy_evaluate, lazy_fold_bn, lazy_test, lazy_train, skip_backbone_init
from .run import INTERRUPTED_EXIT_CODE, OutputDirConflictError, RunOutput, exit_on_interrupt, setup_run
from .trainer import Trainer, load_evaluation_weights

__all__ = ["Trainer", "create_ddp_model", "broadcast_batchnorm_buffers", "ExactResumeHook", "TrainingCurvesHook",
           "TrainingProgressHook", "unwrap_model", "lazy_train", "lazy_test", "lazy_fold_bn", "lazy_evaluate", "check_lazy_config",
           "skip_backbone_init", "load_evaluation_weights", "OutputDirConflictError", "RunOutput", "setup_run",
           "exit_on_interrupt", "INTERRUPTED_EXIT_CODE", "MixedPrecisionTrainer", "build_train_step", "use_channels_last",
           "inference_precision", "fold_for_inference"]
