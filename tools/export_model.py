#!/usr/bin/env python
"""Export a deployed model to TorchScript or ONNX: raw image in, logits at the input size out.

    python tools/export_model.py --config-file DEPLOYED_CONFIG.yaml --format onnx \
        --output model.onnx MODEL.WEIGHTS model_deploy.pth

What it exports (docs/deploy.md): the model the config builds, through its public forward
(``model([{"image": CxHxW}])[0]["sem_seg"]``), so the graph holds the pixel normalisation,
the padding to the backbone's size divisibility and the resizing of the logits to the input:

* input ``image``: float32 ``1 x 3 x H x W``, raw pixel values 0..255 in the config's
  ``INPUT.FORMAT`` channel order (RGB for the timm backbones), not normalised;
* output ``logits``: float32 ``1 x K x H x W`` (argmax over K is the prediction);
* H and W are dynamic (any size, also not a multiple of the output stride) unless
  ``--fixed-size``; the batch is one image (the forward takes a list of images).

Deployed models: a plain ``SemanticSegmentor`` (a baseline, or the deployed checkpoint of a
multi-exit model or a distilled student with its own config), and the multi-exit model with a
fixed exit (the training config with ``MODEL.META_ARCHITECTURE AnytimeSegmentor
MODEL.EXITS.ANYTIME.POLICY exit:<name>`` or ``final``). Training models (a ``Distiller``, a
``MultiExitSegmentor``) and the ``confidence`` policy (it chooses a path per image) are
refused with what to export instead.

``TEST.FOLD_BN True`` folds every convolution's BatchNorm into it before tracing (one pass less
over the map per norm; docs/deploy.md "BatchNorm folding"); the file is still checked against
the model as loaded, with its norms.

After writing, the file is run (TorchScript: torch.jit.load; ONNX: onnxruntime on CPU) next
to the eager model at the traced size and at a second size that is not a multiple of 32; a
difference above 1e-4 (relative to the largest logit when logits are large) is an error, so a
graph that tracing specialised to one size is never written silently as a dynamic one.
ONNX needs the optional packages of ``pip install .[export]`` (onnx, onnxruntime).
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Callable, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import segdistill  # noqa: E402,F401
from detectron2.export import TracingAdapter  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from segdistill.config import config_tool_parser, load_yaml_config  # noqa: E402
from segdistill.convert import DeployableModel  # noqa: E402
from segdistill.data import register_config_datasets  # noqa: E402
from segdistill.engine import fold_for_inference  # noqa: E402
from segdistill.engine.trainer import load_evaluation_weights  # noqa: E402
from segdistill.modeling.meta_arch.anytime import AnytimeSegmentor, parse_policy  # noqa: E402

__all__ = ["ExportError", "check_exportable", "export_model", "exported_runner", "main"]

FORMATS = ("torchscript", "onnx")
INPUT_NAME, OUTPUT_NAME = "image", "logits"
ONNX_OPSET = 17
TOLERANCE = 1e-4
EXTRA_HINT = "pip install .[export]  (or: pip install onnx onnxruntime)"

logger = logging.getLogger("segdistill.export")


class ExportError(RuntimeError):
    """The model cannot be exported as asked; the message says what to export instead."""


def require_onnx():
    """(onnx, onnxruntime), or an ImportError naming the ``export`` extra."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"ONNX export needs the optional packages onnx and onnxruntime ({e.name!r} is missing): "
                          f"{EXTRA_HINT}. TorchScript export (--format torchscript) needs neither.") from e
    return onnx, onnxruntime


