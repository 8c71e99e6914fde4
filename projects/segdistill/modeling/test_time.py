"""Test-time protocols: sliding-window inference and multi-scale + flip averaging.

:class:`TestTimeSegmentor` wraps any segmentor that follows detectron2's public contract
(a list of ``{"image": CxHxW, "height", "width"}`` in, ``[{"sem_seg": KxHxW logits}, ...]``
out at the requested ``height`` x ``width``), as Mask2Former's ``SemanticSegmentorWithTTA``
wraps its model. It only calls that forward, so it composes with any meta-architecture and
with however a model resizes its logits to the input.

* ``TEST.MODE whole`` (the default): the model's own forward, unchanged.
* ``TEST.MODE slide`` (mmsegmentation's ``slide_inference``): windows of
  ``TEST.SLIDE.CROP_SIZE`` (h, w) every ``TEST.SLIDE.STRIDE`` (h, w); the last window of a row
  or column is moved back so that it ends at the border (a full crop whenever the image is
  larger than the crop; a dimension smaller than the crop is one window of the image's
  size). Each window's logits are asked for at the window's size; overlapping logits are
  summed and divided by the count of windows covering each pixel.
* ``TEST.AUG.ENABLED`` (mmsegmentation 1.x's ``SegTTAModel`` with its TTA pipeline): one view per
  ratio of ``TEST.AUG.SCALES`` (the input resized to ``int(h * r + 0.5)`` x ``int(w * r + 0.5)``,
  bilinear, as mmcv's rescale rounds) and, with ``TEST.AUG.FLIP``, its horizontal flip. Each
  view is inferred in ``TEST.MODE`` (whole or slide) at the view's size, flipped back,
  resized to the output size (bilinear, ``MODEL.SEM_SEG_HEAD.ALIGN_CORNERS``), and the
  views' softmax probabilities are averaged (not their logits). ``sem_seg`` is then the log
  of that average: its argmax is the averaged prediction and its softmax gives back the
  averaged probabilities, so every consumer of logits (evaluators, confidence maps) reads it
  unchanged.

Slide and aug results at the input tensor's size are resized to the requested ``height`` x
``width`` like mmsegmentation's ``postprocess_result`` (bilinear, the head's align_corners).
Every ``sem_seg*`` tensor a model returns (``sem_seg_<exit>`` with ``EVAL_EXITS``,
``sem_seg_teacher``) is combined the same way; any other output is refused, because a
per-image answer such as an anytime model's chosen exit cannot be averaged over windows
or views. Models whose forward is such a per-image decision implement
:class:`WholeImageOnly`: wrapping one is a :class:`ConfigError`, and
:func:`check_whole_image_only` is what their ``from_config`` calls before anything is built.

Keys (this file's config hook): ``TEST.MODE``, ``TEST.SLIDE.CROP_SIZE``, ``TEST.SLIDE.STRIDE``,
``TEST.AUG.SCALES``; ``TEST.AUG.ENABLED`` and ``TEST.AUG.FLIP`` are detectron2's own keys
(its ``TEST.AUG.MIN_SIZES`` / ``MAX_SIZE`` are for detection and are not read here). Lazy
configs: a top-level ``test_time = L(TestTimeSegmentor)(mode=..., crop_size=..., ...)``
(the loop gives ``model``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from ..config import ConfigError, register_config_hook

__all__ = ["TestTimeSegmentor", "WholeImageOnly", "TEST_MODES", "add_test_time_config", "build_test_time_model",
           "check_test_time_config", "check_whole_image_only", "slide_windows", "uses_test_time"]

TEST_MODES = ("whole", "slide")
# mmsegmentation's img_ratios in its datasets' tta_pipeline
DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@register_config_hook
def add_test_time_config(cfg) -> None:
    """``TEST.MODE``, ``TEST.SLIDE.*``, ``TEST.AUG.SCALES`` (idempotent: adds only what is absent)."""
    if "MODE" not in cfg.TEST:
        # whole: the image in one forward; slide: overlapping windows (TEST.SLIDE), logits averaged.
        cfg.TEST.MODE = "whole"
    if "SLIDE" not in cfg.TEST:
        cfg.TEST.SLIDE = CN()
        # (h, w) of a window and the step between windows; mmsegmentation's Cityscapes 512x1024
        # models: crop (512, 1024), stride (341, 682); its 769x769 models: (769, 769), (513, 513).
        cfg.TEST.SLIDE.CROP_SIZE = (512, 1024)
        cfg.TEST.SLIDE.STRIDE = (341, 682)
    if "AUG" not in cfg.TEST:  # detectron2's get_cfg has it; a bare CfgNode may not
        cfg.TEST.AUG = CN({"ENABLED": False, "FLIP": True})
    if "SCALES" not in cfg.TEST.AUG:
        # TEST.AUG.ENABLED: one view per ratio of the input size (and its flip with TEST.AUG.FLIP),
        # softmax probabilities averaged (mmsegmentation's img_ratios by default).
        cfg.TEST.AUG.SCALES = DEFAULT_SCALES


def _pair(value, key: str) -> Tuple[int, int]:
    v = [value] * 2 if isinstance(value, int) else list(value)
    if len(v) != 2 or not all(isinstance(x, int) and x > 0 for x in v):
        raise ConfigError(f"{key} must be two positive integers (h, w), e.g. (512, 1024); got {value!r}.")
    return int(v[0]), int(v[1])


def _check(mode: str, crop_size, stride, scales, keys: Dict[str, str]):
    if mode not in TEST_MODES:
        raise ConfigError(f"{keys['mode']} {mode!r} is not a test mode; write one of {list(TEST_MODES)}.")
    crop, step = (_pair(crop_size, keys["crop_size"]), _pair(stride, keys["stride"])) if mode == "slide" else (None, None)
    scales = tuple(float(s) for s in scales)
    if not scales or any(s <= 0 for s in scales):
        raise ConfigError(f"{keys['scales']} must be one or more positive ratios, e.g. [0.75, 1.0, 1.25]; "
                          f"got {list(scales)}.")
    return crop, step, scales


_YAML_KEYS = {"mode": "TEST.MODE", "crop_size": "TEST.SLIDE.CROP_SIZE", "stride": "TEST.SLIDE.STRIDE",
              "scales": "TEST.AUG.SCALES"}


def check_test_time_config(cfg) -> None:
    """A ConfigError naming the key for an unknown ``TEST.MODE`` or bad slide / aug settings."""
    _check(cfg.TEST.MODE, cfg.TEST.SLIDE.CROP_SIZE, cfg.TEST.SLIDE.STRIDE, cfg.TEST.AUG.SCALES, _YAML_KEYS)


def uses_test_time(cfg) -> bool:
    """Whether the config asks for anything but the model's own whole-image forward."""
    return cfg.TEST.MODE != "whole" or bool(cfg.TEST.AUG.ENABLED)


