"""Evaluators and the metrics behind them."""
from .metrics import confusion_matrix, metrics_from_confusion, per_class_iou
from .sem_seg import LabelSpace, SemSegEvaluator

__all__ = ["SemSegEvaluator", "LabelSpace", "confusion_matrix", "metrics_from_confusion", "per_class_iou"]
