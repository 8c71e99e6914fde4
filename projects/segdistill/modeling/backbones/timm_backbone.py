"""timm models as detectron2 Backbones: dilated ResNets, MobileNetV2 and HRNetV2.

Stage names (what ``output_shape()`` returns, and what ``OUT_FEATURES`` / a head's
``IN_FEATURES`` / an exit's ``IN_FEATURES`` refer to):

* ResNet / MobileNetV2 (and other timm models with ``features_only``): ``res{k}`` where
  ``2**k`` is the stage's nominal reduction (``res2`` = 1/4 ... ``res5`` = 1/32). With
  ``OUTPUT_STRIDE`` 8 or 16 the last stages are dilated, so their *actual* stride (the
  ``ShapeSpec.stride``) stops at 8 or 16 while the names stay the same.
* HRNetV2: ``res2``..``res5`` are the four branches of the final stage (strides 4..32), the
  input of the HRNetV2 / OCR heads; ``stage2_b0``, ``stage2_b1`` and ``stage3_b0``..``stage3_b2``
  are the branches output by stages 2 and 3 (the places where HS3 and SR attach exits);
  ``layer1`` is the stride-4 output of the first stage. All are computed anyway by the
  network, so exposing them costs nothing.

Layouts of other code bases, as options of the same backbone (so that their checkpoints
load, see :mod:`segdistill.convert`):

* ``stem_type="deep"`` (ResNets): three 3x3 convs of ``stem_width``, ``stem_width``,
  ``2 * stem_width`` channels instead of the 7x7 conv: ``stem_width`` 32 is
  mmsegmentation's ResNetV1c (32-32-64), 64 is CIRKD's ``resnet*_v1s`` (64-64-128, timm's
  ``resnet*s``).
* ``dilation_rule``: where the dilated stages put their dilations. ``"timm"`` (default):
  the first block of a dilated stage keeps the previous stage's dilation in its first 3x3
  conv (identical to CIRKD's ResNetV1b). ``"mmseg"``: mmsegmentation's convention,
  ``strides``/``dilations`` per stage derived from the output stride (D8: strides 1, 2, 1, 1,
  dilations 1, 1, 2, 4), ``contract_dilation`` (the first block of a stage of dilation d uses
  d / 2), its BasicBlock (second 3x3 conv never dilated), ``multi_grid`` (absolute
  dilations of the last stage's blocks) and its MobileNetV2 (only the first block of a
  stage is dilated).
* ``hrnet_fuse_upsample="bilinear"`` (HRNet): mmsegmentation's HRNet upsamples the
  branches bilinearly when it fuses them, then resizes them to the size of the branch they
  join, so any input size fuses (no padding at inference: ``size_divisibility`` 0); timm and
  the HRNet classification release use nearest neighbours by exact factors (inputs padded to 32).

ImageNet weights for the body: ``checkpoint`` (``MODEL.TIMM.CHECKPOINT``), a file or a URL
(fetched once into the cache, :mod:`segdistill.convert.fetch`) of timm, torchvision,
OpenMMLab, the HRNet release or CIRKD (the format is detected from the keys or named by
``checkpoint_format``, and the file is converted by :mod:`segdistill.convert`); or
``pretrained`` (``MODEL.TIMM.PRETRAINED``), timm's own weights of a ``model.tag`` (or
``"default"``), fetched through huggingface_hub and loaded through the same checked
conversion. timm's ``create_model`` never downloads (its ``pretrained`` stays off).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
from torch import nn
from torch.nn import functional as F

from timm.models.hrnet import HighResolutionModule

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from ...convert import ConvertibleBackbone, backbone_family, fetch_timm_weights, load_backbone_weights
from ..stagewise import StageModulesUnsupported, StagewiseBackbone  # the stage-by-stage contract anytime runs on
from .norm import convert_norm, resolve_norm

__all__ = [
    "TimmBackbone", "HRNetBackbone", "HRNetStage", "SizeFusingHRModule", "build_timm_backbone", "load_body_checkpoint",
    "STEM_TYPES", "DILATION_RULES", "HRNET_FUSE_UPSAMPLES", "backbone_family",
]

logger = logging.getLogger(__name__)

STEM_TYPES = ("", "deep")
DILATION_RULES = ("timm", "mmseg")
HRNET_FUSE_UPSAMPLES = ("nearest", "bilinear")


def load_body_checkpoint(body: nn.Module, path: str, fmt: str = "auto", *, key: str = "MODEL.TIMM.CHECKPOINT") -> None:
    """Load local ImageNet weights of format ``fmt`` (or detected) into a timm body.

    Raises FileNotFoundError naming the path when the file is missing, and
    :class:`segdistill.convert.CheckpointMismatchError` (a ValueError) naming the file, the
    expected architecture and the first unmatched keys when it does not fit.
    """
    load_backbone_weights(body, path, fmt, key=key)


def _check_out_features(wanted: Sequence[str], valid: Sequence[str], model: str) -> List[str]:
    bad = [n for n in wanted if n not in valid]
    if bad:
        raise ValueError(
            f"Unknown backbone feature(s) {bad} for {model}; valid names: {list(valid)} "
            "(MODEL.TIMM.OUT_FEATURES / the head's IN_FEATURES)."
        )
    return list(wanted)


def _load_and_normalise(backbone: nn.Module, model_name: str, checkpoint: str, checkpoint_format: str,
                        pretrained: str, norm: str) -> None:
    """The last steps of building a timm backbone: its body's ImageNet weights (a file or URL,
    or timm's named weights), then its norms as ``norm`` asks (the weights load into timm's
    BatchNorms first)."""
    if checkpoint and pretrained:
        raise ValueError(
            f"MODEL.TIMM.CHECKPOINT {checkpoint!r} and MODEL.TIMM.PRETRAINED {pretrained!r} both name the backbone's "
            "ImageNet weights: set one of them to ''."
        )
    if checkpoint:
        load_body_checkpoint(backbone.body, checkpoint, checkpoint_format)
    elif pretrained:
        path = fetch_timm_weights(model_name, pretrained, key="MODEL.TIMM.PRETRAINED")
        load_body_checkpoint(backbone.body, path, "timm", key="MODEL.TIMM.PRETRAINED")
    convert_norm(backbone, norm)


def _check_choice(value, choices, key: str):
    if value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# mmsegmentation's dilation convention
# ---------------------------------------------------------------------------------------------
def _stage_strides_dilations(orig: Sequence[int], start: int, output_stride: int) -> List[Tuple[int, int]]:
    """(stride, dilation) per stage: a stage whose stride would take the network past
    ``output_stride`` keeps stride 1 and multiplies the dilation by its stride instead."""
    net, dil, out = start, 1, []
    for s in orig:
        if net * s > output_stride:
            dil *= s
            out.append((1, dil))
        else:
            net *= s
            out.append((s, dil))
    return out


def _set_conv(conv: nn.Conv2d, stride: int, dilation: int) -> None:
    k = conv.kernel_size[0]
    conv.stride = (stride, stride)
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation * (k - 1) // 2,) * 2


def _apply_mmseg_resnet(body: nn.Module, output_stride: int, multi_grid: Sequence[int]) -> List[int]:
    """Rewrite the strides and dilations of a (stride-32) timm ResNet the mmsegmentation way;
    returns the stride of each stage."""
    from timm.models.resnet import BasicBlock, Bottleneck

    stages = [getattr(body, f"layer{i}") for i in range(1, 5)]
    unknown = {type(b).__name__ for stage in stages for b in stage if not isinstance(b, (BasicBlock, Bottleneck))}
    if unknown:
        raise ValueError(f"The mmseg dilation rule knows timm's BasicBlock and Bottleneck, not {sorted(unknown)}.")

    def strided_conv(block):
        return block.conv2 if isinstance(block, Bottleneck) else block.conv1

    orig = [strided_conv(stage[0]).stride[0] for stage in stages]
    plan = _stage_strides_dilations(orig, 4, output_stride)
    if multi_grid and len(multi_grid) != len(stages[-1]):
        raise ValueError(
            f"MODEL.TIMM.MULTI_GRID {list(multi_grid)} needs one dilation per block of the last stage "
            f"({len(stages[-1])} blocks)."
        )
    strides, net = [], 4
    for i, (stage, (stride, dil)) in enumerate(zip(stages, plan)):
        if i == len(stages) - 1 and multi_grid:
            dils = [int(m) for m in multi_grid]
        else:
            first = dil // 2 if dil > 1 else dil  # contract_dilation
            dils = [first] + [dil] * (len(stage) - 1)
        for j, block in enumerate(stage):
            s = stride if j == 0 else 1
            _set_conv(strided_conv(block), s, dils[j])
            if isinstance(block, BasicBlock):
                _set_conv(block.conv2, 1, 1)  # mmseg's BasicBlock never dilates its second conv
            if j == 0 and block.downsample is not None:
                down = block.downsample[0]
                if not isinstance(down, nn.Conv2d):
                    raise ValueError("The mmseg dilation rule needs a plain strided 1x1 downsample (not avg_down).")
                down.stride = (s, s)
        net *= stride
        strides.append(net)
    return strides


def _apply_mmseg_mobilenetv2(body: nn.Module, output_stride: int) -> List[int]:
    """mmsegmentation's MobileNetV2: dilation only in the first block of each stage."""
    stages = list(body.blocks)
    orig = [stage[0].conv_dw.stride[0] for stage in stages]
    start = body.conv_stem.stride[0]
    plan = _stage_strides_dilations(orig, start, output_stride)
    strides, net = [], start
    for stage, (stride, dil) in zip(stages, plan):
        for j, block in enumerate(stage):
            _set_conv(block.conv_dw, stride if j == 0 else 1, dil if j == 0 else 1)
        net *= stride
        strides.append(net)
    return strides


