"""The options a whole-model file's source computed with, checked against the model's.

Some options change what a network computes without changing any tensor's shape, so the
fit check (:func:`.core.check_fit`) cannot see them: a file loads completely and its logits
are wrong. Where the file's source pins such an option, :func:`check_source_options`
compares it with what the model computes (read through the contracts,
:class:`~.contracts.ConvertibleBackbone` ``fuse_upsample`` and
:class:`~.contracts.ConvertibleHead` ``align_corners`` and ``output_resize``) and raises
:class:`SourceOptionsError` naming each config key and the value the file needs.

Refused rather than set: the model is built (its layers, their modes) before its weights
load, and the same model may be loaded twice (a teacher, a converted file): changing a
built model behind its config would leave the config, the logs and the next run saying
something else than what ran.

What each source pins (docs/reproduce.md, "Options the file's source pins"):

* mmsegmentation (``mmseg``): its HRNet fuses branches bilinearly (``resize`` to the
  branch's size, ``align_corners=False``): ``MODEL.TIMM.HRNET_FUSE_UPSAMPLE bilinear``.
  ``align_corners`` is a config choice (False for the 512x1024 Cityscapes models, True
  for the 769x769 ones): pinned when the file's ``meta`` holds its config text with one
  value, or when the file's name holds its zoo crop ``512x1024`` / ``769x769``; not
  checked otherwise. Its ``EncoderDecoder`` resizes the decode head's logits to the input
  size (``resize(seg_logits, size=inputs.shape[2:])``): ``MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE
  input``. OpenMMLab whole-model files are this format.
* CIRKD (``cirkd``): every resize of its models aligns corners:
  ``MODEL.SEM_SEG_HEAD.ALIGN_CORNERS True``. (ResNets only: no fusion option.) Its models'
  ``forward`` returns the logits at the head's stride, and its evaluation (``eval.py``,
  ``predict_whole``) resizes them to the input size: ``MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE input``.
* the project's own checkpoints (``detectron2``): the file does not say; not checked.

ImageNet files (``MODEL.TIMM.CHECKPOINT``) pin nothing: they hold no head, and the
backbone is fine-tuned under the segmentation recipe's options (mmsegmentation and the HRNet
segmentation code both fine-tune HRNet ImageNet weights, trained with nearest fusion, with
bilinear fusion).
"""
from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Optional, Tuple

from .contracts import ConvertibleBackbone, ConvertibleHead
from .core import CheckpointMismatchError

__all__ = ["SourceOptionsError", "source_options", "model_options", "check_source_options", "file_meta",
           "FUSE_KEY", "ALIGN_KEY", "RESIZE_KEY"]

FUSE_KEY = "MODEL.TIMM.HRNET_FUSE_UPSAMPLE"
ALIGN_KEY = "MODEL.SEM_SEG_HEAD.ALIGN_CORNERS"
RESIZE_KEY = "MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE"

_ALIGN_IN_TEXT = re.compile(r"""['"]?align_corners['"]?\s*[=:]\s*(True|False)""")
_ALIGN_BY_CROP = {"769x769": True, "512x1024": False}


class SourceOptionsError(CheckpointMismatchError):
    """A config whose shape-free options contradict what the file's source computed with."""


def file_meta(obj: dict) -> Optional[dict]:
    """The ``meta`` dict of a checkpoint file (OpenMMLab keeps its config text there), if any."""
    meta = obj.get("meta")
    return meta if isinstance(meta, dict) else None


def _align_corners_of_mmseg_file(source: str, meta: Optional[Mapping]) -> Tuple[Optional[bool], str]:
    """(align_corners of an mmsegmentation file, how it is known); None when it cannot tell."""
    texts = [v for k, v in (meta or {}).items() if k in ("config", "cfg") and isinstance(v, str)]
    for text in texts:  # mmsegmentation 0.x keeps meta["config"], 1.x (mmengine) meta["cfg"]
        values = set(_ALIGN_IN_TEXT.findall(text))
        if len(values) == 1:
            return values.pop() == "True", "as the config text in the file's meta says"
    name = os.path.basename(source)
    for crop, value in _ALIGN_BY_CROP.items():
        if crop in name:
            return value, f"as its model-zoo name says ({crop})"
    return None, ""


def source_options(fmt: str, backbone: ConvertibleBackbone, *, source: str = "",
                   meta: Optional[Mapping] = None) -> Dict[str, Tuple[object, str]]:
    """{config key: (the value the file's source computed with, why)} for a whole-model file of
    format ``fmt`` ("mmseg", "cirkd"; others pin nothing) loaded into ``backbone``'s family."""
    pinned: Dict[str, Tuple[object, str]] = {}
    if fmt == "mmseg":
        if backbone.family == "hrnet":
            pinned[FUSE_KEY] = ("bilinear", "mmsegmentation's HRNet resizes branches bilinearly when it fuses them")
        align, how = _align_corners_of_mmseg_file(source, meta)
        if align is not None:
            pinned[ALIGN_KEY] = (align, f"mmsegmentation trained it with align_corners={align}, {how}")
        pinned[RESIZE_KEY] = ("input", "mmsegmentation resizes the logits to the input size")
    elif fmt == "cirkd":
        pinned[ALIGN_KEY] = (True, "CIRKD's models resize with align_corners=True")
        pinned[RESIZE_KEY] = ("input", "CIRKD's evaluation resizes the logits to the input size")
    return pinned


def model_options(backbone: ConvertibleBackbone, head: ConvertibleHead) -> Dict[str, object]:
    """{config key: value} of the shape-free options the model computes with."""
    options: Dict[str, object] = {ALIGN_KEY: head.align_corners, RESIZE_KEY: head.output_resize}
    if backbone.fuse_upsample:
        options[FUSE_KEY] = backbone.fuse_upsample
    return options


def check_source_options(fmt: str, backbone: ConvertibleBackbone, head: ConvertibleHead, *, source: str = "",
                         meta: Optional[Mapping] = None, key: str = "MODEL.WEIGHTS") -> None:
    """Raise :class:`SourceOptionsError` when the model computes with another value of an
    option the file's source pins (:func:`source_options`), naming each key and the value."""
    ours = model_options(backbone, head)
    wrong = [(k, v, why) for k, (v, why) in source_options(fmt, backbone, source=source, meta=meta).items()
             if k in ours and ours[k] != v]
    if not wrong:
        return
    lines = [f"{key} {source!r} ({fmt} format) comes from a code base that computes with other options than "
             "this config builds: its tensors fit, but the model would compute other logits. Set:"]
    lines += [f"  {k} {v}   (the config has {ours[k]}; {why})" for k, v, why in wrong]
    lines.append("(the file's source pins these options: docs/reproduce.md, \"Options the file's source pins\")")
    raise SourceOptionsError("\n".join(lines))
