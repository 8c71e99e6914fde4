"""The distiller's taps and trainable parts: the tap contract of both segmentors (shapes known
at build time equal the tensors served; the teacher runs only as far as asked), clear build-time
errors (a tap a model cannot give, channels without a connector, an unknown loss), and the
life of the loss parts through detectron2's trainer: in the optimizer, changed by a step, in
the checkpoint, identical after --resume, absent from the deployed student (which loads
strictly into the plain student config)."""
import os

import pytest
import torch

from conftest import REPO, random_batch, set_keys, tiny_cfg
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from segdistill import add_segdistill_config
from segdistill.convert import deployed_state_dict
from segdistill.engine import Trainer
from segdistill.modeling.distill import DISTILL_LOSSES, SemanticSegmentorTaps, distill_losses_from_names, segmentor_taps
from segdistill.modeling.meta_arch.distill import Distiller, build_teacher

K = 5
# Small trainable parts for tests: a narrow discriminator, small memories.
SMALL = {"MODEL.DISTILL.HOLISTIC.CONV_DIM": 4, "MODEL.DISTILL.CIRKD.PIXEL_MEMORY_SIZE": 32,
         "MODEL.DISTILL.CIRKD.REGION_MEMORY_SIZE": 8}



def teacher_yaml(tmp_path, **overrides):
    cfg = tiny_cfg("resnet18", "SegDeepLabV3Head", output_stride=16, num_classes=K, **overrides)
    path = tmp_path / "teacher.yaml"
    path.write_text(cfg.dump())
    return str(path)


def distill_cfg(tmp_path, losses, teacher_overrides=None, **overrides):
    cfg = tiny_cfg("resnet18", "SegDeepLabV3Head", num_classes=K, **{"MODEL.META_ARCHITECTURE": "Distiller"})
    cfg.MODEL.DISTILL.TEACHER.CONFIG_FILE = teacher_yaml(tmp_path, **(teacher_overrides or {}))
    cfg.MODEL.DISTILL.TEACHER.ALLOW_RANDOM = True
    cfg.MODEL.DISTILL.LOSSES = list(losses)
    return set_keys(cfg, **{**SMALL, **overrides})


# ------------------------------------------------------------------------------------------
# The contract
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["SemanticSegmentor", "SemanticSegmentorAnySize", "MultiExitSegmentor"])
def test_tap_shapes_are_those_of_the_served_taps(arch):
    cfg = tiny_cfg("resnet18", "SegDeepLabV3Head", num_classes=K, **{"MODEL.META_ARCHITECTURE": arch})
    cfg.MODEL.TIMM.OUT_FEATURES = ["res3", "res5"]
    if arch == "MultiExitSegmentor":
        set_keys(cfg, **{"MODEL.EXITS.MODE": "ds", "MODEL.EXITS.IN_FEATURES": ["res3"], "MODEL.EXITS.CHANNELS": 8})
    torch.manual_seed(0)
    model = build_model(cfg).train()
    taps = segmentor_taps(model)
    assert (taps is model) == (arch != "SemanticSegmentor")  # the adapter is chosen by type
    assert isinstance(taps, SemanticSegmentorTaps) == (arch == "SemanticSegmentor")
    shapes = taps.tap_shapes()
    assert {"logits", "head_features", "res3", "res5"} <= set(shapes)
    out = taps.tap_student(random_batch(2, 64, 64, K), list(shapes))
    # the student's own losses (a multi-exit student's exit losses too)
    assert set(out.losses) == {"loss_sem_seg"} | ({"loss_ds"} if arch == "MultiExitSegmentor" else set())
    for name, shape in shapes.items():
        tensor = out.taps[name]
        assert tensor.shape[1] == shape.channels and 64 // tensor.shape[-1] == shape.stride, name
    # the classifier reproduces the logits from the head's features
    torch.testing.assert_close(taps.tap_classifier()(out.taps["head_features"]), out.taps["logits"])
    model.eval()
    with torch.no_grad():
        t = taps.tap_teacher(out.images.tensor, ["res3", "logits"])
    assert set(t) == {"res3", "logits"}


