"""Datasets (registered on import), the semantic-segmentation mapper and label checks."""
from . import datasets  # noqa: F401  (registers every dataset)
from .labels import LabelValueError, check_label_values, read_dataset_label, read_label
from .mapper import RandomResizeRatio, SemSegDatasetMapper
from .build import SemSegTrainLoader, build_sem_seg_train_loader, check_eval_datasets
from .datasets.folder import UnreadableFileError
from .samplers import ResumableTrainingSampler

__all__ = ["SemSegDatasetMapper", "RandomResizeRatio", "read_label", "read_dataset_label",
           "check_label_values", "LabelValueError", "SemSegTrainLoader", "build_sem_seg_train_loader",
           "check_eval_datasets", "UnreadableFileError", "ResumableTrainingSampler"]
