"""A DetectionCheckpointer that converts foreign whole-model files (``MODEL.WEIGHTS``).

detectron2 loads ``MODEL.WEIGHTS`` with ``DetectionCheckpointer``; this subclass reads the
file safely first (:func:`segdistill.convert.io.load_checkpoint_file`) and, when it is an
mmsegmentation or CIRKD checkpoint (``MODEL.WEIGHTS_FORMAT`` or detected from its keys),
hands detectron2 the converted, checked state dict. The project's own checkpoints (and
``--resume``) go through detectron2's loader unchanged; a ``.pkl`` file (detectron2's and
Caffe2's model zoos), which detectron2 unpickles in full, must first pass an unpickler that
allows containers and numpy arrays only. A path that is a URL
(``https://``, ``detectron2://``) is fetched into the cache first (:mod:`.fetch`), so the
downloaded file takes exactly the path of a local one.
"""
from __future__ import annotations

import logging

from detectron2.checkpoint import DetectionCheckpointer

from .fetch import resolve_weights
from .io import check_pickle_file, load_checkpoint_file, unwrap_state_dict
from .load import MODEL_FORMATS, convert_model_state, segmentor_of
from .source_options import file_meta

__all__ = ["SegDistillCheckpointer"]

logger = logging.getLogger(__name__)


class SegDistillCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` + conversion of foreign files (see the module docstring)."""

    def __init__(self, model, save_dir: str = "", *, weights_format: str = "auto", key: str = "MODEL.WEIGHTS",
                 **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        if weights_format not in MODEL_FORMATS:
            raise ValueError(f"MODEL.WEIGHTS_FORMAT must be one of {list(MODEL_FORMATS)}, got {weights_format!r}")
        self.weights_format = weights_format
        self.key = key

    def load(self, path, *args, **kwargs):
        """detectron2's load of the local file ``path`` names (a URL fetched into the cache first)."""
        return super().load(resolve_weights(path, self.key) if path else path, *args, **kwargs)

    def _load_file(self, filename: str):
        """detectron2 unpickles ``.pkl`` files in full: such a file is first read with an
        unpickler that allows containers and numpy arrays only (:func:`check_pickle_file`)."""
        if filename.endswith(".pkl"):
            check_pickle_file(filename, key=self.key)
        return super()._load_file(filename)

    def _torch_load(self, f: str):
        """detectron2 calls this for every non-``.pkl`` file: read it once, safely, and hand
        back the project's own checkpoints as they are and foreign ones converted."""
        if self.weights_format == "detectron2":
            return super()._torch_load(f)
        obj = load_checkpoint_file(f, key=self.key)
        state, _ = unwrap_state_dict(obj)
        conv = convert_model_state(state, self.model, self.weights_format, source=f, key=self.key,
                                   meta=file_meta(obj))
        if conv is None:  # the project's own format (also --resume)
            return obj
        logger.info(conv.summary())
        _, prefix = segmentor_of(self.model)
        return {"model": {prefix + k: v for k, v in conv.state.items()}, "__author__": "segdistill.convert",
                "matching_heuristics": False}