def _apply_dilation_rule(body: nn.Module, family: str, output_stride: int, multi_grid: Sequence[int],
                         model_name: str) -> List[int]:
    if family == "resnet":
        return _apply_mmseg_resnet(body, output_stride, multi_grid)
    if family == "mobilenetv2":
        if multi_grid:
            raise ValueError("MODEL.TIMM.MULTI_GRID applies to ResNets only.")
        return _apply_mmseg_mobilenetv2(body, output_stride)
    raise ValueError(
        f"MODEL.TIMM.DILATION_RULE 'mmseg' knows ResNets and MobileNetV2, not {model_name!r}; use 'timm'."
    )


# ---------------------------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------------------------
def _common_from_config(cfg, input_shape: ShapeSpec) -> dict:
    c = cfg.MODEL.TIMM
    return dict(
        model_name=c.NAME,
        out_features=list(c.OUT_FEATURES) or None,
        norm=resolve_norm(cfg, "backbone"),
        checkpoint=c.CHECKPOINT,
        checkpoint_format=c.CHECKPOINT_FORMAT,
        pretrained=c.PRETRAINED,
        in_chans=input_shape.channels,
    )


class TimmBackbone(StagewiseBackbone, ConvertibleBackbone):
    """A timm ``features_only`` model (ResNet, MobileNetV2, ...) as a detectron2 Backbone.

    Every argument is keyword-only and required; the defaults live in ``config/defaults.py``
    (``MODEL.TIMM.*``). ``model_kwargs`` are passed to ``timm.create_model`` as they are
    (e.g. narrow ``channels`` in tests).
    """

    @configurable
    def __init__(
        self,
        *,
        model_name: str,
        output_stride: int,
        out_features: Optional[Sequence[str]],
        norm: str,
        checkpoint: str,
        checkpoint_format: str,
        pretrained: str,
        in_chans: int,
        stem_type: str,
        stem_width: int,
        dilation_rule: str,
        multi_grid: Sequence[int],
        model_kwargs: Optional[dict] = None,
    ):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"MODEL.TIMM.OUTPUT_STRIDE must be 8, 16 or 32, got {output_stride}")
        _check_choice(stem_type, STEM_TYPES, "MODEL.TIMM.STEM_TYPE")
        _check_choice(dilation_rule, DILATION_RULES, "MODEL.TIMM.DILATION_RULE")
        if multi_grid and dilation_rule != "mmseg":
            raise ValueError("MODEL.TIMM.MULTI_GRID is mmsegmentation's option: set MODEL.TIMM.DILATION_RULE 'mmseg'.")
        kwargs = dict(model_kwargs or {})
        if stem_type:
            if not model_name.startswith(("resnet", "resnext", "wide_resnet")):
                raise ValueError(f"MODEL.TIMM.STEM_TYPE {stem_type!r} applies to timm ResNets, not {model_name!r}.")
            kwargs.update(stem_type=stem_type, stem_width=stem_width)
        self.body = timm.create_model(
            model_name,
            pretrained=False,
            features_only=True,
            output_stride=32 if dilation_rule == "mmseg" else output_stride,
            in_chans=in_chans,
            **kwargs,
        )
        self.model_name = model_name
        self.family = backbone_family(self.body)
        self.fuse_upsample = ""  # no branch fusion (ConvertibleBackbone)
        info = self.body.feature_info
        # res{k}: 2**k is the level's reduction without dilation (res1 = 1/2 ... res5 = 1/32).
        nominal = _nominal_reductions(info)
        names = [f"res{r.bit_length() - 1}" for r in nominal]
        strides = list(info.reduction())
        if dilation_rule == "mmseg":
            stage_strides = _apply_dilation_rule(self.body, self.family, output_stride, multi_grid, model_name)
            if self.family == "resnet":
                strides = [2] + stage_strides
            else:  # MobileNetV2: the levels are the outputs of stages 0, 1, 2, 4, 6
                strides = [stage_strides[i] for i in _mobilenet_level_stages(info)]
        self._all_names = names
        self._out_feature_channels = dict(zip(names, info.channels()))
        self._out_feature_strides = dict(zip(names, strides))
        self._out_features = _check_out_features(out_features or [names[-1]], names, model_name)
        # Ask timm only for the levels we return.
        self._return_index = [names.index(n) for n in self._out_features]
        _load_and_normalise(self, model_name, checkpoint, checkpoint_format, pretrained, norm)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        c = cfg.MODEL.TIMM
        return dict(
            _common_from_config(cfg, input_shape),
            output_stride=c.OUTPUT_STRIDE,
            stem_type=c.STEM_TYPE,
            stem_width=c.STEM_WIDTH,
            dilation_rule=c.DILATION_RULE,
            multi_grid=list(c.MULTI_GRID),
        )

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.body(x)
        return {self._all_names[i]: feats[i] for i in self._return_index}

    # ---- stage by stage: the StagewiseBackbone contract, so that anytime inference can stop early ----
    def forward_stages(self, x: torch.Tensor):
        """Lazily yield ``(name, features)`` for every level (``res1``..), shallowest first; a
        level is computed only when the next item is asked for. Same tensors as ``forward``.

        ResNet-like bodies (timm's ``FeatureDictNet``) and MobileNetV2 / EfficientNet bodies
        are run module by module; any other timm body is run whole first (correct, not lazy).
        """
        from timm.models import FeatureDictNet
        from timm.models.efficientnet import EfficientNetFeatures

        body, names = self.body, iter(self._all_names)
        if isinstance(body, FeatureDictNet):
            for key, module in body.items():
                x = module(x)
                if key in body.return_layers:  # as FeatureDictNet._collect
                    out = x
                    if isinstance(x, (tuple, list)):
                        out = torch.cat(x, 1) if body.concat else x[0]
                    yield next(names), out
        elif isinstance(body, EfficientNetFeatures) and body.feature_hooks is None:
            stages = {f["stage"] for f in body.feature_info.get_dicts()}  # as EfficientNetFeatures.forward
            x = body.bn1(body.conv_stem(x))
            if 0 in stages:
                yield next(names), x
            for i, block in enumerate(body.blocks):
                x = block(x)
                if i + 1 in stages:
                    yield next(names), x
        else:
            yield from zip(self._all_names, body(x))

    def stage_shapes(self) -> Dict[str, ShapeSpec]:
        return {n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
                for n in self._all_names}

    def stage_modules(self) -> "OrderedDict[str, nn.Module]":
        """The body's modules grouped by level, as ``forward_stages`` runs them: ResNet ``res1`` =
        ``conv1, bn1, act1``, ``res2`` = ``maxpool, layer1``, then ``layer2..4``; MobileNetV2
        ``res1`` = ``conv_stem, bn1, blocks.0``, then the blocks up to each level. A level of one
        module is that module, else an ``nn.Sequential`` around the body's modules."""
        from timm.models import FeatureDictNet
        from timm.models.efficientnet import EfficientNetFeatures

        body, names = self.body, iter(self._all_names)
        out: "OrderedDict[str, nn.Module]" = OrderedDict()
        pending: List[nn.Module] = []

        def close():
            out[next(names)] = pending[0] if len(pending) == 1 else nn.Sequential(*pending)
            pending.clear()

        if isinstance(body, FeatureDictNet):
            for key, module in body.items():
                pending.append(module)
                if key in body.return_layers:
                    close()
        elif isinstance(body, EfficientNetFeatures) and body.feature_hooks is None:
            stages = {f["stage"] for f in body.feature_info.get_dicts()}
            pending += [body.conv_stem, body.bn1]
            if 0 in stages:
                close()
            for i, block in enumerate(body.blocks):
                pending.append(block)
                if i + 1 in stages:
                    close()
        else:
            raise StageModulesUnsupported(
                f"{self.model_name}'s timm body ({type(body).__name__}) runs whole, so its stages cannot be named "
                "one by one; stage_modules knows ResNet-like (FeatureDictNet) and MobileNetV2 / EfficientNet bodies.")
        return out
    # ---- end of the stage-by-stage hunk ----

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
            for n in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        return 0


