"""CIRKD's (winycg/CIRKD, 2022; also HWD's code base zju-SWJ/HWD) models and ImageNet ResNets.

Checked by names and shapes only, against a manifest written from CIRKD's public model
definitions (``convert/manifests/cirkd.json``; no CIRKD code runs in the tests).

* Backbone ``pretrained.*`` (and the ImageNet file ``resnet18-imagenet.pth`` / the
  ResNet-101 file of CIRKD's README): ``resnet*_v1s``, a ResNetV1b with a deep stem of
  three 3x3 conv-BN (64-64-128) named ``conv1/bn1``, ``conv2/bn2``, ``conv3/bn3`` -> timm's
  ``conv1.{0,1,3,4,6}`` + ``bn1`` (``MODEL.TIMM.STEM_TYPE deep``, ``STEM_WIDTH 64``); the
  residual stages have timm's names and dilation convention. The 7x7 ``*_vanilla``
  ResNets have torchvision's names.
* DeepLabV3 ``head.*`` (``models/deeplabv3.py``): ASPP branches ``aspp.b0``,
  ``aspp.b{1,2,3}.block``, image pooling ``aspp.b4.gap`` (conv-BN-ReLU, concatenated last),
  ``aspp.project`` (1x1 conv-BN-ReLU, dropout 0.5), then ``block`` (3x3 conv-BN-ReLU,
  dropout 0.1, classifier ``block.4``): ``SegDeepLabV3Head`` with ``LAYOUT "cirkd"``,
  ``ASPP_BOTTLENECK_CONVS 1``.
* PSPNet ``head.*`` (``models/pspnet.py``): ``psp.conv{1..4}`` (bins 1, 2, 3, 6), ``block``
  (3x3 conv-BN-ReLU, dropout), ``classifier``: ``PSPHead``.
* ``auxlayer.block`` (3x3 conv-BN-ReLU, dropout, classifier): the auxiliary FCN head.
"""
from __future__ import annotations

from typing import Callable, Dict, List

from .contracts import head_key_map
from .core import Rule, conv_bn, drop, plain, prefixed, rule

__all__ = ["backbone_rules", "detect_backbone", "detect_model", "model_rules", "HEAD_MAPS", "describe_model",
           "suggest_config"]

_BN = r"(?P<p>weight|bias|running_mean|running_var|num_batches_tracked)"


def detect_backbone(keys) -> bool:
    keys = set(keys)
    return {"conv1.weight", "conv2.weight", "conv3.weight", "bn3.weight", "layer1.0.conv1.weight"} <= keys


def detect_model(keys) -> bool:
    keys = set(keys)
    return "pretrained.conv1.weight" in keys and any(k.startswith("head.") for k in keys)


def backbone_rules(family: str, body=None, deep_stem: bool = True) -> List[Rule]:
    if family != "resnet":
        raise ValueError(f"No CIRKD key map for a {family!r} backbone (its ResNets have one).")
    rules = [drop(r"fc\..*", "part of the ImageNet classifier, not of the segmentation backbone")]
    if deep_stem:
        stem = {"conv1": "conv1.0", "bn1": "conv1.1", "conv2": "conv1.3", "bn2": "conv1.4", "conv3": "conv1.6",
                "bn3": "bn1"}
        rules.append(rule(r"(?P<m>conv[123]|bn[123])\.(?P<p>.*)", lambda m: f"{stem[m['m']]}.{m['p']}"))
    rules.append(rule(r"(?P<k>(conv1|bn1|layer\d)\..*)", r"\g<k>"))
    return rules


