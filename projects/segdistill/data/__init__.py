"""Datasets (registered on import), the semantic-segmentation mapper and label checks."""
from . import datasets  # noqa: F401  (registers every dataset)
from .labels import LabelValueError, check_label_values, read_dataset_label, read_label
from .mapper import RandomResizeRatio, SemSegDatasetMapper
from .build import SemSegTrainLoader, build_sem_seg_train_loader, check_eval_datasets
from .datasets.folder import UnreadableFileError
from .samplers import ResumableTrainingSampler
from .class_weights import config_class_weights, dataset_class_weights, enet_weights, median_frequency_weights
from .datasets.user_folders import register_config_datasets, register_folder_dataset

__all__ = ["SemSegDatasetMapper", "RandomResizeRatio", "read_label", "read_dataset_label",
           "check_label_values", "LabelValueError", "SemSegTrainLoader", "build_sem_seg_train_loader",
           "check_eval_datasets", "UnreadableFileError", "ResumableTrainingSampler", "config_class_weights",
           "dataset_class_weights", "enet_weights", "median_frequency_weights", "register_config_datasets",
           "register_folder_dataset"]
