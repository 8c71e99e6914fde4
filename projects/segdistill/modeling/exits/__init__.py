"""Multi-exit training, one home per method: the exits and their outputs (``heads``), the
objectives' contract and registry (``objective``), deep supervision (``ds``),
Self-Regulation (``self_regulation``), the ``rh`` exit head (``rh``: ADP-C's pooled
encoder-decoder; ``MODEL.EXITS.HEAD``) and HS3 with HS3-Fuse (``hs3``; its clusters file:
``hs3_clusters``). Importing the package imports every module in it, so each
``@register_exit_objective`` class registers its ``MODEL.EXITS.MODE`` (and its config keys,
through its ``add_config``) with no list to keep: a new mode is one new file here
(docs/multi_exit.md shows one).
"""
import importlib as _importlib
import pkgutil as _pkgutil

from .heads import (
    EXIT_HEADS, HEAD_FEATURE_PREFIX, ExitFusion, ExitHead, ExitHeadBase, ExitOutput, MultiExitOutputs,
    MultiLabelClassifier, build_exit_heads, check_exit_features, exit_head_class, exit_head_kwargs, exit_size,
    register_exit_head,
)
from .rh import RHExitHead
from .objective import EXIT_OBJECTIVES, ExitObjective, exit_modes, register_exit_objective, unregister_exit_objective
from .ds import DeepSupervisionObjective
from .self_regulation import SelfRegulationObjective
from .hs3 import HS3Fuse, HS3Objective

__all__ = [
    "ExitHeadBase", "EXIT_HEADS", "register_exit_head", "exit_head_class", "exit_head_kwargs", "RHExitHead",
    "ExitHead", "MultiLabelClassifier", "ExitOutput", "MultiExitOutputs", "ExitFusion", "build_exit_heads",
    "check_exit_features", "exit_size", "ExitObjective", "EXIT_OBJECTIVES", "register_exit_objective",
    "unregister_exit_objective", "exit_modes", "HEAD_FEATURE_PREFIX", "DeepSupervisionObjective",
    "SelfRegulationObjective", "HS3Objective", "HS3Fuse",
]

for _module in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_module.name}")