def check_whole_image_only(cfg, what: str) -> None:
    """For models that answer per image (:class:`WholeImageOnly`): a ConfigError, before anything
    is built, when the config asks for slide or aug inference."""
    if uses_test_time(cfg):
        raise ConfigError(
            f"{what} runs whole images only (it chooses its answer per image, which windows or views cannot "
            f"average); the config asks for TEST.MODE {cfg.TEST.MODE!r}, TEST.AUG.ENABLED {cfg.TEST.AUG.ENABLED}. "
            "Write TEST.MODE whole and TEST.AUG.ENABLED False (lazy configs: remove test_time).")


class WholeImageOnly:
    """The contract of a segmentor whose forward is a per-image decision (e.g. which exit
    answers): it cannot be run in windows or views, and :class:`TestTimeSegmentor` refuses it."""


def slide_windows(h: int, w: int, crop: Tuple[int, int], stride: Tuple[int, int]) -> List[Tuple[int, int, int, int]]:
    """``(y1, y2, x1, x2)`` of every window, row by row, placed as mmsegmentation's
    ``slide_inference`` places them (the last one of a row / column ends at the border)."""
    (hc, wc), (hs, ws) = crop, stride
    rows = max(h - hc + hs - 1, 0) // hs + 1
    cols = max(w - wc + ws - 1, 0) // ws + 1
    out = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * hs + hc, h), min(c * ws + wc, w)
            out.append((max(y2 - hc, 0), y2, max(x2 - wc, 0), x2))
    return out


