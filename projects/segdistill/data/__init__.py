"""Datasets (registered on import), the semantic-segmentation mapper and label checks."""
from . import datasets  # noqa: F401  (registers every dataset)
from .labels import LabelValueError, check_label_values, read_dataset_label, read_label
from .mapper import RandomResizeRatio, SemSegDatasetMapper

__all__ = ["SemSegDatasetMapper", "RandomResizeRatio", "read_label", "read_dataset_label",
           "check_label_values", "LabelValueError"]
