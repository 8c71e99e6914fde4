"""tools/export_model.py: the exported TorchScript and ONNX (onnxruntime, CPU) files give the
eager deployed model's logits at several input sizes (dynamic height and width, odd sizes
too) for a plain model, a distilled student and a multi-exit model with a fixed exit; what
cannot be one graph is refused with what to export instead; a trace specialised to one size is
caught; ONNX without its packages names the extra."""
import importlib.util
import json
import math
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import REPO, load_script, set_keys, tiny_cfg, trained_model
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from segdistill.convert import save_deployed_checkpoint

K = 5
SIZES = [(64, 96), (96, 128), (75, 51)]  # multiples of 32, and an odd size (not a multiple of the stride)
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
FORMATS = ["torchscript", pytest.param("onnx", marks=pytest.mark.skipif(
    not HAS_ONNX, reason="onnx / onnxruntime not installed (pip install .[export]; requirements-test.txt has them)"))]

export_tool = load_script("export_model", "tools/export_model.py")


def eager_logits(model, image):
    with torch.no_grad():
        return model([{"image": image[0]}])[0]["sem_seg"][None]


def assert_same_logits(model, fmt, path, sizes=SIZES):
    run = export_tool.exported_runner(fmt, path)
    for i, (h, w) in enumerate(sizes):
        image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(10 + i)) * 255
        ref, out = eager_logits(model, image), run(image)
        assert out.shape == (1, K, h, w) == ref.shape
        assert (out - ref).abs().max() < 1e-4, (fmt, (h, w), float((out - ref).abs().max()))


@pytest.fixture(scope="module")
def plain():
    return trained_model(tiny_cfg("resnet18", "SegDeepLabV3Head", num_classes=K), K, 1)


def exit_cfg(policy):
    cfg = tiny_cfg("resnet18", "SegDeepLabV3Head", num_classes=K, **{"MODEL.META_ARCHITECTURE": "AnytimeSegmentor"})
    return set_keys(cfg, **{"MODEL.EXITS.MODE": "ds", "MODEL.EXITS.CHANNELS": 16,
                            "MODEL.EXITS.IN_FEATURES": ["res3", "res4"], "MODEL.EXITS.ANYTIME.POLICY": policy})