def check_exportable(model: nn.Module) -> None:
    """Refuse what is not one deployed, input-independent graph, saying what to export instead."""
    if isinstance(model, DeployableModel):
        raise ExportError(
            f"{type(model).__name__} is a training model (its training-only parts are dropped at deployment). "
            "Write its deployed checkpoint first, then export the deployed model:\n"
            "  python tools/deploy_model.py --config-file TRAIN_CONFIG --output model_deploy.pth "
            "MODEL.WEIGHTS model_final.pth\n"
            "  python tools/export_model.py --config-file DEPLOYED_CONFIG ... MODEL.WEIGHTS model_deploy.pth\n"
            "(DEPLOYED_CONFIG: a multi-exit model's baseline config, a distiller's student config); for a "
            "multi-exit model answering from one exit, keep the training config and add "
            "MODEL.META_ARCHITECTURE AnytimeSegmentor MODEL.EXITS.ANYTIME.POLICY exit:<name>.")
    if isinstance(model, AnytimeSegmentor):
        kind, _ = parse_policy(model.policy, model.exit_names)
        if kind == "confidence":
            choices = ", ".join(["final"] + [f"exit:{n}" for n in model.exit_names])
            raise ExportError(
                "MODEL.EXITS.ANYTIME.POLICY 'confidence' chooses the answering exit per image from the exits' "
                "confidences; an exported graph runs one fixed path. Export a fixed exit instead: "
                f"MODEL.EXITS.ANYTIME.POLICY exit:<name> (one of: {choices}), one file per exit if the "
                "choice is to be made outside the model.")
        if kind == "pixel":
            raise ExportError(
                "MODEL.EXITS.ANYTIME.POLICY 'pixel' freezes pixels per image from the exits' probabilities and "
                "stops when none is left; an exported graph runs one fixed path. Export MODEL.EXITS.ANYTIME.POLICY "
                "final or exit:<name> instead.")


