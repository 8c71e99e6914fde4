"""Foreign checkpoints: one key map per source format, checked against the target model.

* :mod:`.timm`, :mod:`.torchvision`, :mod:`.openmmlab` (mmsegmentation model zoo and
  OpenMMLab ImageNet weights), :mod:`.cirkd` (CIRKD / HWD): the key maps;
* :mod:`.core`: the rule engine and the fit check (:class:`CheckpointMismatchError`);
* :mod:`.io`: safe reading (``weights_only``, an allow-list of numpy types);
* :mod:`.load`: converting into a backbone body (``MODEL.TIMM.CHECKPOINT``) or a whole
  segmentor (``MODEL.WEIGHTS``, ``MODEL.DISTILL.TEACHER.WEIGHTS``);
* :mod:`.checkpointer`: ``SegDistillCheckpointer``, detectron2's checkpointer with the
  conversion of ``MODEL.WEIGHTS``.

``tools/convert_checkpoint.py`` writes a converted file once; docs/reproduce.md lists the
files and configs of the papers' tables.
"""
from .checkpointer import SegDistillCheckpointer
from .core import CheckpointMismatchError, Conversion
from .io import CheckpointReadError, load_checkpoint_file, unwrap_state_dict
from .load import (
    BACKBONE_FORMATS, MODEL_FORMATS, convert_backbone_state, convert_model_state, describe_target,
    detect_backbone_format, detect_model_format, load_backbone_weights, load_foreign_weights, load_model_weights,
    segmentor_of,
)

__all__ = [
    "CheckpointMismatchError", "CheckpointReadError", "Conversion", "BACKBONE_FORMATS", "MODEL_FORMATS",
    "convert_backbone_state", "convert_model_state", "describe_target", "detect_backbone_format",
    "detect_model_format", "load_backbone_weights", "load_checkpoint_file", "load_foreign_weights",
    "load_model_weights", "segmentor_of", "unwrap_state_dict", "SegDistillCheckpointer",
]