@pytest.mark.parametrize("fmt", FORMATS)
def test_plain_model_exports_with_the_eager_logits_at_any_size(plain, fmt, tmp_path):
    path = export_tool.export_model(plain, fmt, str(tmp_path / f"m.{fmt}"), input_size=(64, 64))
    assert_same_logits(plain, fmt, path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_input_resize_rule_exports_with_dynamic_sizes(fmt, tmp_path):
    """mmsegmentation's rule (logits resized to the input size, OUTPUT_RESIZE input) follows the
    input's size in the exported graph too, odd sizes included."""
    model = trained_model(tiny_cfg("resnet18", "SegDeepLabV3Head", num_classes=K,
                                   **{"MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE": "input"}), K, 1)
    path = export_tool.export_model(model, fmt, str(tmp_path / f"m.{fmt}"), input_size=(64, 64))
    assert_same_logits(model, fmt, path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fixed_exit_of_a_multi_exit_model_exports(fmt, tmp_path):
    torch.manual_seed(0)
    model = build_model(exit_cfg("exit:res3")).eval()
    path = export_tool.export_model(model, fmt, str(tmp_path / f"m.{fmt}"), input_size=(64, 64))
    assert_same_logits(model, fmt, path)
    model.policy = "final"  # the same weights answering from the head give other logits: the exit was exported
    image = torch.rand(1, 3, 64, 64) * 255
    assert (export_tool.exported_runner(fmt, path)(image) - eager_logits(model, image)).abs().max() > 1e-3


@pytest.mark.parametrize("fmt", FORMATS)
def test_distilled_student_from_its_deployed_checkpoint_through_the_command_line(fmt, tmp_path):
    """Distiller -> deployed checkpoint -> the student's config -> exported file == the distiller's eval output."""
    teacher = tiny_cfg("resnet18", "SegDeepLabV3Head", output_stride=16, num_classes=K)
    (tmp_path / "teacher.yaml").write_text(teacher.dump())
    cfg = tiny_cfg("resnet18", "SegDeepLabV3Head", num_classes=K, **{
        "MODEL.META_ARCHITECTURE": "Distiller", "MODEL.DISTILL.TEACHER.CONFIG_FILE": str(tmp_path / "teacher.yaml"),
        "MODEL.DISTILL.TEACHER.ALLOW_RANDOM": True, "MODEL.DISTILL.LOSSES": ["cwd"]})
    torch.manual_seed(0)
    distiller = build_model(cfg).eval()
    deployed = save_deployed_checkpoint(distiller, str(tmp_path / "student.pth"))
    student = cfg.clone()
    student.MODEL.META_ARCHITECTURE = "SemanticSegmentor"  # the student's own config
    (tmp_path / "student.yaml").write_text(student.dump())
    out = str(tmp_path / f"student.{fmt}")
    export_tool.main(["--config-file", str(tmp_path / "student.yaml"), "--format", fmt, "--output", out,
                      "--input-size", "64", "64", "MODEL.WEIGHTS", deployed])
    assert_same_logits(distiller, fmt, out)

    if fmt == "onnx":
        return
    # the training config itself is refused, naming the deploy step
    (tmp_path / "train.yaml").write_text(cfg.dump())
    DetectionCheckpointer(distiller, str(tmp_path)).save("model_final")
    with pytest.raises(SystemExit):
        export_tool.main(["--config-file", str(tmp_path / "train.yaml"), "--format", fmt, "--output", out,
                          "MODEL.WEIGHTS", str(tmp_path / "model_final.pth")])


def test_training_models_and_the_confidence_policy_are_refused_with_what_to_export():
    multi = build_model(set_keys(tiny_cfg("resnet18", "SegDeepLabV3Head", num_classes=K),
                                 **{"MODEL.META_ARCHITECTURE": "MultiExitSegmentor", "MODEL.EXITS.MODE": "ds",
                                    "MODEL.EXITS.CHANNELS": 16}))
    with pytest.raises(export_tool.ExportError, match="(?s)tools/deploy_model.py.*MODEL.EXITS.ANYTIME.POLICY exit:<name>"):
        export_tool.export_model(multi, "torchscript", "/nonexistent/never_written.pt")
    anytime = build_model(set_keys(exit_cfg("final"), **{"MODEL.EXITS.ANYTIME.THRESHOLDS": [0.5, 0.5]}))
    anytime.policy = "confidence"
    with pytest.raises(export_tool.ExportError,
                       match=r"'confidence' chooses .* per image.*MODEL.EXITS.ANYTIME.POLICY exit:<name> "
                             r"\(one of: final, exit:res3, exit:res4\)"):
        export_tool.export_model(anytime, "onnx", "/nonexistent/never_written.onnx")


class SizeInPython(nn.Module):
    """A deployed-model forward that computes an intermediate size with math.ceil: tracing
    records it as the traced size's constant, so the graph is wrong at other sizes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, K, 3, padding=1)

    def forward(self, batched_inputs):
        x = batched_inputs[0]["image"][None] / 255.0
        h, w = x.shape[-2:]
        low = F.interpolate(self.conv(x), size=(math.ceil(h / 3), math.ceil(w / 3)), mode="bilinear")
        return [{"sem_seg": F.interpolate(low, size=(h, w), mode="bilinear")[0]}]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_graph_specialised_to_the_traced_size_is_caught_and_fixed_size_refuses_other_sizes(fmt, tmp_path):
    torch.manual_seed(0)
    model = SizeInPython().eval()
    path = export_tool.export_model(model, fmt, str(tmp_path / f"m.{fmt}"), input_size=(64, 64))
    with pytest.raises(export_tool.ExportError, match="--fixed-size"):
        export_tool.verify(model, fmt, path, export_tool.check_sizes((64, 64), False))
    path = export_tool.export_model(model, fmt, str(tmp_path / f"f.{fmt}"), input_size=(64, 64), fixed_size=True)
    assert_same_logits(model, fmt, path, sizes=[(64, 64)])
    with pytest.raises(Exception, match="64x64|dimension|Dimension|shape"):
        export_tool.exported_runner(fmt, path)(torch.rand(1, 3, 75, 51))


def test_onnx_without_its_packages_names_the_extra(plain, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # an import of it fails as if not installed
    with pytest.raises(ImportError, match=r"pip install \.\[export\]"):
        export_tool.export_model(plain, "onnx", "/nonexistent/never_written.onnx")
    with pytest.raises(SystemExit):  # the command line says it before building anything
        export_tool.main(["--config-file", f"{REPO}/configs/demo/deeplabv3_r18.yaml", "--format", "onnx",
                          "--output", "/nonexistent/m.onnx"])


def test_export_latency_benchmark_end_to_end(tmp_path):
    bench = load_script("export_latency", "benchmarks/export_latency.py")
    formats = ["torchscript", "onnx"] if HAS_ONNX else ["torchscript"]
    out = tmp_path / "latency.json"
    result = bench.main(["--config-file", "configs/demo/deeplabv3_r18.yaml", "--size", "64", "96", "--formats", *formats,
                         "--warmup", "0", "--repeats", "3", "--output", str(out),
                         "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "16", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(K)])
    assert json.loads(out.read_text()) == result
    assert list(result["rows"]) == ["eager", *formats] and result["size"] == [64, 96] and result["threads"] == 1
    for row in result["rows"].values():
        assert len(row["times_ms"]) == 3 and row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["vs_eager"] == pytest.approx(row["median_ms"] / result["rows"]["eager"]["median_ms"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_exit_finer_than_the_common_stride_exports_with_dynamic_sizes(fmt, tmp_path):
    """An anytime exit on a stage finer than the exits' common stride (res2: stride 4 < 8) resizes
    to a size computed from the input's, in integer arithmetic and always while tracing: the
    dynamic export gives the eager logits at other sizes (the refusal of a trace specialised to
    one size is tested with a toy model above), also through the command line."""
    torch.manual_seed(0)
    cfg = set_keys(exit_cfg("exit:res2"), **{"MODEL.EXITS.IN_FEATURES": ["res2", "res3"],
                                             "TEST.ALLOW_RANDOM_WEIGHTS": True})
    model = build_model(cfg).eval()
    path = export_tool.export_model(model, fmt, str(tmp_path / f"m.{fmt}"), input_size=(64, 64))
    assert_same_logits(model, fmt, path)
    if fmt == "torchscript":
        (tmp_path / "c.yaml").write_text(cfg.dump())
        out = tmp_path / "cli.pt"
        export_tool.main(["--config-file", str(tmp_path / "c.yaml"), "--format", "torchscript", "--output", str(out),
                          "--input-size", "64", "64"])
        assert out.exists()