def test_the_teacher_runs_only_as_far_as_the_taps_need():
    model = build_model(tiny_cfg("resnet18", "SegDeepLabV3Head", num_classes=K)).eval()
    taps = segmentor_taps(model)
    calls = []
    model.sem_seg_head.predictor.register_forward_pre_hook(lambda *a: calls.append("head"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert set(taps.tap_teacher(x, ["res5"])) == {"res5"} and calls == []
        taps.tap_teacher(x, ["head_features"])
    assert calls == ["head"]


def test_a_class_neither_implementing_the_contract_nor_adapted_is_an_error():
    with pytest.raises(TypeError, match="Linear cannot be distilled: it neither implements segdistill's tap contract"):
        segmentor_taps(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------
# Build-time errors
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    ({"MODEL.DISTILL.FITNET.STUDENT_TAP": "res9"},
     r"Building the student \(SemanticSegmentorAnySize\) with the backbone stages \['res9'\] that MODEL.DISTILL.LOSSES tap: "
     r"Unknown backbone feature\(s\) \['res9'\] for resnet18; valid names: \['res1', 'res2', 'res3', 'res4', 'res5'\]"),
    ({"MODEL.DISTILL.FITNET.TEACHER_TAP": "stage2_b0"},
     r"Building the teacher \(.*teacher.yaml\) with the backbone stages \['stage2_b0'\].*valid names"),
    ({"MODEL.DISTILL.FITNET.CONNECTOR": "none"},
     r"FitNet \('head_features' -> 'head_features', MODEL.DISTILL.FITNET.CONNECTOR\): the student tap has 32 channels "
     r"and the teacher tap 48; without a connector they must match"),
    ({"MODEL.DISTILL.LOSSES": ["fitnet", "kd"]}, r"each of \[.*'at', 'cirkd', .*\] at most once \(unknown: \['kd'\]\)"),
])
def test_bad_taps_connectors_and_names_fail_at_build_time(tmp_path, overrides, message):
    cfg = distill_cfg(tmp_path, ["fitnet"], {"MODEL.SEM_SEG_HEAD.ASPP_CHANNELS": 48}, **overrides)
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


def test_a_tap_missing_from_a_built_student_names_the_model_and_the_valid_taps(tmp_path):
    student = build_model(tiny_cfg("resnet18", "SegDeepLabV3Head", num_classes=K))  # returns res5 only
    teacher = build_teacher(teacher_yaml(tmp_path), "", allow_random=True)
    losses = distill_losses_from_names(["at"], opts=["MODEL.DISTILL.AT.STUDENT_TAP", ["res4"],
                                                     "MODEL.DISTILL.AT.TEACHER_TAP", ["res4"]])
    with pytest.raises(ValueError, match=r"'at' reads the tap 'res4' of the student \(SemanticSegmentorAnySize\), which gives "
                                         r"only \['head_features', 'logits', 'res5'\]"):
        Distiller(student=student, teacher=teacher, losses=losses, ignore_value=255, exclude_ignore=False,
                  eval_teacher=False, input_format="RGB", teacher_input_format=None, teacher_name="t.yaml")


# ------------------------------------------------------------------------------------------
# Every loss through the distiller, on backbone stages too
# ------------------------------------------------------------------------------------------
# The terms each of the package's losses logs at its defaults. A loss registered from elsewhere
# (a project's own file) is trained too, and only has to log some loss_<name>* term.
TERMS = {
    "pd": {"loss_pd"}, "cwd": {"loss_cwd"}, "hwd": {"loss_hwd"}, "fakd_cwd": {"loss_fakd_cwd"},
    "fakd_pd": {"loss_fakd_pd"}, "skd": {"loss_skd_pairwise", "loss_skd_holistic", "loss_skd_discriminator"},
    "ifvd": {"loss_ifvd", "loss_ifvd_holistic", "loss_ifvd_discriminator"},
    "cirkd": {"loss_cirkd_batch", "loss_cirkd_pixel_memory", "loss_cirkd_region_memory"},
    "mgd": {"loss_mgd"}, "dist": {"loss_dist"}, "fitnet": {"loss_fitnet"}, "at": {"loss_at"},
    "afdcd": {"loss_afdcd_fd", "loss_afdcd_ctr"},
    "diffkd": {"loss_diffkd_kd", "loss_diffkd_diff", "loss_diffkd_ae"},
    "maskd": {"loss_maskd"},
}


def terms_of(name, losses):
    return {k for k in losses if k == f"loss_{name}" or k.startswith(f"loss_{name}_")}


def test_every_registered_loss_trains_through_the_distiller(tmp_path):
    assert set(TERMS) <= set(DISTILL_LOSSES)  # importing the package registered every file's loss
    names = sorted(DISTILL_LOSSES)
    cfg = distill_cfg(tmp_path, names, **{"MODEL.DISTILL.AT.STUDENT_TAP": ["res4", "head_features"],
                                          "MODEL.DISTILL.AT.TEACHER_TAP": ["res4", "head_features"],
                                          "MODEL.DISTILL.MGD.STUDENT_TAP": "res4",
                                          "MODEL.DISTILL.MGD.TEACHER_TAP": "res4"})
    torch.manual_seed(0)
    model = build_model(cfg).train()
    # the stages the losses tap were added to both backbones' outputs
    assert "res4" in model.student.backbone.output_shape() and "res4" in model.teacher.backbone.output_shape()
    losses = model(random_batch(2, 64, 64, K))
    expected = {"loss_sem_seg"}
    for name in names:
        terms = terms_of(name, losses)
        assert terms and terms == TERMS.get(name, terms), (name, terms)
        expected |= terms
    assert set(losses) == expected
    sum(losses.values()).backward()
    parts = dict(model.distill_losses.named_parameters())
    assert parts and all(p.grad is not None for p in parts.values()), [k for k, p in parts.items() if p.grad is None]
    assert all(p.grad is None for p in model.teacher.parameters())
    assert not any(k.startswith("distill_losses") for k in model.deploy_state_dict())


# ------------------------------------------------------------------------------------------
# Through detectron2's trainer: optimizer, step, checkpoint, resume, deploy
# ------------------------------------------------------------------------------------------
def demo_cfg(out_dir, max_iter):
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs/demo/distill/Base-Distill.yaml"))
    cfg.merge_from_list([
        "MODEL.DISTILL.LOSSES", ["pd", "fitnet", "cirkd", "skd"], "MODEL.DISTILL.TEACHER.WEIGHTS", "",
        "MODEL.DISTILL.TEACHER.ALLOW_RANDOM", True,
        "MODEL.DISTILL.TEACHER.OPTS", ["MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", 32],
        "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", 16, "MODEL.DISTILL.EVAL_TEACHER", False,
        "DATASETS.TRAIN", ("segdistill_demo_mini_train",), "DATASETS.TEST", (), "SOLVER.IMS_PER_BATCH", 2,
        "SOLVER.MAX_ITER", max_iter, "SOLVER.WARMUP_ITERS", 0, "SOLVER.CHECKPOINT_PERIOD", 100,
        "INPUT.CROP.SIZE", (64, 64), "DATALOADER.NUM_WORKERS", 0, "TEST.EVAL_PERIOD", 0, "OUTPUT_DIR", out_dir,
    ])
    for k, v in SMALL.items():
        set_keys(cfg, **{k: v})
    return cfg


def test_loss_parts_train_checkpoint_resume_and_stay_out_of_the_deployed_student(tmp_path):
    out = str(tmp_path / "run")
    trainer = Trainer(demo_cfg(out, 2))
    trainer.resume_or_load(resume=False)
    model = trainer.model
    parts = dict(model.distill_losses.named_parameters())
    assert {n.split(".")[0] for n in parts} == {"fitnet", "cirkd", "skd"}  # connector, projection, discriminator
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in parts.values()} <= in_optimizer
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    before = {k: v.detach().clone() for k, v in model.distill_losses.state_dict().items()}
    trainer.train()
    after = model.distill_losses.state_dict()
    for name in ("fitnet.connector.weight", "cirkd.projection.0.weight", "skd.holistic.discriminator.last.weight"):
        assert not torch.equal(before[name], after[name]), f"{name} did not train"
    assert int(after["cirkd.memory.draws"]) == 2 and not torch.equal(before["cirkd.memory.pixel_queue"],
                                                                       after["cirkd.memory.pixel_queue"])
    saved = torch.load(os.path.join(out, "model_final.pth"), weights_only=False)["model"]
    for k, v in after.items():
        assert torch.equal(saved["distill_losses." + k], v), k
    assert not any(k.startswith("teacher") for k in saved)

    # --resume restores every part and state exactly
    resumed = Trainer(demo_cfg(out, 3))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    for k, v in resumed.model.distill_losses.state_dict().items():
        assert torch.equal(v, saved["distill_losses." + k]), k

    # the deployed student: no loss part, loads strictly into the plain student config
    deployed = deployed_state_dict(model)
    assert not any(k.startswith(("distill_losses", "student.", "teacher")) for k in deployed)
    student_cfg = get_cfg()
    add_segdistill_config(student_cfg)
    student_cfg.merge_from_file(os.path.join(REPO, "configs/demo/distill/student.yaml"))
    student_cfg.MODEL.SEM_SEG_HEAD.ASPP_CHANNELS = 16
    plain = build_model(student_cfg)
    result = plain.load_state_dict(deployed, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