def _deeplabv3(h: str) -> List[Rule]:
    rules = conv_bn(r"head\.aspp\.b0\.0", r"head\.aspp\.b0\.1", f"{h}.aspp.branches.0")
    rules += conv_bn(r"head\.aspp\.b(?P<i>[123])\.block\.0", r"head\.aspp\.b(?P<i>[123])\.block\.1",
                     rf"{h}.aspp.branches.\g<i>")
    rules += conv_bn(r"head\.aspp\.b4\.gap\.1", r"head\.aspp\.b4\.gap\.2", f"{h}.aspp.pool")
    rules += conv_bn(r"head\.aspp\.project\.0", r"head\.aspp\.project\.1", f"{h}.aspp.project")
    rules += conv_bn(r"head\.block\.0", r"head\.block\.1", f"{h}.bottleneck.0")
    rules += plain(r"head\.block\.4", f"{h}.predictor")
    return rules


def _psp(h: str) -> List[Rule]:
    rules = [rule(r"head\.psp\.conv(?P<i>[1-4])\.0\.weight", lambda m: f"{h}.ppm.stages.{int(m['i']) - 1}.weight"),
             rule(rf"head\.psp\.conv(?P<i>[1-4])\.1\.{_BN}",
                  lambda m: f"{h}.ppm.stages.{int(m['i']) - 1}.norm.{m['p']}")]
    rules += conv_bn(r"head\.block\.0", r"head\.block\.1", f"{h}.bottleneck")
    rules += plain(r"head\.classifier", f"{h}.predictor")
    return rules


#: registered head class name -> the map of CIRKD's ``head.*`` to the head's prefix ``h``
HEAD_MAPS: Dict[str, Callable[[str], List[Rule]]] = {"SegDeepLabV3Head": _deeplabv3, "PSPHead": _psp}


def model_rules(body, family: str, head, keys) -> List[Rule]:
    deep = "pretrained.conv2.weight" in set(keys)
    rules = prefixed(backbone_rules(family, body, deep_stem=deep), "pretrained.", "backbone.body.")
    rules += head_key_map(head, HEAD_MAPS, "CIRKD")("sem_seg_head")
    if head.aux_head is not None:
        rules += conv_bn(r"auxlayer\.block\.0", r"auxlayer\.block\.1", "sem_seg_head.aux_head.conv")
        rules += plain(r"auxlayer\.block\.4", "sem_seg_head.aux_head.predictor")
    return rules


def describe_model(keys) -> str:
    ks = set(keys)
    if not detect_model(ks):
        return "a file without CIRKD's pretrained.* and head.* tensors"
    stem = "deep stem 64-64-128" if "pretrained.conv2.weight" in ks else "7x7 stem"
    layers = [len({k.split(".")[2] for k in ks if k.startswith(f"pretrained.layer{i}.")}) for i in range(1, 5)]
    depth = {(2, 2, 2, 2): "18", (3, 4, 6, 3): "50", (3, 4, 23, 3): "101"}.get(tuple(layers), f"?{layers}")
    head = "DeepLabV3" if any(k.startswith("head.aspp.") for k in ks) else (
        "PSPNet" if any(k.startswith("head.psp.") for k in ks) else "")
    aux = " with its auxiliary FCN head" if any(k.startswith("auxlayer.") for k in ks) else ""
    if not head:
        return f"a CIRKD model with a head this project does not recognise, on ResNet{depth} ({stem}){aux}"
    return f"a CIRKD {head}-ResNet{depth} ({stem}){aux}"


def suggest_config(keys) -> str:
    desc = describe_model(keys)
    if not detect_model(keys):
        return (f"the file is {desc}, so MODEL.WEIGHTS_FORMAT cirkd does not fit it: set MODEL.WEIGHTS_FORMAT auto "
                "to detect its format")
    head = "SegDeepLabV3Head, MODEL.SEM_SEG_HEAD.LAYOUT cirkd, ASPP_BOTTLENECK_CONVS 1" if "DeepLabV3" in desc \
        else "PSPHead"
    return (f"the file is {desc}; such a model needs MODEL.SEM_SEG_HEAD.NAME {head}, MODEL.TIMM.STEM_TYPE deep, "
            "MODEL.TIMM.STEM_WIDTH 64, MODEL.SEM_SEG_HEAD.ALIGN_CORNERS True and CIRKD's widths "
            "(configs/reproduce/hwd/ has them)")