def _nominal_reductions(info) -> List[int]:
    """Reductions ignoring dilation: each level halves the previous one (timm levels do)."""
    first = info.reduction()[0]
    return [first * 2**i for i in range(len(info.reduction()))]


def _mobilenet_level_stages(info) -> List[int]:
    """Index of the stage (``blocks[i]``) each feature level of an EfficientNet body ends."""
    out = []
    for module in info.module_name():  # "blocks.0.0", "blocks.1.1", ...
        parts = module.split(".")
        if parts[0] != "blocks":
            raise ValueError(f"Unexpected feature module {module!r} of a MobileNetV2 body")
        out.append(int(parts[1]))
    return out


class HRNetBackbone(StagewiseBackbone, ConvertibleBackbone):
    """HRNetV2 from timm, exposing every stage's branches (see the module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        model_name: str,
        out_features: Optional[Sequence[str]],
        norm: str,
        checkpoint: str,
        checkpoint_format: str,
        pretrained: str,
        in_chans: int,
        fuse_upsample: str,
        model_kwargs: Optional[dict] = None,
    ):
        super().__init__()
        _check_choice(fuse_upsample, HRNET_FUSE_UPSAMPLES, "MODEL.TIMM.HRNET_FUSE_UPSAMPLE")
        # feature_location='' gives the plain HRNet (no classification 'incre' modules).
        self.body = timm.create_model(
            model_name, pretrained=False, features_only=True, feature_location="", in_chans=in_chans,
            **(model_kwargs or {}),
        )
        self.model_name = model_name
        self.family = "hrnet"
        self.fuse_upsample = fuse_upsample
        body = self.body
        if fuse_upsample == "bilinear":  # mmsegmentation's HRNet
            for m in body.modules():
                if isinstance(m, nn.Upsample):
                    m.mode, m.align_corners = "bilinear", False
                elif type(m) is HighResolutionModule:
                    # the same module (parameters, names, hooks) with mmsegmentation's fusion
                    m.__class__ = SizeFusingHRModule
        ch2, ch3, ch4 = (list(s[-1].num_in_chs) for s in (body.stage2, body.stage3, body.stage4))
        expansion = 4 if body.stage1_cfg["block_type"] == "BOTTLENECK" else 1
        layer1_ch = body.stage1_cfg["num_channels"][0] * expansion
        shapes = {"layer1": (layer1_ch, 4)}
        shapes.update({f"stage2_b{i}": (c, 4 * 2**i) for i, c in enumerate(ch2)})
        shapes.update({f"stage3_b{i}": (c, 4 * 2**i) for i, c in enumerate(ch3)})
        shapes.update({f"res{i + 2}": (c, 4 * 2**i) for i, c in enumerate(ch4)})
        self._shapes = shapes
        self._out_features = _check_out_features(
            out_features or ["res2", "res3", "res4", "res5"], list(shapes), model_name
        )
        _load_and_normalise(self, model_name, checkpoint, checkpoint_format, pretrained, norm)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        c = cfg.MODEL.TIMM
        if c.OUTPUT_STRIDE != 32:
            raise ValueError(
                "HRNet keeps a stride-4 branch and has no dilated variant: "
                f"MODEL.TIMM.OUTPUT_STRIDE must be 32 for {c.NAME}, got {c.OUTPUT_STRIDE}."
            )
        if c.STEM_TYPE or c.DILATION_RULE != "timm" or len(c.MULTI_GRID):
            raise ValueError(
                f"MODEL.TIMM.STEM_TYPE / DILATION_RULE / MULTI_GRID are ResNet options; {c.NAME} needs "
                "'', 'timm' and [] (HRNet's layouts differ only in MODEL.TIMM.HRNET_FUSE_UPSAMPLE)."
            )
        return dict(_common_from_config(cfg, input_shape), fuse_upsample=c.HRNET_FUSE_UPSAMPLE)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        b = self.body
        x = b.act1(b.bn1(b.conv1(x)))
        x = b.act2(b.bn2(b.conv2(x)))
        out = {"layer1": b.layer1(x)}
        yl = b.stage2([t(out["layer1"]) for t in b.transition1])
        out.update({f"stage2_b{i}": y for i, y in enumerate(yl)})
        yl = b.stage3(_transition(b.transition2, yl))
        out.update({f"stage3_b{i}": y for i, y in enumerate(yl)})
        yl = b.stage4(_transition(b.transition3, yl))
        out.update({f"res{i + 2}": y for i, y in enumerate(yl)})
        return {k: out[k] for k in self._out_features}

    # ---- stage by stage: the StagewiseBackbone contract, so that anytime inference can stop early ----
    def forward_stages(self, x: torch.Tensor):
        """Lazily yield ``(name, features)``: ``layer1``, then each stage's branches
        (``stage2_b*``, ``stage3_b*``, ``res2..res5``) once that stage has run. Same tensors as
        ``forward``; a stage runs only when the consumer asks for its first branch."""
        b = self.body
        x = b.act1(b.bn1(b.conv1(x)))
        x = b.act2(b.bn2(b.conv2(x)))
        x = b.layer1(x)
        yield "layer1", x
        yl = b.stage2([t(x) for t in b.transition1])
        yield from ((f"stage2_b{i}", y) for i, y in enumerate(yl))
        yl = b.stage3(_transition(b.transition2, yl))
        yield from ((f"stage3_b{i}", y) for i, y in enumerate(yl))
        yl = b.stage4(_transition(b.transition3, yl))
        yield from ((f"res{i + 2}", y) for i, y in enumerate(yl))

    def stage_shapes(self) -> Dict[str, ShapeSpec]:
        return {n: ShapeSpec(channels=c, stride=s) for n, (c, s) in self._shapes.items()}

    def stage_modules(self) -> "OrderedDict[str, nn.Module]":
        """The body's stages as ``forward_stages`` runs them: ``layer1`` (the stem and layer1, an
        ``nn.Sequential``: image -> tensor), then ``stage2`` .. ``stage4`` (:class:`HRNetStage`:
        the previous stage's tensor or list of branches -> this stage's list of branches)."""
        b = self.body
        out: "OrderedDict[str, nn.Module]" = OrderedDict()
        out["layer1"] = nn.Sequential(b.conv1, b.bn1, b.act1, b.conv2, b.bn2, b.act2, b.layer1)
        for k in (2, 3, 4):
            out[f"stage{k}"] = HRNetStage(getattr(b, f"transition{k - 1}"), getattr(b, f"stage{k}"))
        return out

    def stage_outputs(self) -> "OrderedDict[str, Tuple[str, ...]]":
        """``layer1`` yields ``layer1``; ``stage2`` its branches ``stage2_b*``, ``stage3``
        ``stage3_b*``, ``stage4`` ``res2..res5`` (finest first, the order of its list)."""
        names = list(self._shapes)
        return OrderedDict((stage, tuple(n for n in names if _hrnet_stage(n) == stage))
                           for stage in ("layer1", "stage2", "stage3", "stage4"))
    # ---- end of the stage-by-stage hunk ----

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            n: ShapeSpec(channels=self._shapes[n][0], stride=self._shapes[n][1])
            for n in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        # Nearest fusion upsamples the 1/32 branch by exact factors: inputs are padded to 32.
        # Bilinear fusion resizes to the joined branch's size, as mmsegmentation does: its
        # inference pads nothing (padding would change the logits near the border), its
        # training pads crops (labels with the ignore value), so that every exit and head at
        # stride up to 32 gives logits of the crop's size for the loss.
        return 32 if self.fuse_upsample == "nearest" or self.training else 0


class SizeFusingHRModule(HighResolutionModule):
    """timm's ``HighResolutionModule`` with mmsegmentation's fusion: a branch upsampled by its
    fuse layer (``scale_factor``) is then resized to the size of the branch it joins, so that
    inputs of any size fuse (the two differ where a stride-2 conv rounded up). Its modules and
    parameters are timm's: ``HRNetBackbone`` sets it as the class of timm's modules."""

    def forward(self, x: List[torch.Tensor]) -> List[torch.Tensor]:
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        x = [branch(t) for branch, t in zip(self.branches, x)]
        fused = []
        for i, fuse_outer in enumerate(self.fuse_layers):
            y = None
            for j, f in enumerate(fuse_outer):
                t = f(x[j])
                if j > i and t.shape[-2:] != x[i].shape[-2:]:
                    t = F.interpolate(t, size=x[i].shape[-2:], mode="bilinear", align_corners=False)
                y = t if y is None else y + t
            fused.append(self.fuse_act(y))
        return fused


def _transition(transitions: nn.ModuleList, yl: List[torch.Tensor]) -> List[torch.Tensor]:
    """HRNet's branch transition: identity for existing branches, a new branch from the last."""
    return [yl[i] if isinstance(t, nn.Identity) else t(yl[-1]) for i, t in enumerate(transitions)]


