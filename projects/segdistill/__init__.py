"""segdistill: training-time supervision and distillation for semantic segmentation.

``import segdistill`` registers every backbone, head and meta-architecture with
detectron2's registries and every dataset with its catalogs, so that processes started by
``detectron2.engine.launch`` see them too.
"""
import warnings

# detectron2 (April 2024) decorates helpers with torch.jit.script, which torch 2.14 deprecates:
# one warning per helper on every import, none of them actionable here.
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)

from . import data  # noqa: F401  (dataset registration)
from . import modeling  # noqa: F401  (registries)
from . import hs3  # noqa: F401
from .config import add_segdistill_config

__version__ = "0.1.0"
__all__ = ["add_segdistill_config"]
