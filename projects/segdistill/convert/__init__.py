"""Checkpoint files in and out: reading, foreign key maps, checked loading, deployed checkpoints.

* :mod:`.timm`, :mod:`.torchvision`, :mod:`.openmmlab` (mmsegmentation model zoo and
  OpenMMLab ImageNet weights), :mod:`.cirkd` (CIRKD / HWD): the key maps;
* :mod:`.core`: the rule engine and the fit check (:class:`CheckpointMismatchError`);
* :mod:`.io`: safe reading (``weights_only``, an allow-list of numpy types);
* :mod:`.contracts`: what the converters need of a model (a wrapped segmentor, a timm
  backbone's body and family, a head's registered name, a deployed state dict), written as
  the base classes the models implement: this package imports no model;
* :mod:`.source_options`: the shape-free options a whole-model file's source pins (HRNet
  fusion, ``align_corners``, the output resize rule), checked against the model's (:class:`SourceOptionsError`);
* :mod:`.load`: converting into a backbone body (``MODEL.TIMM.CHECKPOINT``) or a whole
  segmentor (``MODEL.WEIGHTS``, ``MODEL.DISTILL.TEACHER.WEIGHTS``);
* :mod:`.fetch`: weights named by URL (``https://``, ``detectron2://``) fetched once into a
  cache (hash-checked, renamed when complete), timm's named weights through huggingface_hub;
* :mod:`.checkpointer`: ``SegDistillCheckpointer``, detectron2's checkpointer with the
  conversion of ``MODEL.WEIGHTS``;
* :mod:`.weights`: checked loading (:class:`LoadReport`; too little matched, tensors of another
  shape or no weights at all are errors that say why);
* :mod:`.deploy`: the deployed checkpoint of a trained model (training-only parts dropped).

``tools/convert_checkpoint.py`` writes a converted file once; docs/reproduce.md lists the
files and configs of the papers' tables.
"""
from .checkpointer import SegDistillCheckpointer
from .contracts import (
    ConvertibleBackbone, ConvertibleHead, DeployableModel, SegmentorWrapper, backbone_family, head_key_map,
)
from .core import CheckpointMismatchError, Conversion
from .deploy import deployed_state_dict, save_deployed_checkpoint
from .fetch import (
    WeightsDownloadError, fetch_timm_weights, hash_prefix, is_remote, resolve_weights, weights_cache_dir,
)
from .io import CheckpointReadError, check_pickle_file, load_checkpoint_file, unwrap_state_dict
from .load import (
    BACKBONE_FORMATS, MODEL_FORMATS, convert_backbone_state, convert_model_state, convertible_parts, describe_target,
    detect_backbone_format, detect_model_format, load_backbone_weights, load_foreign_weights, load_model_weights,
    segmentor_of,
)
from .source_options import SourceOptionsError, file_meta
from .weights import (
    DEFAULT_MIN_MATCHED, LoadReport, WeightsMismatchError, check_weights_file, load_checked_weights, load_weights,
    load_weights_for_evaluation,
)

__all__ = [
    "CheckpointMismatchError", "CheckpointReadError", "Conversion", "BACKBONE_FORMATS", "MODEL_FORMATS",
    "convert_backbone_state", "convert_model_state", "convertible_parts", "describe_target", "detect_backbone_format",
    "detect_model_format", "load_backbone_weights", "load_checkpoint_file", "check_pickle_file", "load_foreign_weights",
    "load_model_weights", "segmentor_of", "file_meta", "unwrap_state_dict", "SegDistillCheckpointer",
    "SegmentorWrapper", "ConvertibleBackbone", "ConvertibleHead", "DeployableModel", "backbone_family", "head_key_map",
    "deployed_state_dict", "save_deployed_checkpoint", "SourceOptionsError",
    "DEFAULT_MIN_MATCHED", "LoadReport", "WeightsMismatchError", "check_weights_file", "load_checked_weights",
    "load_weights", "load_weights_for_evaluation",
    "WeightsDownloadError", "fetch_timm_weights", "hash_prefix", "is_remote", "resolve_weights", "weights_cache_dir",
]