def _hrnet_stage(feature: str) -> str:
    """The stage (``HRNetBackbone.stage_modules()``' name) that yields an HRNet feature."""
    if feature.startswith("res"):
        return "stage4"
    return feature.split("_b")[0]  # layer1, stage2_b1 -> stage2, ...


class HRNetStage(nn.Module):
    """One HRNet stage as ``HRNetBackbone.forward_stages`` runs it: the ``transition`` (the
    existing branches as they are, a new branch from the last one), then ``stage``. It holds
    the body's modules and no parameter of its own (``HRNetBackbone.stage_modules`` builds it
    on call; not a submodule of the backbone). Takes a tensor (``layer1``'s output) or the
    previous stage's list of branches; returns the list of branches, finest first. Masked
    execution implements it (:mod:`segdistill.modeling.masked_hrnet`)."""

    def __init__(self, transition: nn.ModuleList, stage: nn.Module):
        super().__init__()
        self.transition, self.stage = transition, stage

    def forward(self, x):
        return self.stage(_transition(self.transition, list(x) if isinstance(x, (list, tuple)) else [x]))


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Build ``MODEL.TIMM.NAME`` (ResNet*, MobileNetV2*, HRNet*, ...) as a detectron2 Backbone."""
    if cfg.MODEL.TIMM.NAME.startswith("hrnet"):
        return HRNetBackbone(cfg, input_shape)
    return TimmBackbone(cfg, input_shape)
