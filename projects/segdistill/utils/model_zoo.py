"""Model card: parameters and GFLOPs of every model config, beside the papers' stated sizes.

What ``tools/model_table.py`` prints and writes to docs/model_zoo.md (and the README's
model-zoo section), and what the tests check against the papers. Models are built with
random weights (nothing is loaded or downloaded) in eval mode.

* **Params (inference)**: the deployed model (backbone + head); **Params (train)** adds the
  training-only auxiliary FCN head. The papers' counts include it where their code builds
  it (CIRKD, the codebase of HWD, always builds the aux head on ResNet backbones).
* **GFLOPs**: fvcore's count of one forward pass (image -> logits at the head's stride,
  then upsampled) at the paper's evaluation size (Cityscapes 1024x2048, COCO-Stuff
  512x512). fvcore counts one fused multiply-add as one flop, i.e. its "FLOPs" are MACs,
  the convention of CIRKD's ``cal_multi_adds`` (HWD) and of HS3's GMACs; **conv GMACs**
  is the convolutions' and matrix products' share, which is all that CIRKD counts.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from ..config import add_segdistill_config

# The repository root (configs/ and docs/ are relative to it).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

__all__ = [
    "PaperRef", "PAPER_REFS", "EVAL_SIZES", "COUNTED_META_ARCHS", "load_cfg", "yaml_configs", "meta_arch_of",
    "count_params", "count_flops", "count_cirkd_macs", "table_rows", "paper_rows", "readme_section",
    "TABLE_HEAD", "PAPER_HEAD", "NOTES",
]

# The size each dataset's papers evaluate (and count FLOPs) at.
EVAL_SIZES = {"cityscapes": (1024, 2048), "coco_stuff": (512, 512), "camvid": (360, 480), "demo": (160, 160)}
# Meta-architectures whose deployed model this script counts. Others (multi-exit, distiller)
# deploy a SemanticSegmentorAnySize from their baseline config; add them here with their rule.
COUNTED_META_ARCHS = ("SemanticSegmentorAnySize", "SemanticSegmentor")
# Ops whose fvcore count is a multiply-accumulate of weights (what CIRKD's cal_multi_adds counts).
MAC_OPS = ("conv", "linear", "matmul", "bmm", "einsum", "addmm")


@dataclass
class PaperRef:
    """A model size a paper states, and how to build our counterpart."""

    name: str
    config: str
    num_classes: int
    size: Tuple[int, int]
    source: str
    params_m: Optional[float] = None
    gflops: Optional[float] = None
    unit: str = "GFLOPs"
    # How the paper's number is reproduced: "cirkd" (CIRKD's counter, HWD's code base) or an
    # input size (h, w) at which fvcore's count is compared (HS3 states none).
    convention: object = "cirkd"


PAPER_REFS: List[PaperRef] = [
    PaperRef("DeepLabV3-R101", "configs/cityscapes/baseline/deeplabv3_r101.yaml", 150, (512, 512),
             "HWD Table II (ADE20K, 150 classes, 512x512)", 61.1, 384.7),
    PaperRef("DeepLabV3-R18", "configs/cityscapes/baseline/deeplabv3_r18.yaml", 150, (512, 512),
             "HWD Table II (ADE20K, 150 classes, 512x512)", 13.6, 86.0),
    PaperRef("DeepLabV3-MBV2", "configs/cityscapes/baseline/deeplabv3_mbv2.yaml", 150, (512, 512),
             "HWD Table II (ADE20K, 150 classes, 512x512)", 3.2, 22.6),
    PaperRef("PSPNet-R18", "configs/cityscapes/baseline/pspnet_r18.yaml", 150, (512, 512),
             "HWD Table II (ADE20K, 150 classes, 512x512)", 12.9, 67.6),
    PaperRef("HRNetV2-W18", "configs/cityscapes/baseline/hrnetv2_w18.yaml", 19, (1024, 2048),
             "HS3 Table 3 (Cityscapes)", None, 76, "GMACs", (1024, 1024)),
    PaperRef("OCRNet-HRNetV2-W18", "configs/cityscapes/baseline/ocrnet_hrnetv2_w18.yaml", 19, (1024, 2048),
             "HS3 Table 3 (Cityscapes)", None, 154, "GMACs", (1024, 1024)),
]


def load_cfg(path: str, num_classes: Optional[int] = None, opts: Optional[List[str]] = None):
    """The YAML config at ``path`` (relative to the repository root or absolute), on CPU."""
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(path if os.path.isabs(path) else os.path.join(ROOT, path))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.TIMM.CHECKPOINT = ""  # sizes need no ImageNet start (and download nothing)
    cfg.MODEL.TIMM.PRETRAINED = ""
    if num_classes is not None:
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    if opts:
        cfg.merge_from_list(opts)
    return cfg


def yaml_configs(root: str = os.path.join(ROOT, "configs")) -> List[str]:
    """Every model YAML under ``root`` (``Base-*.yaml`` are bases, not models), sorted."""
    paths = glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True)
    return sorted(p for p in paths if not os.path.basename(p).startswith("Base-"))


def meta_arch_of(path: str) -> str:
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(path)
    return cfg.MODEL.META_ARCHITECTURE


class Deployed(nn.Module):
    """Image tensor -> logits at the input size (the head resizes them, as SemanticSegmentorAnySize): the
    inference path without pre/post-processing."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.backbone
        self.head = model.sem_seg_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x), output_size=tuple(x.shape[-2:]))[0]