def _resize_image(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear (half-pixel centres, as cv2 and mmcv); a uint8 image stays uint8 (rounded)."""
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    if image.dtype == torch.uint8:
        out = out.round().clamp(0, 255).to(torch.uint8)
    return out


class TestTimeSegmentor(nn.Module):
    """A segmentor run in slide windows and / or multi-scale + flip views (module docstring).
    In training mode it is its model (``forward`` passes through)."""

    @configurable
    def __init__(self, *, model: nn.Module, mode: str = "whole", crop_size: Optional[Sequence[int]] = None,
                 stride: Optional[Sequence[int]] = None, scales: Sequence[float] = (1.0,), flip: bool = False,
                 align_corners: bool = False):
        super().__init__()
        if isinstance(model, WholeImageOnly):
            raise ConfigError(f"{type(model).__name__} runs whole images only: test-time mode {mode!r} with scales "
                              f"{list(scales)} and flip {flip} cannot wrap it; run it with TEST.MODE whole and "
                              "TEST.AUG.ENABLED False (lazy configs: no test_time).")
        self.crop_size, self.stride, self.scales = _check(
            mode, crop_size, stride, scales,
            {"mode": "mode", "crop_size": "crop_size", "stride": "stride", "scales": "scales"})
        self.model = model
        self.mode = mode
        self.flip = bool(flip)
        self.align_corners = bool(align_corners)
        self.train(model.training)

    @classmethod
    def from_config(cls, cfg, model):
        check_test_time_config(cfg)
        aug = cfg.TEST.AUG.ENABLED
        return {"model": model, "mode": cfg.TEST.MODE, "crop_size": tuple(cfg.TEST.SLIDE.CROP_SIZE),
                "stride": tuple(cfg.TEST.SLIDE.STRIDE), "scales": tuple(cfg.TEST.AUG.SCALES) if aug else (1.0,),
                "flip": bool(cfg.TEST.AUG.FLIP) if aug else False,
                "align_corners": bool(cfg.MODEL.SEM_SEG_HEAD.ALIGN_CORNERS)}

    @property
    def views(self) -> List[Tuple[float, bool]]:
        """``(scale ratio, flipped)`` of every view, in the order they run."""
        return [(s, f) for s in self.scales for f in ((False, True) if self.flip else (False,))]

    @property
    def averages_views(self) -> bool:
        return len(self.views) > 1 or self.views[0] != (1.0, False)

    def forward(self, batched_inputs: List[dict]):
        if self.training:
            return self.model(batched_inputs)
        return [self._infer_image(x) for x in batched_inputs]

    # ------------------------------------------------------------------ one image
    def _infer_image(self, inp: dict) -> Dict[str, torch.Tensor]:
        image = inp["image"]
        h, w = image.shape[-2:]
        out_hw = (int(inp.get("height", h)), int(inp.get("width", w)))
        if not self.averages_views:
            logits = self._infer_view(image)
            return {k: self._to_output(v, out_hw) for k, v in logits.items()}
        probs: Dict[str, torch.Tensor] = {}
        for scale, flipped in self.views:
            size = (int(h * scale + 0.5), int(w * scale + 0.5))
            view = image if size == (h, w) else _resize_image(image, size)
            if flipped:
                view = view.flip(-1)
            for k, v in self._infer_view(view).items():
                if flipped:
                    v = v.flip(-1)
                p = self._to_output(v, out_hw).softmax(0)
                probs[k] = probs[k] + p if k in probs else p
        tiny = torch.finfo(next(iter(probs.values())).dtype).tiny
        return {k: (p / len(self.views)).clamp_min(tiny).log() for k, p in probs.items()}

    def _to_output(self, logits: torch.Tensor, out_hw: Tuple[int, int]) -> torch.Tensor:
        if tuple(logits.shape[-2:]) == out_hw:
            return logits
        return F.interpolate(logits[None], size=out_hw, mode="bilinear", align_corners=self.align_corners)[0]

    def _run(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The model's logits for one image at that image's size."""
        h, w = image.shape[-2:]
        out = self.model([{"image": image, "height": h, "width": w}])[0]
        bad = {k: type(v).__name__ for k, v in out.items()
               if not (k.startswith("sem_seg") and isinstance(v, torch.Tensor) and v.dim() == 3)}
        if bad:
            raise TypeError(f"Test-time mode {self.mode!r} (views {self.views}) combines a model's sem_seg* logits "
                            f"(KxHxW tensors); {type(self.model).__name__} also returned {bad}, which cannot be "
                            "averaged. Run it with TEST.MODE whole and TEST.AUG.ENABLED False.")
        return out

    def _infer_view(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.mode == "whole":
            return self._run(image)
        h, w = image.shape[-2:]
        sums: Dict[str, torch.Tensor] = {}
        count = None
        for y1, y2, x1, x2 in slide_windows(h, w, self.crop_size, self.stride):
            for k, v in self._run(image[:, y1:y2, x1:x2]).items():
                if k not in sums:
                    sums[k] = v.new_zeros((v.shape[0], h, w))
                sums[k][:, y1:y2, x1:x2] += v
            if count is None:
                count = next(iter(sums.values())).new_zeros((1, h, w))
            count[:, y1:y2, x1:x2] += 1
        return {k: s / count for k, s in sums.items()}


def build_test_time_model(cfg, model: nn.Module) -> nn.Module:
    """``model`` itself for ``TEST.MODE whole`` without ``TEST.AUG.ENABLED``, else
    :class:`TestTimeSegmentor` around it (the config checked first)."""
    check_test_time_config(cfg)
    return TestTimeSegmentor(cfg, model) if uses_test_time(cfg) else model
