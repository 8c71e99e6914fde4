"""Meta-architectures registered in detectron2's META_ARCH_REGISTRY."""
from .segmentor import SemanticSegmentorAnySize  # noqa: F401
from .multi_exit import MultiExitSegmentor  # noqa: F401
from .distill import Distiller  # noqa: F401
from .anytime import AnytimeSegmentor  # noqa: F401  (registration)
