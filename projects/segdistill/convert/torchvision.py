"""torchvision ImageNet weights.

* ResNet: torchvision's names are timm's (see :mod:`.timm`).
* MobileNetV2 (``mobilenet_v2-*.pth``): ``features.0`` is the stem, ``features.1`` ..
  ``features.17`` the 17 inverted-residual blocks in order (1, 2, 3, 4, 3, 3, 1 per stage),
  ``features.18`` the 1280-channel conv and ``classifier`` the classifier (both dropped).
  Inside a block ``conv`` is a sequence: for the first block (expansion 1) depthwise
  conv-BN-ReLU6, pointwise conv, BN; for the others expansion conv-BN-ReLU6, depthwise
  conv-BN-ReLU6, projection conv, BN. timm names these ``conv_dw/bn1/conv_pw/bn2`` and
  ``conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3``.
"""
from __future__ import annotations

from typing import List, Sequence

from . import timm as timm_format
from .core import Rule, drop, rule

__all__ = ["backbone_rules", "detect"]

_HEAD = "part of the ImageNet classifier, not of the segmentation backbone"
_BN = r"(?P<p>weight|bias|running_mean|running_var|num_batches_tracked)"


def detect(keys) -> bool:
    return "features.0.0.weight" in set(keys)


def _mobilenetv2(stage_sizes: Sequence[int], first_is_separable: Sequence[bool]) -> List[Rule]:
    rules = [
        drop(r"classifier\..*", _HEAD),
        rule(r"features\.0\.0\.weight", "conv_stem.weight"),
        rule(rf"features\.0\.1\.{_BN}", r"bn1.\g<p>"),
    ]
    flat = 1
    for s, n in enumerate(stage_sizes):
        for b in range(n):
            src, dst = rf"features\.{flat}\.conv", f"blocks.{s}.{b}"
            if first_is_separable[s]:
                rules += [
                    rule(rf"{src}\.0\.0\.weight", f"{dst}.conv_dw.weight"),
                    rule(rf"{src}\.0\.1\.{_BN}", rf"{dst}.bn1.\g<p>"),
                    rule(rf"{src}\.1\.weight", f"{dst}.conv_pw.weight"),
                    rule(rf"{src}\.2\.{_BN}", rf"{dst}.bn2.\g<p>"),
                ]
            else:
                rules += [
                    rule(rf"{src}\.0\.0\.weight", f"{dst}.conv_pw.weight"),
                    rule(rf"{src}\.0\.1\.{_BN}", rf"{dst}.bn1.\g<p>"),
                    rule(rf"{src}\.1\.0\.weight", f"{dst}.conv_dw.weight"),
                    rule(rf"{src}\.1\.1\.{_BN}", rf"{dst}.bn2.\g<p>"),
                    rule(rf"{src}\.2\.weight", f"{dst}.conv_pwl.weight"),
                    rule(rf"{src}\.3\.{_BN}", rf"{dst}.bn3.\g<p>"),
                ]
            flat += 1
    rules.append(drop(rf"features\.{flat}\..*", "the 1280-channel last conv of the classifier network"))
    return rules


def backbone_rules(family: str, body=None) -> List[Rule]:
    if family == "mobilenetv2":
        from timm.models._efficientnet_blocks import DepthwiseSeparableConv

        stages = list(body.blocks)
        return _mobilenetv2([len(s) for s in stages], [isinstance(s[0], DepthwiseSeparableConv) for s in stages])
    return timm_format.backbone_rules(family)
