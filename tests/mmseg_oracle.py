"""The test-only oracle: mmsegmentation 1.2.2 (with mmengine and mmcv-lite, see
requirements-test.txt), imported without mmcv's compiled ops.

mmcv-lite has no ``mmcv.ops``; mmsegmentation imports it at module level for a few heads
these tests do not build, so a stub module stands in for it (any attribute is a class that
raises when instantiated). ``import_mmseg()`` returns mmseg's ``MODELS`` registry, or skips
the calling test when mmsegmentation is not installed.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch


class _OpsStub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"mmcv.ops.{name} is not available in the test oracle (mmcv-lite)")

        return type(name, (), {"__init__": unavailable})


def import_mmseg():
    """mmsegmentation's MODELS registry with every module registered (skips if not installed)."""
    if "mmcv.ops" not in sys.modules:
        stub = _OpsStub("mmcv.ops")
        stub.__path__ = []  # a package, so that `from mmcv.ops.x import y` resolves to the stub too
        sys.modules["mmcv.ops"] = stub
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from mmseg.registry import MODELS
            from mmseg.utils import register_all_modules
    except ImportError as e:  # pragma: no cover - the oracle is installed by tools/setup_env.sh
        pytest.skip(f"mmsegmentation (test oracle) not importable: {e}")
    register_all_modules(init_default_scope=False)
    import logging

    logging.getLogger("mmengine").setLevel(logging.WARNING)
    return MODELS


NORM = dict(type="BN", requires_grad=True)
CE = dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)


def build_mmseg(cfg: dict, seed: int = 0) -> torch.nn.Module:
    """An mmseg segmentor from ``cfg`` with random weights and random BatchNorm statistics, in eval mode."""
    models = import_mmseg()
    torch.manual_seed(seed)
    model = models.build(dict(cfg, train_cfg=dict(), test_cfg=dict(mode="whole")))
    randomize(model, seed)
    return model.eval()


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random conv weights (scaled to keep activations in range) and BN affine/statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            elif isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def mmseg_logits(model, x: torch.Tensor) -> torch.Tensor:
    """mmseg's whole-image logits at the input size (``encode_decode``)."""
    with torch.no_grad():
        return model.encode_decode(x, [dict(img_shape=tuple(x.shape[-2:]))] * x.shape[0])


# A tiny DeepLabV3 on ResNetV1c-18 (ASPP width 16, 5 classes) in mmsegmentation's terms, and the
# project's YAML config that loads its file (format it with repo=, weights_format= "auto" or "mmseg").
TINY_DEEPLABV3 = dict(
    type="EncoderDecoder",
    backbone=dict(type="ResNetV1c", depth=18, num_stages=4, out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4),
                  strides=(1, 2, 1, 1), norm_cfg=NORM, norm_eval=False, style="pytorch", contract_dilation=True),
    decode_head=dict(type="ASPPHead", in_channels=512, in_index=3, channels=16, dilations=(1, 12, 24, 36),
                     dropout_ratio=0.1, num_classes=5, norm_cfg=NORM, align_corners=False, loss_decode=CE),
)
TINY_DEEPLABV3_YAML = """\
_BASE_: "{repo}/configs/demo/Base-Demo.yaml"
MODEL:
  WEIGHTS_FORMAT: "{weights_format}"
  PIXEL_MEAN: [0.0, 0.0, 0.0]
  PIXEL_STD: [1.0, 1.0, 1.0]
  TIMM:
    NAME: "resnet18"
    STEM_TYPE: "deep"
    STEM_WIDTH: 32
    DILATION_RULE: "mmseg"
  SEM_SEG_HEAD:
    NAME: "SegDeepLabV3Head"
    LAYOUT: "mmseg"
    NUM_CLASSES: 5
    ASPP_CHANNELS: 16
    ASPP_DILATIONS: [12, 24, 36]
    ASPP_DROPOUT: 0.0
    OUTPUT_RESIZE: "input"
"""
