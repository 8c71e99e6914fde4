"""The data and evaluation path on an accelerator: small labels until on the device, pinned
loader memory for a CUDA device, the confusion matrix built on the device, the teacher scored
once per run, anytime timings with a warm-up and the median."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_batch, set_keys, tiny_cfg
from detectron2.modeling import build_model
from segdistill.data.build import _train_loader_from_config
from segdistill.data.mapper import SemSegDatasetMapper, label_dtype

K = 5


# ----------------------------------------------------------------------------- labels
@pytest.mark.parametrize("num_classes,ignore,dtype", [(171, 255, torch.uint8), (19, 255, torch.uint8),
                                                      (300, 255, torch.int32), (19, -1, torch.int32)])
def test_mapper_keeps_training_labels_small(tmp_path, num_classes, ignore, dtype):
    rng = np.random.default_rng(0)
    label = rng.integers(0, min(num_classes, 256), (12, 10)).astype(np.uint8)
    label[0] = 255 if ignore == 255 else 0
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    Image.fromarray(label).save(tmp_path / "l.png")
    mapper = SemSegDatasetMapper(True, augmentations=[], image_format="RGB", num_classes=num_classes,
                                 ignore_value=ignore)
    out = mapper({"file_name": str(tmp_path / "i.png"), "sem_seg_file_name": str(tmp_path / "l.png")})
    assert out["sem_seg"].dtype == dtype
    assert np.array_equal(out["sem_seg"].numpy(), label)
    assert torch.from_numpy(np.zeros(1, label_dtype(num_classes, ignore))).dtype == dtype


def _as(batch, dtype):
    return [{**x, "sem_seg": x["sem_seg"].to(dtype)} for x in batch]


@pytest.mark.parametrize("arch", ["SemanticSegmentor", "MultiExitSegmentor"])
def test_training_step_same_loss_with_uint8_and_int64_labels(arch):
    cfg = tiny_cfg("resnet18", "SegDeepLabV3Head", num_classes=K, **{"MODEL.META_ARCHITECTURE": arch})
    if arch == "MultiExitSegmentor":
        set_keys(cfg, **{"MODEL.EXITS.MODE": "sr", "MODEL.EXITS.CHANNELS": 16})
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = random_batch(2, 48, 48, K)
    losses = {}
    for dtype in (torch.int64, torch.uint8):
        torch.manual_seed(1)  # the same dropout masks
        losses[dtype] = {k: v.detach() for k, v in model(_as(batch, dtype)).items()}
    assert losses[torch.int64].keys() == losses[torch.uint8].keys()
    for k, v in losses[torch.int64].items():
        assert torch.equal(v, losses[torch.uint8][k]), k


def test_distiller_step_same_loss_with_uint8_and_int64_labels(tmp_path):
    from test_distiller import distill_cfg

    torch.manual_seed(0)
    model = build_model(distill_cfg(tmp_path, losses=("pd", "cwd"))).train()
    batch = random_batch(2, 48, 48, K)
    losses = {}
    for dtype in (torch.int64, torch.uint8):
        torch.manual_seed(1)
        losses[dtype] = {k: v.detach() for k, v in model(_as(batch, dtype)).items()}
    for k, v in losses[torch.int64].items():
        assert torch.equal(v, losses[torch.uint8][k]), k


@pytest.mark.parametrize("device,pinned", [("cpu", False), ("cuda", True), ("cuda:1", True)])
def test_train_loader_pins_memory_for_a_cuda_device(device, pinned):
    cfg = tiny_cfg(**{"MODEL.DEVICE": device})
    kwargs = _train_loader_from_config(cfg, mapper=lambda d: d, dataset=[{"file_name": "x"}])
    assert kwargs["pin_memory"] is pinned


# ----------------------------------------------------------------------------- evaluation
def _brute_confusion(gt, pred, k, ignore):
    conf = np.zeros((k, k), np.int64)
    for g, p in zip(np.asarray(gt).ravel().tolist(), np.asarray(pred).ravel().tolist()):
        if g != ignore:
            conf[g, p] += 1
    return conf


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_device_confusion_matrix_equals_brute_force(dtype):
    from segdistill.evaluation.sem_seg import device_confusion_matrix

    g = torch.Generator().manual_seed(0)
    k = 7
    gt = torch.randint(0, k, (37, 29), generator=g)
    gt[torch.rand(37, 29, generator=g) < 0.3] = 255  # ignore pixels
    pred = torch.randint(0, k, (37, 29), generator=g)
    conf = device_confusion_matrix(gt.to(dtype), pred, k, 255)
    assert conf.dtype == torch.int64 and conf.device == pred.device
    assert np.array_equal(conf.numpy(), _brute_confusion(gt, pred, k, 255))
    assert conf.sum() == (gt != 255).sum()


def test_evaluator_scores_the_label_decoded_by_the_test_mapper(write_label_dataset):
    """The test mapper decodes the label at the original size (the image is resized); the
    evaluator scores it without opening the file, with the values of the numpy matrix."""
    from detectron2.data import DatasetCatalog
    from detectron2.data import transforms as T
    from segdistill.data.mapper import EVAL_LABEL
    from segdistill.evaluation import SemSegEvaluator
    from segdistill.evaluation.metrics import confusion_matrix, metrics_from_confusion

    rng = np.random.default_rng(1)
    labels = [rng.integers(0, K, (20, 30)) for _ in range(3)]
    for lab in labels:
        lab[rng.random(lab.shape) < 0.2] = 255
    name = write_label_dataset("gpu_path_eval", labels, K)
    mapper = SemSegDatasetMapper(False, augmentations=[T.ResizeShortestEdge(10, 100)], image_format="RGB",
                                 num_classes=K, ignore_value=255)
    records = DatasetCatalog.get(name)
    inputs = [mapper(r) for r in records]
    assert inputs[0]["image"].shape[-2:] == (10, 15) and "sem_seg" not in inputs[0]
    assert inputs[0][EVAL_LABEL].dtype == torch.uint8 and inputs[0][EVAL_LABEL].shape == (20, 30)
    g = torch.Generator().manual_seed(0)
    outputs = [{"sem_seg": torch.randn(K, 20, 30, generator=g)} for _ in inputs]
    expected = sum(confusion_matrix(lab, o["sem_seg"].argmax(0).numpy(), K, 255) for lab, o in zip(labels, outputs))
    ev = SemSegEvaluator(name, distributed=False)
    for r in records:
        os.remove(r["sem_seg_file_name"])  # the evaluator must not read it
    ev.reset()
    ev.process(inputs[:2], outputs[:2])
    ev.process(inputs[2:], outputs[2:])
    res = ev.evaluate()["sem_seg"]
    want = metrics_from_confusion(expected, [f"c{k}" for k in range(K)])
    assert res.keys() == want.keys()
    np.testing.assert_equal(np.array(list(res.values())), np.array(list(want.values())))


def test_frozen_teacher_is_scored_once_per_run(tmp_path, write_label_dataset):
    from test_distiller import distill_cfg
    from segdistill.engine import Trainer
    from segdistill.evaluation.sem_seg import clear_teacher_scores

    rng = np.random.default_rng(2)
    labels = [rng.integers(0, K, (32, 32)) for _ in range(3)]
    name = write_label_dataset("gpu_path_teacher", labels, K)
    cfg = distill_cfg(tmp_path, losses=("pd",), **{"DATASETS.TEST": (name,), "OUTPUT_DIR": str(tmp_path / "out"),
                                                  "DATALOADER.NUM_WORKERS": 0})
    torch.manual_seed(0)
    model = build_model(cfg)
    calls = []
    model.teacher.register_forward_hook(lambda *args: calls.append(1))
    clear_teacher_scores()
    first = Trainer.test(cfg, model)
    assert len(calls) == len(labels) and "sem_seg_teacher" in first
    with torch.no_grad():  # the student changes between evaluations, the teacher cannot
        next(model.student.parameters()).add_(0.5)
    second = Trainer.test(cfg, model)
    assert len(calls) == len(labels), "the teacher ran again"
    assert second["sem_seg_teacher"] == first["sem_seg_teacher"]
    assert second["sem_seg"] != first["sem_seg"]
    assert model.eval_teacher
    saved = np.load(tmp_path / "out" / "inference" / name / "confusion_sem_seg_teacher.npy")
    assert saved.sum() == sum(int((lab != 255).sum()) for lab in labels)
    clear_teacher_scores()
    Trainer.test(cfg, model)  # a new run scores it again
    assert len(calls) == 2 * len(labels)


# ----------------------------------------------------------------------------- anytime timings
def test_anytime_timings_skip_the_warm_up_and_take_the_median(write_label_dataset):
    from segdistill.evaluation.anytime import WARMUP_IMAGES, AnytimeEvaluator
    from segdistill.modeling.meta_arch.anytime import FINAL, AnytimeCosts

    # a fake clock: the first images pay the start-up (CUDA context, cuDNN search), one later outlier
    times = [3.0, 1.0, 0.5, 0.2, 0.1, 0.04, 0.01, 0.02, 0.9]
    assert WARMUP_IMAGES == 5
    rng = np.random.default_rng(3)
    name = write_label_dataset("gpu_path_anytime", [rng.integers(0, K, (8, 8)) for _ in times], K)
    from detectron2.data import DatasetCatalog

    records = DatasetCatalog.get(name)
    inputs = [{"file_name": r["file_name"], "height": 8, "width": 8} for r in records]
    outputs = [{"sem_seg": torch.randn(K, 8, 8), "sem_seg_exit": FINAL,
                "anytime": {"input_hw": (8, 8), "evaluated": [], "time_s": t, "final_time_s": 2 * t}} for t in times]
    results = {}
    for warmup in (WARMUP_IMAGES, 0, 20):
        ev = AnytimeEvaluator(name, costs=lambda hw: AnytimeCosts(hw, final=1e9), distributed=False,
                              warmup_images=warmup)
        for inp, out in zip(inputs, outputs):
            ev.process([inp], [out])
        results[warmup] = ev.evaluate()["anytime"]
    after = results[WARMUP_IMAGES]
    assert after["time_ms"] == pytest.approx(1e3 * np.median(times[5:])) == pytest.approx(30.0)
    assert after["time_ms_final"] == pytest.approx(60.0)
    assert after["timed_images"] == 4 and after["images"] == len(times)
    assert results[0]["time_ms"] == pytest.approx(1e3 * np.median(times)) and results[0]["timed_images"] == 9
    assert results[20]["time_ms"] == pytest.approx(1e3 * np.median(times))  # too few images: all timed
