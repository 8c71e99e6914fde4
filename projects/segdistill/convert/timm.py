"""timm ImageNet weights (and what shares timm's names): the project's backbones *are*
timm models, so this map is the identity, minus the classifier parts a segmentation body
does not have.

* ResNets: timm's and torchvision's ResNet state dicts have the same names (``conv1``,
  ``bn1``, ``layer*``, ``fc``); timm's deep-stem variants (``resnet*d``, ``resnet*s``) name
  their stem ``conv1.{0,1,3,4,6}``.
* MobileNetV2: ``conv_stem``, ``bn1``, ``blocks.*`` (``conv_head``/``bn2``/``classifier`` dropped).
* HRNet: timm's names are those of the official HRNet classification release
  (``hrnetv2_w18_imagenet_pretrained.pth``: ``conv1``, ``bn1``, ``layer1``, ``transition*``,
  ``stage*``) and of mmsegmentation's HRNet; the classification head (``incre_modules``,
  ``downsamp_modules``, ``final_layer``, ``classifier``) is dropped.
"""
from __future__ import annotations

from typing import List

from .core import Rule, drop, rule

__all__ = ["backbone_rules", "detect"]

_HEAD = "part of the ImageNet classifier, not of the segmentation backbone"


def detect(keys) -> bool:
    """timm/torchvision ResNet, timm MobileNetV2, timm/official HRNet names."""
    keys = set(keys)
    return (
        ("conv1.weight" in keys or "conv1.0.weight" in keys) and "layer1.0.conv1.weight" in keys
        and "conv2.weight" not in keys
    ) or "conv_stem.weight" in keys or "transition1.0.0.weight" in keys


def backbone_rules(family: str) -> List[Rule]:
    drops = {
        "resnet": [drop(r"fc\..*", _HEAD)],
        "mobilenetv2": [drop(r"(conv_head|bn2|classifier)\..*", _HEAD)],
        "hrnet": [drop(r"(incre_modules|downsamp_modules|final_layer|classifier)\..*", _HEAD)],
    }.get(family, [drop(r"(fc|classifier|head)\..*", _HEAD)])
    return drops + [rule(r"(?P<k>.*)", r"\g<k>")]