def count_params(model: nn.Module) -> Dict[str, int]:
    """``train``: every parameter as built; ``inference``: without training-only aux heads."""
    total = sum(p.numel() for p in model.parameters())
    aux = 0
    for name, module in model.named_modules():
        if name.endswith("aux_head") and module is not None:
            aux += sum(p.numel() for p in module.parameters())
    return {"train": total, "inference": total - aux}


def count_flops(model: nn.Module, size: Tuple[int, int], device: str = "cpu") -> Dict[str, float]:
    """fvcore counts (multiply-adds) of one image at ``size``: total and weight-MAC ops only."""
    from fvcore.nn import FlopCountAnalysis

    net = Deployed(model).to(device).eval()
    x = torch.randn(1, 3, *size, device=device)
    with torch.no_grad():
        analysis = FlopCountAnalysis(net, x)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_op = analysis.by_operator()
    total = sum(by_op.values())
    macs = sum(v for k, v in by_op.items() if any(m in k for m in MAC_OPS))
    return {"total": total, "macs": macs}


def count_cirkd_macs(model: nn.Module, size: Tuple[int, int], device: str = "cpu") -> float:
    """Multiply-adds as CIRKD's ``cal_multi_adds`` (the counter behind HWD's numbers) counts them.

    It counts convolutions and linear layers only, runs the auxiliary head too (CIRKD's
    models always do), and computes a convolution's output size as
    ``(in + 2 * padding - kernel) // stride + 1``, ignoring dilation: a dilated 3x3 conv
    with padding = dilation d is counted on a map 2(d - 1) pixels larger per side than it
    computes, which inflates the ASPP (rates 12/24/36) of the 512x512 counts by about a third.
    """
    total = [0]

    def conv_hook(m, inputs, _output):
        h, w = inputs[0].shape[-2:]
        oh = (h + 2 * m.padding[0] - m.kernel_size[0]) // m.stride[0] + 1
        ow = (w + 2 * m.padding[1] - m.kernel_size[1]) // m.stride[1] + 1
        total[0] += m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1] * oh * ow // m.groups

    def linear_hook(m, _inputs, _output):
        total[0] += m.weight.numel()

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        model = model.to(device).eval()
        with torch.no_grad():
            feats = model.backbone(torch.randn(1, 3, *size, device=device))
            model.sem_seg_head(feats, output_size=tuple(size))
            aux = getattr(model.sem_seg_head, "aux_head", None)
            if aux is not None:
                aux(feats)
    finally:
        for h in hooks:
            h.remove()
    return float(total[0])


def build(cfg) -> nn.Module:
    torch.manual_seed(0)
    return build_model(cfg).eval()


def dataset_of(path: str) -> str:
    rel = os.path.relpath(path, os.path.join(ROOT, "configs"))
    return rel.split(os.sep)[0]


