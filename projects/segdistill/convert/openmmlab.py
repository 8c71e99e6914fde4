"""OpenMMLab formats: mmsegmentation model-zoo checkpoints and OpenMMLab ImageNet weights.

Backbones (mmsegmentation's ``backbone.*``; the ImageNet files of ``open-mmlab://`` /
mmcls / mmpretrain, with or without the ``backbone.`` prefix):

* ResNetV1c (``resnet*_v1c``): ``stem.{0,1,3,4,6,7}`` (three 3x3 conv-BN, 32-32-64) ->
  timm's deep stem ``conv1.{0,1,3,4,6}`` + ``bn1``; ``layer*`` have timm's names. The 7x7
  ResNetV1b/ResNet (``conv1``, ``bn1``) too.
* MobileNetV2: ``conv1.{conv,bn}`` -> ``conv_stem``/``bn1``; ``layer{L}.{j}.conv.{k}.{conv,bn}``
  -> ``blocks.{L-1}.{j}`` (expansion-1 blocks: depthwise, pointwise; the others: expansion,
  depthwise, projection); mmcls's ``conv2`` (1280 channels) and ``head`` are dropped.
* HRNet: mmsegmentation's HRNet has timm's names.

Decode heads (``decode_head.*``, ``auxiliary_head.*``) map onto this project's heads, which
reproduce mmsegmentation's with ``MODEL.SEM_SEG_HEAD.LAYOUT "mmseg"`` where the layouts
differ (see :func:`head_rules`). ``ConvModule`` (``X.conv``, ``X.bn``) becomes a conv with
its ``norm``; ``conv_seg`` becomes ``predictor``.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, List

from .contracts import head_key_map
from .core import Rule, convmodule, drop, plain, prefixed, rule

__all__ = ["backbone_rules", "detect_backbone", "detect_model", "model_rules", "head_rules", "HEAD_MAPS",
           "describe_model", "suggest_config"]

_HEAD = "part of the ImageNet classifier, not of the segmentation backbone"
_BN = r"(?P<p>weight|bias|running_mean|running_var|num_batches_tracked)"


# ---------------------------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------------------------
def detect_backbone(keys) -> bool:
    keys = {k[len("backbone."):] if k.startswith("backbone.") else k for k in keys}
    return "stem.0.weight" in keys or "conv1.conv.weight" in keys or "layer1.0.conv.0.conv.weight" in keys


def _resnet() -> List[Rule]:
    stem = {"0": "conv1.0", "1": "conv1.1", "3": "conv1.3", "4": "conv1.4", "6": "conv1.6", "7": "bn1"}
    return [
        rule(r"stem\.(?P<i>[013467])\.(?P<p>.*)", lambda m: f"{stem[m['i']]}.{m['p']}"),
        rule(r"(?P<k>(conv1|bn1|layer\d)\..*)", r"\g<k>"),
    ]


def _mobilenetv2(body) -> List[Rule]:
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv

    rules = [
        rule(r"conv1\.conv\.weight", "conv_stem.weight"),
        rule(rf"conv1\.bn\.{_BN}", r"bn1.\g<p>"),
        drop(r"conv2\..*", "the 1280-channel last conv of the classifier network"),
    ]
    for s, stage in enumerate(body.blocks):
        names = ["dw", "pw"] if isinstance(stage[0], DepthwiseSeparableConv) else ["pw", "dw", "pwl"]
        for k, name in enumerate(names):
            conv = f"conv_{name}"
            bn = {"dw": "bn1", "pw": "bn2"}[name] if len(names) == 2 else f"bn{k + 1}"
            src = rf"layer{s + 1}\.(?P<j>\d+)\.conv\.{k}"
            rules += [
                rule(rf"{src}\.conv\.weight", rf"blocks.{s}.\g<j>.{conv}.weight"),
                rule(rf"{src}\.bn\.{_BN}", rf"blocks.{s}.\g<j>.{bn}.\g<p>"),
            ]
    return rules


def backbone_rules(family: str, body=None) -> List[Rule]:
    """OpenMMLab backbone names (no ``backbone.`` prefix) -> timm body names."""
    head = [drop(r"(head|neck|fc)\..*", _HEAD)]
    if family == "resnet":
        return head + _resnet()
    if family == "mobilenetv2":
        return head + _mobilenetv2(body)
    if family == "hrnet":
        return head + [drop(r"(incre_modules|downsamp_modules|final_layer|classifier)\..*", _HEAD),
                       rule(r"(?P<k>.*)", r"\g<k>")]
    raise ValueError(f"No OpenMMLab key map for a {family!r} backbone (ResNet, MobileNetV2 and HRNet have one).")


# ---------------------------------------------------------------------------------------------
# Whole mmsegmentation models
# ---------------------------------------------------------------------------------------------
def detect_model(keys) -> bool:
    return any(k.startswith("decode_head.") for k in keys)


def _sep(src: str, dst: str) -> List[Rule]:
    """mmcv's DepthwiseSeparableConvModule -> the project's SeparableConvNormReLU."""
    return convmodule(rf"{src}\.depthwise_conv", rf"{dst}.depthwise") + convmodule(
        rf"{src}\.pointwise_conv", rf"{dst}.pointwise"
    )


def _aspp(d: str, h: str, separable: bool) -> List[Rule]:
    rules = convmodule(rf"{d}\.image_pool\.1", f"{h}.aspp.pool")
    if separable:  # the 1x1 branch stays a ConvModule, the dilated ones are separable
        rules += _sep(rf"{d}\.aspp_modules\.(?P<i>[1-9]\d*)", rf"{h}.aspp.branches.\g<i>")
    rules += convmodule(rf"{d}\.aspp_modules\.(?P<i>\d+)", rf"{h}.aspp.branches.\g<i>")
    rules += convmodule(rf"{d}\.bottleneck", f"{h}.aspp.project")
    return rules


def _seg(d: str, h: str) -> List[Rule]:
    return plain(rf"{d}\.conv_seg", f"{h}.predictor")


def _deeplabv3plus(d: str, h: str) -> List[Rule]:  # DepthwiseSeparableASPPHead
    return _aspp(d, h, True) + convmodule(rf"{d}\.c1_bottleneck", f"{h}.c1_bottleneck") + _sep(
        rf"{d}\.sep_bottleneck\.(?P<i>\d+)", rf"{h}.sep_bottleneck.\g<i>") + _seg(d, h)


def _deeplabv3(d: str, h: str) -> List[Rule]:  # ASPPHead
    return _aspp(d, h, False) + _seg(d, h)


def _psp(d: str, h: str) -> List[Rule]:
    return convmodule(rf"{d}\.psp_modules\.(?P<i>\d+)\.1", rf"{h}.ppm.stages.\g<i>") + convmodule(
        rf"{d}\.bottleneck", f"{h}.bottleneck") + _seg(d, h)


def _hrnetv2(d: str, h: str) -> List[Rule]:  # FCNHead with resize_concat, one 1x1 conv
    return convmodule(rf"{d}\.convs\.0", f"{h}.fuse") + _seg(d, h)


def _fcn(d: str, h: str) -> List[Rule]:
    return convmodule(rf"{d}\.convs\.(?P<i>\d+)", rf"{h}.convs.\g<i>") + convmodule(
        rf"{d}\.conv_cat", f"{h}.fuse") + _seg(d, h)


def _isa(d: str, h: str) -> List[Rule]:
    rel = rf"{d}\.(?P<r>global|local)_relation"
    hr = rf"{h}.\g<r>_relation"
    return (
        convmodule(rf"{d}\.in_conv", f"{h}.in_conv") + convmodule(rf"{d}\.out_conv", f"{h}.out_conv")
        + convmodule(rf"{rel}\.(?P<q>key|query)_project\.(?P<i>\d+)", rf"{hr}.\g<q>_project.\g<i>")
        + plain(rf"{rel}\.value_project", f"{hr}.value_project")
        + convmodule(rf"{rel}\.output_project", f"{hr}.output_project") + _seg(d, h)
    )


def _ocr(d: str, h: str) -> List[Rule]:  # CascadeEncoderDecoder: [FCNHead (soft regions), OCRHead]
    ocb = rf"{d}\.1\.object_context_block"
    return (
        convmodule(rf"{d}\.0\.convs\.0", f"{h}.region_head.0") + plain(rf"{d}\.0\.conv_seg", f"{h}.region_head.1")
        + convmodule(rf"{d}\.1\.bottleneck", f"{h}.pixel_conv")
        + convmodule(rf"{ocb}\.(?P<q>query|key)_project\.(?P<i>\d+)", rf"{h}.context.\g<q>.\g<i>")
        + convmodule(rf"{ocb}\.value_project", f"{h}.context.value.0")
        + convmodule(rf"{ocb}\.out_project", f"{h}.context.up.0")
        + convmodule(rf"{ocb}\.bottleneck", f"{h}.context.fuse")
        + plain(rf"{d}\.1\.conv_seg", f"{h}.predictor")
    )


#: registered head class name -> the map of its mmsegmentation decode head(s): ``(d, h)`` -> rules
#: from the file's prefix ``d`` to the head's ``h``
HEAD_MAPS: Dict[str, Callable[[str, str], List[Rule]]] = {
    "SegDeepLabV3PlusHead": _deeplabv3plus, "SegDeepLabV3Head": _deeplabv3, "PSPHead": _psp,
    "HRNetV2Head": _hrnetv2, "FCNHead": _fcn, "ISAHead": _isa, "OCRHead": _ocr,
}


def head_rules(head, d: str = r"decode_head", h: str = "sem_seg_head") -> List[Rule]:
    """mmsegmentation's decode head(s) -> the project's head ``head`` (an instance; its map
    chosen by its registered class name, :func:`~.contracts.head_key_map`)."""
    return head_key_map(head, HEAD_MAPS, "mmsegmentation")(d, h)


def model_rules(body, family: str, head) -> List[Rule]:
    rules = prefixed(backbone_rules(family, body), "backbone.", "backbone.body.")
    rules += head_rules(head)
    if head.aux_head is not None:
        rules += convmodule(r"auxiliary_head\.convs\.0", "sem_seg_head.aux_head.conv")
        rules += plain(r"auxiliary_head\.conv_seg", "sem_seg_head.aux_head.predictor")
    return rules


# ---------------------------------------------------------------------------------------------
# Describing a file, for error messages
# ---------------------------------------------------------------------------------------------
def _resnet_depth(keys: Iterable[str], prefix: str) -> str:
    keys = set(keys)
    layers = [len({k.split(".")[2] for k in keys if k.startswith(f"{prefix}layer{i}.")}) for i in range(1, 5)]
    bottleneck = any(k.startswith(f"{prefix}layer1.0.conv3") for k in keys)
    depth = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34 if not bottleneck else 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
    return str(depth.get(tuple(layers), f"?{layers}"))


def describe_model(keys) -> str:
    """What an mmsegmentation file holds, as a noun phrase ("an mmsegmentation PSPHead on
    ResNetV1c-101 (deep stem)"), for the error messages."""
    keys = list(keys)
    ks = set(keys)
    if not detect_model(ks):
        return "a file without mmsegmentation's decode_head.* tensors"
    if any(k.startswith("backbone.stem.0.") for k in ks):
        bb = f"ResNetV1c-{_resnet_depth(ks, 'backbone.')} (deep stem)"
    elif "backbone.conv1.weight" in ks and any(k.startswith("backbone.layer1.0.conv1") for k in ks):
        bb = f"ResNet-{_resnet_depth(ks, 'backbone.')} (7x7 stem)"
    elif "backbone.layer1.0.conv.0.conv.weight" in ks:
        bb = "MobileNetV2"
    elif "backbone.transition1.0.0.weight" in ks:
        bb = "HRNet"
    else:
        bb = "a backbone this project does not recognise"

    def has(s):
        return any(s in k for k in ks)

    if has("decode_head.c1_bottleneck"):
        head = "DepthwiseSeparableASPPHead (DeepLabV3+)"
    elif has("decode_head.aspp_modules"):
        head = "ASPPHead (DeepLabV3)"
    elif has("decode_head.psp_modules"):
        head = "PSPHead"
    elif has("decode_head.global_relation"):
        head = "ISAHead"
    elif has("decode_head.1.object_context_block"):
        head = "FCNHead + OCRHead (OCRNet)"
    elif has("decode_head.convs"):
        head = "FCNHead"
    else:
        head = "model whose decode head this project does not recognise"
    aux = ", auxiliary FCNHead" if has("auxiliary_head.") else ""
    return f"an mmsegmentation {head} on {bb}{aux}"


def suggest_config(keys) -> str:
    desc = describe_model(keys)
    if not detect_model(keys):
        return (f"the file is {desc}, so MODEL.WEIGHTS_FORMAT mmseg does not fit it: set MODEL.WEIGHTS_FORMAT auto "
                "to detect its format")
    parts = ["MODEL.SEM_SEG_HEAD.LAYOUT mmseg"]
    if "ResNetV1c" in desc:
        depth = re.search(r"ResNetV1c-(\d+)", desc)
        parts += [f"MODEL.TIMM.NAME resnet{depth.group(1) if depth else '<depth>'}", "MODEL.TIMM.STEM_TYPE deep",
                  "MODEL.TIMM.STEM_WIDTH 32", "MODEL.TIMM.DILATION_RULE mmseg"]
    elif "MobileNetV2" in desc:
        parts += ["MODEL.TIMM.NAME mobilenetv2_100", "MODEL.TIMM.DILATION_RULE mmseg"]
    elif "HRNet" in desc:
        parts += ["MODEL.TIMM.HRNET_FUSE_UPSAMPLE bilinear"]
    heads = {"DeepLabV3+": "SegDeepLabV3PlusHead", "ASPPHead": "SegDeepLabV3Head", "PSPHead": "PSPHead",
             "ISAHead": "ISAHead", "OCRNet": "OCRHead", "FCNHead": "FCNHead (HRNetV2Head on HRNet)"}
    for k, v in heads.items():
        if k in desc:
            parts.insert(0, f"MODEL.SEM_SEG_HEAD.NAME {v}")
            break
    if "ASPPHead (DeepLabV3)" in desc:  # no 3x3 convs after the ASPP's bottleneck
        parts.append("MODEL.SEM_SEG_HEAD.ASPP_BOTTLENECK_CONVS 0")
    if "(DeepLabV3" in desc:  # one dropout, before the classifier
        parts.append("MODEL.SEM_SEG_HEAD.ASPP_DROPOUT 0.0")
    if "auxiliary" in desc:
        parts.append("MODEL.SEM_SEG_HEAD.AUX_IN_FEATURE res4 (with its AUX_CHANNELS)")
    return (f"the file is {desc}; such a model needs {', '.join(parts)} and the widths of its config "
            "(configs/reproduce/ has the papers' teachers)")
