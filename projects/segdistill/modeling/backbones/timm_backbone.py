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

Nothing is ever downloaded: ``pretrained`` is always off, and ``checkpoint`` loads a local
timm/torchvision state dict for the body (classifier keys are dropped).
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence

import timm
import torch
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from ..stagewise import StagewiseBackbone  # issue 15: the stage-by-stage contract
from .norm import convert_norm, resolve_norm

__all__ = ["TimmBackbone", "HRNetBackbone", "build_timm_backbone", "load_body_checkpoint"]

logger = logging.getLogger(__name__)


def load_body_checkpoint(body: nn.Module, path: str) -> None:
    """Load a local ImageNet state dict into a timm body; classifier keys are skipped.

    Raises FileNotFoundError naming the path when the file is missing, and ValueError when
    the file covers less than half of the body's tensors (another architecture).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Backbone checkpoint not found: {path!r} (MODEL.TIMM.CHECKPOINT). Nothing is "
            "downloaded by this project: put the timm/torchvision ImageNet weights file "
            "(.pth, .pt, .bin or .safetensors) at that path, or set MODEL.TIMM.CHECKPOINT ''."
        )
    state = timm.models.load_state_dict(path, use_ema=False)
    own = body.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    # Scalar BN counters match any architecture by name; judge the fit on real tensors.
    real = [k for k in own if not k.endswith("num_batches_tracked")]
    covered = sum(k in matched for k in real)
    if covered < 0.5 * len(real):
        raise ValueError(
            f"{path!r} fits only {covered} of the {len(real)} tensors of the backbone "
            f"{type(body).__name__}: is it a checkpoint of the same architecture (MODEL.TIMM.NAME)?"
        )
    missing = sorted(set(own) - set(matched))
    skipped = sorted(set(state) - set(matched))
    body.load_state_dict(matched, strict=False)
    logger.info(
        "Loaded %d tensors from %s into the backbone (%d missing, %d skipped%s).",
        len(matched), path, len(missing), len(skipped),
        f": {skipped[:6]}{'...' if len(skipped) > 6 else ''}" if skipped else "",
    )
    if missing:
        logger.warning("Backbone tensors not in the checkpoint: %s", missing[:10])


class TimmBackbone(StagewiseBackbone):
    """A timm ``features_only`` model (ResNet, MobileNetV2, ...) as a detectron2 Backbone."""

    def __init__(
        self,
        model_name: str,
        *,
        output_stride: int = 32,
        out_features: Optional[Sequence[str]] = None,
        norm: str = "BN",
        checkpoint: str = "",
        in_chans: int = 3,
    ):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"MODEL.TIMM.OUTPUT_STRIDE must be 8, 16 or 32, got {output_stride}")
        self.body = timm.create_model(
            model_name,
            pretrained=False,
            features_only=True,
            output_stride=output_stride,
            in_chans=in_chans,
        )
        info = self.body.feature_info
        # res{k}: 2**k is the level's reduction without dilation (res1 = 1/2 ... res5 = 1/32).
        names = [f"res{r.bit_length() - 1}" for r in _nominal_reductions(info)]
        self._all_names = names
        self._out_feature_channels = dict(zip(names, info.channels()))
        self._out_feature_strides = dict(zip(names, info.reduction()))
        self._out_features = _check_out_features(out_features or [names[-1]], names, model_name)
        # Ask timm only for the levels we return.
        self._return_index = [names.index(n) for n in self._out_features]
        if checkpoint:
            load_body_checkpoint(self.body, checkpoint)
        convert_norm(self, norm)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.body(x)
        return {self._all_names[i]: feats[i] for i in self._return_index}

    # ---- stage by stage (issue 15, anytime inference): the StagewiseBackbone contract ----
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


def _check_out_features(wanted: Sequence[str], valid: Sequence[str], model: str) -> List[str]:
    bad = [n for n in wanted if n not in valid]
    if bad:
        raise ValueError(
            f"Unknown backbone feature(s) {bad} for {model}; valid names: {list(valid)} "
            "(MODEL.TIMM.OUT_FEATURES / the head's IN_FEATURES)."
        )
    return list(wanted)


class HRNetBackbone(StagewiseBackbone):
    """HRNetV2 from timm, exposing every stage's branches (see the module docstring)."""

    def __init__(
        self,
        model_name: str = "hrnet_w18",
        *,
        out_features: Optional[Sequence[str]] = None,
        norm: str = "BN",
        checkpoint: str = "",
        in_chans: int = 3,
    ):
        super().__init__()
        # feature_location='' gives the plain HRNet (no classification 'incre' modules).
        self.body = timm.create_model(
            model_name, pretrained=False, features_only=True, feature_location="", in_chans=in_chans
        )
        body = self.body
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
        if checkpoint:
            load_body_checkpoint(self.body, checkpoint)
        convert_norm(self, norm)

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

    # ---- stage by stage (issue 15, anytime inference): the StagewiseBackbone contract ----
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
    # ---- end of the stage-by-stage hunk ----

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            n: ShapeSpec(channels=self._shapes[n][0], stride=self._shapes[n][1])
            for n in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        # Branch fusion upsamples the 1/32 branch by exact factors: inputs are padded to 32.
        return 32


def _transition(transitions: nn.ModuleList, yl: List[torch.Tensor]) -> List[torch.Tensor]:
    """HRNet's branch transition: identity for existing branches, a new branch from the last."""
    return [yl[i] if isinstance(t, nn.Identity) else t(yl[-1]) for i, t in enumerate(transitions)]


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Build ``MODEL.TIMM.NAME`` (ResNet*, MobileNetV2*, HRNet*, ...) as a detectron2 Backbone."""
    c = cfg.MODEL.TIMM
    kwargs = dict(
        out_features=list(c.OUT_FEATURES) or None,
        norm=resolve_norm(cfg, "backbone"),
        checkpoint=c.CHECKPOINT,
        in_chans=input_shape.channels,
    )
    if c.NAME.startswith("hrnet"):
        if c.OUTPUT_STRIDE != 32:
            raise ValueError(
                "HRNet keeps a stride-4 branch and has no dilated variant: "
                f"MODEL.TIMM.OUTPUT_STRIDE must be 32 for {c.NAME}, got {c.OUTPUT_STRIDE}."
            )
        return HRNetBackbone(c.NAME, **kwargs)
    return TimmBackbone(c.NAME, output_stride=c.OUTPUT_STRIDE, **kwargs)
