"""Training-time losses of the multi-exit segmentor (Self-Regulation, DS, HS3).

The distillation losses live in ``segdistill.modeling.distill`` (one registered loss per file).
"""
from .self_regulation import DeepSupervisionObjective, SelfRegulationObjective  # noqa: F401
from .hs3 import HS3Objective  # noqa: F401  (registers MODEL.EXITS.MODE "hs3")
