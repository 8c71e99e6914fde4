"""Evaluators and the metrics behind them."""
from .metrics import confusion_matrix, metrics_from_confusion, per_class_iou
from .sem_seg import LabelSpace, SemSegEvaluator
from .label_spaces import build_label_spaces
from .coco_stuff import CocoStuffEvaluator  # noqa: F401  (evaluator_type coco_stuff_sem_seg)

__all__ = ["SemSegEvaluator", "LabelSpace", "build_label_spaces", "confusion_matrix", "metrics_from_confusion", "per_class_iou"]