def _m(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def _g(n: float) -> str:
    return f"{n / 1e9:.1f}"


def table_rows(paths: List[str], flops: bool, device: str) -> Tuple[List[str], List[str]]:
    rows, skipped = [], []
    for path in paths:
        rel = os.path.relpath(path, ROOT)
        arch = meta_arch_of(path)
        if arch not in COUNTED_META_ARCHS:
            skipped.append(f"`{rel}` ({arch})")
            continue
        cfg = load_cfg(path)
        model = build(cfg)
        params = count_params(model)
        size = EVAL_SIZES.get(dataset_of(path), (512, 512))
        f = count_flops(model, size, device) if flops else None
        rows.append(
            f"| `{rel}` | {cfg.MODEL.TIMM.NAME} | {cfg.MODEL.SEM_SEG_HEAD.NAME} | {cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES} "
            f"| {_m(params['inference'])} | {_m(params['train'])} | {size[0]}x{size[1]} "
            f"| {_g(f['total']) if f else '-'} | {_g(f['macs']) if f else '-'} |"
        )
        print(rows[-1], flush=True)
        del model
    return rows, skipped


def paper_rows(flops: bool, device: str) -> List[str]:
    rows = []
    for ref in PAPER_REFS:
        model = build(load_cfg(ref.config, num_classes=ref.num_classes))
        params = count_params(model)
        f = count_flops(model, ref.size, device) if flops else None
        if not flops:
            conv = "-"
        elif ref.convention == "cirkd":
            conv = f"{_g(count_cirkd_macs(model, ref.size, device))} (CIRKD's counter, {ref.size[0]}x{ref.size[1]})"
        else:
            h, w = ref.convention
            conv = f"{_g(count_flops(model, (h, w), device)['total'])} (fvcore at {h}x{w})"
        ours_p = params["train"]
        dp = f" ({100 * (ours_p / 1e6 - ref.params_m) / ref.params_m:+.1f}%)" if ref.params_m else ""
        paper_p = f"{ref.params_m}M" if ref.params_m else "-"
        rows.append(
            f"| {ref.name} | {ref.source} | {paper_p} | {_m(ours_p)}{dp} | {_m(params['inference'])} "
            f"| {ref.gflops} {ref.unit} | {_g(f['total']) if f else '-'} ({ref.size[0]}x{ref.size[1]}) | {conv} |"
        )
        print(rows[-1], flush=True)
        del model
    return rows


TABLE_HEAD = (
    "| config | backbone | head | classes | params (inference) | params (train, + aux) | input "
    "| GFLOPs (fvcore) | conv GMACs |\n|---|---|---|---|---|---|---|---|---|"
)
PAPER_HEAD = (
    "| model | paper | paper params | ours (train, + aux) | ours (inference) | paper FLOPs "
    "| ours GFLOPs (fvcore) | ours, paper's convention |\n|---|---|---|---|---|---|---|---|"
)

NOTES = """\
How to read it:

* Counts are of models with random weights, built from the configs (`tools/model_table.py`).
  *params (train)* includes the training-only FCN auxiliary head, *params (inference)* does not.
* fvcore counts one multiply-add as one flop, so its "GFLOPs" are GMACs: the unit of CIRKD's
  `cal_multi_adds` (HWD reports these as "FLOPs") and of HS3's "GMACs". Papers that count
  FLOPs as 2 x MACs would report twice these numbers. *conv GMACs* keeps only convolutions and
  matrix products; the total also has fvcore's counts of norms, upsampling and pooling.
* HWD's Table II (ADE20K: 150 classes, 512x512) sizes are those of CIRKD's code, which HWD
  builds on: DeepLabV3 with a 3x3 conv after the ASPP (`ASPP_BOTTLENECK_CONVS: 1`), 256 ASPP
  channels on ResNet-101 and 128 on ResNet-18/MobileNetV2, the FCN auxiliary head on `res4`
  (in/4 channels) built and counted on ResNets, none on MobileNetV2. The paper rows build our
  Cityscapes configs with 150 classes. Remaining parameter gap: CIRKD's ResNets have a deep
  stem (three 3x3 convs, 64-64-128 channels; timm's `resnet101s`), ours the torchvision 7x7
  stem (+0.12M on R101, +0.15M on R18 for the deep stem, i.e. 61.18M / 13.63M / 12.94M).
* HWD's FLOPs are CIRKD's `cal_multi_adds` at 512x512: convolutions and linear layers only,
  the aux head included, and a convolution's output size taken as
  `(in + 2 * padding - kernel) // stride + 1`, i.e. *ignoring dilation*: the ASPP's rate-36
  conv on a 64x64 map is counted on 134x134. The "paper's convention" column applies that
  counter to our models: 377.6 / 78.6 / 22.7 / 60.1 GMACs; CIRKD's deep stem adds 7.4 (R101)
  and 7.5 (R18) GMACs at 512x512, giving 385.0 / 86.1 / 22.7 / 67.6 against the paper's
  384.7 / 86.0 / 22.6 / 67.6. The real cost (fvcore) is 30-40% lower than the paper's numbers.
* HS3's Table 3 gives GMACs without an input size. Our HRNetV2-W18 costs 149 GMACs at the
  full Cityscapes 1024x2048 and 75 at 1024x1024, which matches the paper's 76: HS3 counts at
  half the full-resolution pixels (a 1024x1024 crop). OCRNet-HRNetV2-W18 is 214 GMACs at
  1024x1024 with the standard OCR head (512 mid / 256 key channels on the stride-4
  concatenation) against HS3's 154; HS3 tunes the OCR channels to trade accuracy for GMACs
  (its Figure 4) and does not state the baseline's, so that row is not a like-for-like check.
"""

def readme_section(prows: List[str]) -> str:
    return "\n".join([
        "## Model zoo",
        "",
        "Configs for Cityscapes (`configs/cityscapes/baseline/`) and COCO-Stuff-164k",
        "(`configs/coco_stuff/baseline/`), YAML and lazy: DeepLabV3 (R101, R18, MobileNetV2), PSPNet",
        "(R101, R18), DeepLabV3+ (R101), HRNetV2 (W18, W48), OCRNet on HRNetV2 (W18, W48). The",
        "papers' models beside their stated sizes:",
        "",
        PAPER_HEAD, *prows,
        "",
        "Every config's parameters and GFLOPs: [docs/model_zoo.md](docs/model_zoo.md)",
        "(`python tools/model_table.py` regenerates it).",
    ])