def _logits(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The deployed model's public forward on one ``1 x 3 x H x W`` image: ``1 x K x H x W`` logits."""
    return model([{"image": image[0]}])[0]["sem_seg"][None]


class _Exported(nn.Module):
    """The TorchScript file's module: the traced graph (whose outputs TracingAdapter flattened to a
    tuple) returning the logits tensor; with a fixed size, every other size is refused, since a
    traced graph runs at any size with the traced size's constants."""

    def __init__(self, traced: nn.Module, fixed_size: Optional[Tuple[int, int]]):
        super().__init__()
        self.traced = traced
        self.height, self.width = (int(fixed_size[0]), int(fixed_size[1])) if fixed_size else (-1, -1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.height >= 0 and (image.shape[-2] != self.height or image.shape[-1] != self.width):
            raise RuntimeError(f"this model was exported for {self.height}x{self.width} images only (--fixed-size)")
        return self.traced(image)[0]


def _trace(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    adapter = TracingAdapter(model, (example,), inference_func=_logits).eval()  # eval: exporters restore this mode
    with warnings.catch_warnings():
        # torch.jit.trace is deprecated in favour of torch.export, which cannot keep H and W
        # dynamic through detectron2's padding and postprocessing (docs/deploy.md): not the user's concern.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace", category=DeprecationWarning)
        with torch.no_grad():
            return torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)


def export_model(model: nn.Module, fmt: str, path: str, *, input_size: Sequence[int] = (512, 1024),
                 fixed_size: bool = False) -> str:
    """Write ``model`` (a deployed model, in eval mode) as ``fmt`` to ``path``; returns ``path``.

    Traced with detectron2's ``TracingAdapter`` at ``input_size`` (H, W); H and W stay dynamic
    unless ``fixed_size``."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {FORMATS}")
    check_exportable(model)
    if fmt == "onnx":
        require_onnx()
    model.eval()
    device = _device(model)
    example = torch.rand(1, 3, *[int(v) for v in input_size], generator=torch.Generator().manual_seed(0)) * 255
    traced = _trace(model, example.to(device))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if fmt == "torchscript":
        torch.jit.save(torch.jit.script(_Exported(traced, tuple(input_size) if fixed_size else None)), path)
        return path
    dynamic = None if fixed_size else {INPUT_NAME: {2: "height", 3: "width"}, OUTPUT_NAME: {2: "height", 3: "width"}}
    with warnings.catch_warnings():
        # The TorchScript-based exporter, chosen for the same reason as torch.jit.trace above.
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="no signature found for <torch.ScriptMethod")  # it reads none
        torch.onnx.export(traced, (example.to(device),), path, dynamo=False, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes=dynamic, opset_version=ONNX_OPSET)
    return path


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def exported_runner(fmt: str, path: str, device="cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running the exported file on a ``1 x 3 x H x W`` image: TorchScript on
    ``device`` (the device it was traced on: a trace records its tensors' device), ONNX with
    onnxruntime on CPU; returns CPU logits."""
    if fmt == "torchscript":
        module = torch.jit.load(path, map_location=device).eval()

        def run(image):
            with torch.no_grad():
                return module(image.to(device)).cpu()
        return run
    _, ort = require_onnx()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda image: torch.from_numpy(session.run(None, {INPUT_NAME: image.cpu().numpy()})[0])


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b|, relative to the largest |logit| where that is above 1."""
    scale = max(1.0, float(a.abs().max()))
    return float((a - b).abs().max()) / scale


def verify(model: nn.Module, fmt: str, path: str, sizes: Sequence[Tuple[int, int]],
           tolerance: float = TOLERANCE) -> dict:
    """Run the exported file next to the eager model on random images of ``sizes``; returns
    {size: relative max difference}; an ExportError when one exceeds ``tolerance``."""
    device = _device(model)
    run = exported_runner(fmt, path, device)
    model.eval()
    found = {}
    for i, (h, w) in enumerate(sizes):
        image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(i + 1)) * 255
        with torch.no_grad():
            ref = _logits(model, image.to(device)).cpu()
        out = run(image)
        if tuple(out.shape) != tuple(ref.shape):
            raise ExportError(f"The exported {fmt} model gives logits of shape {tuple(out.shape)} for a {h}x{w} image, "
                              f"the eager model {tuple(ref.shape)}.")
        found[(h, w)] = max_difference(ref, out)
    bad = {s: d for s, d in found.items() if d > tolerance}
    if bad:
        raise ExportError(
            f"The exported {fmt} model differs from the eager model at {sorted(bad)} (relative max difference "
            f"{max(bad.values()):.3g} > {tolerance}): tracing recorded a size computed in Python as a constant, so "
            "the graph is only right at the traced size. Export with --fixed-size --input-size H W for the size "
            "you will run.")
    return found


def check_sizes(input_size: Sequence[int], fixed_size: bool) -> Tuple[Tuple[int, int], ...]:
    """The sizes the written file is checked at: the traced size, and with dynamic H and W a
    second size that is not a multiple of 32 (so the padding and the resize to the input are exercised)."""
    h, w = (int(v) for v in input_size)
    if fixed_size:
        return ((h, w),)
    return ((h, w), (h + 37, max(w - 21, 33)))


def main(argv: Optional[Sequence[str]] = None) -> str:
    p = config_tool_parser(__doc__, "the config of the deployed model (see docs/deploy.md)",
                           "KEY VALUE overrides (MODEL.WEIGHTS: the deployed or trained checkpoint)")
    p.add_argument("--format", choices=FORMATS, required=True, help="torchscript (.pt) or onnx (.onnx)")
    p.add_argument("--output", required=True, help="the file to write")
    p.add_argument("--input-size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"),
                   help="the image size traced and checked (default 512 1024); with --fixed-size the only size")
    p.add_argument("--fixed-size", action="store_true",
                   help="export for --input-size only (for models whose forward computes sizes in Python)")
    args = p.parse_args(argv)
    setup_logger(name="segdistill")
    cfg = load_yaml_config(args.config_file, args.opts)
    register_config_datasets(cfg)  # DATASETS.FOLDER (an HS3 model reads its class names)
    if args.format == "onnx":
        try:
            require_onnx()
        except ImportError as e:
            p.error(str(e))
    model = build_model(cfg)
    try:
        check_exportable(model)
    except ExportError as e:
        p.error(str(e))
    load_evaluation_weights(model, cfg.MODEL.WEIGHTS, allow_random=cfg.TEST.ALLOW_RANDOM_WEIGHTS,
                            min_matched=cfg.TEST.MIN_MATCHED_WEIGHTS)
    model.eval()
    # TEST.FOLD_BN: the norms folded before tracing; the file is checked against the model as loaded
    deployed = fold_for_inference(model, cfg.TEST.FOLD_BN, copy_model=True)
    path = export_model(deployed, args.format, args.output, input_size=args.input_size, fixed_size=args.fixed_size)
    try:
        found = verify(model, args.format, path, check_sizes(args.input_size, args.fixed_size))
    except ExportError as e:
        os.remove(path)  # a file with wrong logits at some sizes is not left behind
        p.error(f"{e} Nothing was written to {path}.")
    logger.info("Wrote %s (%s, %s); exported vs eager logits, relative max difference: %s", path, args.format,
                f"fixed {args.input_size[0]}x{args.input_size[1]}" if args.fixed_size else "dynamic height and width",
                ", ".join(f"{h}x{w}: {d:.2g}" for (h, w), d in found.items()))
    print(path)
    return path


if __name__ == "__main__":
    main()
