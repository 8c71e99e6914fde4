"""Distiller: a frozen teacher outside the optimizer and checkpoints, the student alone at
inference, the student-only export, the configs, bad input, and runs through train_net.py."""
import json
import os

import pytest
import torch

from conftest import REPO, no_imagenet_start, random_batch, set_keys, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from segdistill import add_segdistill_config
from segdistill.convert import load_checked_weights, save_deployed_checkpoint
from segdistill.engine import Trainer
from segdistill.modeling.distill.base import DISTILL_LOSSES, resize_labels
from segdistill.modeling.distill.cwd import cwd_loss
from segdistill.modeling.distill.fakd import cosine_ramp
from segdistill.modeling.distill.hwd import HolisticWeightedDistillation
from segdistill.modeling.distill.pd import pixel_kl
from segdistill.modeling.meta_arch.distill import Distiller, build_teacher

K = 5



LOSS_NAMES = ("pd", "cwd", "hwd", "fakd_cwd", "fakd_pd")
# FAKD's loss state: each FAKD loss owns its covariance and the position of its lambda schedule.
LOSS_STATE = {f"distill_losses.{n}.{k}" for n in ("fakd_cwd", "fakd_pd")
              for k in ("progress", "covariance.count", "covariance.mean", "covariance.cov")}


def teacher_yaml(tmp_path, num_classes=K, name="teacher.yaml"):
    """A tiny teacher config (ResNet-18, output stride 16: its logits are resized to the student's)."""
    cfg = tiny_cfg("resnet18", "SegDeepLabV3Head", output_stride=16, num_classes=num_classes)
    path = tmp_path / name
    path.write_text(cfg.dump())
    return str(path)


def distill_cfg(tmp_path, losses=LOSS_NAMES, head="SegDeepLabV3Head", **overrides):
    cfg = tiny_cfg("resnet18", head, num_classes=K, **{"MODEL.META_ARCHITECTURE": "Distiller"})
    cfg.MODEL.DISTILL.TEACHER.CONFIG_FILE = teacher_yaml(tmp_path)
    cfg.MODEL.DISTILL.TEACHER.ALLOW_RANDOM = True
    cfg.MODEL.DISTILL.LOSSES = list(losses)
    cfg.MODEL.DISTILL.EVAL_TEACHER = True
    return set_keys(cfg, **overrides)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.manual_seed(0)
    cfg = distill_cfg(tmp_path_factory.mktemp("distill"))
    return cfg, build_model(cfg)


def test_training_step_trains_the_student_only(built):
    cfg, model = built
    assert isinstance(model, Distiller)
    teacher = model.teacher
    model.train()
    assert model.student.training and not teacher.training
    assert not any(m.training for m in teacher.modules()), "the teacher must stay in eval mode"
    before = {k: v.clone() for k, v in teacher.state_dict().items()}  # incl. BN running stats

    assert "teacher" not in dict(model.named_children())
    own = {id(p) for p in model.parameters()}
    assert not own & {id(p) for p in teacher.parameters()}, "teacher parameters are the wrapper's"
    optimizer = Trainer.build_optimizer(cfg, model)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == own

    batch = random_batch(2, 64, 64, K)
    torch.manual_seed(5)  # the heads' dropout draws the same masks below
    losses = model(batch)
    assert set(losses) == {"loss_sem_seg"} | {f"loss_{n}" for n in LOSS_NAMES}
    # every term is its loss on the student's logits and the teacher's, resized, computed here alone
    torch.manual_seed(5)
    student = model.student
    images = [(x["image"] - student.pixel_mean) / student.pixel_std for x in batch]
    out = student.sem_seg_head.forward_outputs(student.backbone(torch.stack(images)))
    targets = torch.stack([x["sem_seg"] for x in batch])
    with torch.no_grad():
        t_logits = teacher.sem_seg_head.forward_outputs(teacher.backbone(torch.stack(images)))["logits"]
    s_logits = out["logits"]
    t_logits = torch.nn.functional.interpolate(t_logits, size=s_logits.shape[-2:], mode="bilinear")
    torch.testing.assert_close(losses["loss_sem_seg"], student.sem_seg_head.losses(out, targets)["loss_sem_seg"])
    torch.testing.assert_close(losses["loss_pd"], cfg.MODEL.DISTILL.PD.WEIGHT * pixel_kl(s_logits, t_logits, 1.0))
    torch.testing.assert_close(losses["loss_cwd"], 3.0 * cwd_loss(s_logits, t_logits, 4.0))
    hwd = HolisticWeightedDistillation(cfg)  # the default HWD settings
    torch.testing.assert_close(losses["loss_hwd"], 3.0 * hwd(s_logits, t_logits))
    # FAKD at lambda0 (no training progress known): the bounds lie above PD and CWD
    assert losses["loss_fakd_cwd"] > losses["loss_cwd"] and losses["loss_fakd_pd"] > losses["loss_pd"]
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert model.student.sem_seg_head.predictor.weight.grad.abs().sum() > 0
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher tensor {k} changed"
    # FAKD's covariance saw every labelled pixel of the batch at the logits' size (stride 8)
    count = model.distill_losses["fakd_cwd"].covariance.count
    labels = resize_labels(targets, (8, 8))
    assert count.tolist() == [float((labels == k).sum()) for k in range(K)]


def test_checkpoint_holds_the_student_and_the_loss_state_only(built, tmp_path):
    _, model = built
    keys = set(model.state_dict())
    assert keys - {k for k in keys if k.startswith("student.")} == LOSS_STATE  # FAKD has no trainable part
    assert len([k for k in keys if k.startswith("student.")]) == len(model.student.state_dict())
    DetectionCheckpointer(model, str(tmp_path)).save("ckpt")
    saved = torch.load(tmp_path / "ckpt.pth", weights_only=False)["model"]
    assert set(saved) == keys
    n_student = sum(v.numel() for v in model.student.state_dict().values())
    n_loss_state = sum(saved[k].numel() for k in LOSS_STATE)
    assert sum(v.numel() for v in saved.values()) == n_student + n_loss_state  # no teacher tensor


def test_eval_is_the_student_alone_and_reports_the_teacher(built):
    _, model = built
    model.eval()
    batch = random_batch(2, 70, 90, K, seed=3)
    with torch.no_grad():
        out = model(batch)
        student = model.student(batch)
        teacher = model.teacher(batch)
    for o, s, t in zip(out, student, teacher):
        assert set(o) == {"sem_seg", "sem_seg_teacher"}
        assert torch.equal(o["sem_seg"], s["sem_seg"]) and torch.equal(o["sem_seg_teacher"], t["sem_seg"])
    model.eval_teacher = False
    with torch.no_grad():
        assert set(model(batch)[0]) == {"sem_seg"}
    model.eval_teacher = True


def test_teacher_follows_the_wrapper_across_devices_and_dtypes(built):
    _, model = built
    model.double()
    assert next(model.teacher.parameters()).dtype == torch.float64
    model.float()
    assert next(model.teacher.parameters()).dtype == torch.float32
    model.train()
    assert not model.teacher.training


def test_lambda_follows_the_training_progress(built):
    _, model = built
    for name in ("fakd_cwd", "fakd_pd"):
        loss = model.distill_losses[name]
        model.set_training_progress(30, 120)
        assert loss.lam == pytest.approx(cosine_ramp(30, 120, 1.0))
        model.set_training_progress(120, 120)
        assert loss.lam == pytest.approx(1.0)


def test_student_only_export_round_trip(built, tmp_path):
    cfg, model = built
    model.eval()
    DetectionCheckpointer(model, str(tmp_path)).save("model_final")
    # what tools/deploy_model.py does: the training config's model, its checked weights, the deployed file
    trained = build_model(cfg)
    load_checked_weights(trained, str(tmp_path / "model_final.pth"), min_matched=1.0, what="the distiller")
    out = save_deployed_checkpoint(trained, str(tmp_path / "student.pth"))

    student_cfg = cfg.clone()
    student_cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentorAnySize"  # the student's own config
    plain = build_model(student_cfg).eval()
    plain.load_state_dict(torch.load(out, weights_only=False)["model"], strict=True)
    batch = random_batch(1, 64, 64, K, with_labels=False)
    with torch.no_grad():
        assert torch.equal(plain(batch)[0]["sem_seg"], model(batch)[0]["sem_seg"])


def test_a_student_only_checkpoint_initialises_the_student(built, tmp_path):
    cfg, model = built
    student_cfg = cfg.clone()
    student_cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentorAnySize"
    torch.manual_seed(1)
    baseline = build_model(student_cfg)
    DetectionCheckpointer(baseline, str(tmp_path)).save("baseline")
    DetectionCheckpointer(model).load(str(tmp_path / "baseline.pth"))  # as MODEL.WEIGHTS does
    for k, v in baseline.state_dict().items():
        assert torch.equal(model.student.state_dict()[k], v), k


def test_teacher_weights_load_strictly(tmp_path):
    path = teacher_yaml(tmp_path)
    teacher = build_teacher(path, "", allow_random=True)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(1.0)
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    loaded = build_teacher(path, str(tmp_path / "teacher.pth"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), teacher.state_dict().values()))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    # weights of another architecture are refused, not half-loaded
    other = tiny_cfg("resnet18", "FCNHead", num_classes=K)
    torch.save({"model": build_model(other).state_dict()}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not fit the teacher"):
        build_teacher(path, str(tmp_path / "other.pth"))


@pytest.mark.parametrize("override,error,message", [
    ({"MODEL.DISTILL.TEACHER.CONFIG_FILE": "/nonexistent/teacher.yaml"}, FileNotFoundError,
     "Teacher config file not found: '/nonexistent/teacher.yaml'"),
    ({"MODEL.DISTILL.TEACHER.WEIGHTS": "/nonexistent/teacher.pth"}, FileNotFoundError,
     "Weights file not found: '/nonexistent/teacher.pth' \\(MODEL.DISTILL.TEACHER.WEIGHTS\\)"),
    ({"MODEL.DISTILL.TEACHER.ALLOW_RANDOM": False}, ValueError, "MODEL.DISTILL.TEACHER.WEIGHTS is empty"),
    ({"MODEL.DISTILL.LOSSES": ["cwd", "kd"]}, ValueError, "unknown: \\['kd'\\]"),
    ({"MODEL.DISTILL.STUDENT_META_ARCHITECTURE": "Distiller"}, ValueError, "cannot be 'Distiller'"),
    ({"MODEL.DISTILL.FAKD.COVARIANCE": "low-rank"}, ValueError, "COVARIANCE must be one of"),
])
def test_bad_configs_fail_clearly(tmp_path, override, error, message):
    with pytest.raises(error, match=message):
        build_model(distill_cfg(tmp_path, ["cwd", "fakd_cwd"], **override))


def test_a_teacher_with_another_class_count_is_an_error_naming_both(tmp_path):
    cfg = distill_cfg(tmp_path, ["cwd"])
    cfg.MODEL.DISTILL.TEACHER.CONFIG_FILE = teacher_yaml(tmp_path, num_classes=7, name="t7.yaml")
    with pytest.raises(ValueError, match=r"t7.yaml\) predicts 7 classes but the student .* predicts 5"):
        build_model(cfg)


def test_a_student_head_without_features_is_an_error(tmp_path):
    # detectron2's own DeepLabV3Head has no forward_features / forward_outputs / predictor
    kw = {"MODEL.SEM_SEG_HEAD.NAME": "DeepLabV3Head", "INPUT.CROP.SIZE": (64, 64)}
    for losses in (["fakd_pd"], ["cwd"]):
        with pytest.raises(TypeError, match="SemanticSegmentorAnySize passes the input size to its head: its "
                                            "head DeepLabV3Head "
                                            "does not follow segdistill's head contract"):
            build_model(distill_cfg(tmp_path, losses, **kw))


def test_a_student_with_its_own_forward_needs_the_tap_contract(tmp_path):
    from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor

    class OwnForwardSegmentor(SemanticSegmentor):  # e.g. a segmentor with extra training losses
        def forward(self, batched_inputs):
            return super().forward(batched_inputs)

    if "OwnForwardSegmentor" not in META_ARCH_REGISTRY:
        META_ARCH_REGISTRY.register(OwnForwardSegmentor)
    with pytest.raises(TypeError, match="OwnForwardSegmentor overrides SemanticSegmentor.forward"):
        build_model(distill_cfg(tmp_path, ["cwd"],
                                **{"MODEL.DISTILL.STUDENT_META_ARCHITECTURE": "OwnForwardSegmentor"}))


def test_distillation_and_exits_compose(tmp_path):
    """A MultiExitSegmentor student keeps its exit losses under distillation, and deploys plain."""
    cfg = distill_cfg(tmp_path, ["hwd", "fakd_pd"], **{"MODEL.DISTILL.STUDENT_META_ARCHITECTURE": "MultiExitSegmentor"})
    cfg.MODEL.EXITS.MODE = "sr"
    cfg.MODEL.EXITS.IN_FEATURES = ["res3", "res4"]
    cfg.MODEL.EXITS.CHANNELS = 16
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    calls = []
    model.student.set_training_progress = lambda it, total: calls.append((it, total))
    model.set_training_progress(30, 120)  # the student's own schedules (SR's warm-up) follow
    del model.student.set_training_progress
    assert calls == [(30, 120)]
    losses = model(random_batch(2, 64, 64, K))
    expected = {"loss_sem_seg", "loss_mea_cls", "loss_mea_seg", "loss_sr_f", "loss_sr_l", "loss_hwd", "loss_fakd_pd"}
    assert set(losses) == expected
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.student.exits.parameters() if p.requires_grad)
    deployed = model.deploy_state_dict()
    assert deployed and all(k.startswith(("backbone.", "sem_seg_head.")) for k in deployed)
    plain = build_model(tiny_cfg("resnet18", "SegDeepLabV3Head", num_classes=K))
    result = plain.load_state_dict(deployed, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


PAPER = [(ds, s) for ds in ("cityscapes", "coco_stuff") for s in ("deeplabv3_r18", "deeplabv3_mbv2", "pspnet_r18")]
# Every registered loss at once on each of the papers' pairs (the rows switch MODEL.DISTILL.LOSSES),
# with small trainable parts: MGD on the head features (on res5 its generator is 2 x 2048^2 x 9
# weights at the ResNet-101 teacher's width), a narrow discriminator, small memories.
SMALL_PARTS = ["MODEL.DISTILL.MGD.STUDENT_TAP", "head_features", "MODEL.DISTILL.MGD.TEACHER_TAP", "head_features",
               "MODEL.DISTILL.HOLISTIC.CONV_DIM", 4, "MODEL.DISTILL.CIRKD.PIXEL_MEMORY_SIZE", 32,
               "MODEL.DISTILL.CIRKD.REGION_MEMORY_SIZE", 8]


@pytest.mark.parametrize("dataset,student", PAPER)
def test_paper_pair_configs(dataset, student):
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, f"configs/{dataset}/distill/{student}.yaml"))
    assert cfg.MODEL.META_ARCHITECTURE == "Distiller"
    assert tuple(cfg.INPUT.CROP.SIZE) == (512, 512) and cfg.SOLVER.IMS_PER_BATCH == 8
    assert cfg.SOLVER.MAX_ITER == 40000 and cfg.SOLVER.BASE_LR == 0.01
    assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR"
    classes = {"cityscapes": 19, "coco_stuff": 171}[dataset]
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == classes
    teacher_cfg = os.path.join(REPO, cfg.MODEL.DISTILL.TEACHER.CONFIG_FILE)
    assert os.path.isfile(teacher_cfg)
    tiny = ["MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "32", "MODEL.SEM_SEG_HEAD.AUX_CHANNELS", "32", "MODEL.DEVICE", "cpu",
            "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.PSP_POOL_CHANNELS", "8"]
    cfg.merge_from_list(tiny + ["MODEL.DISTILL.TEACHER.WEIGHTS", "", "MODEL.DISTILL.TEACHER.ALLOW_RANDOM", True,
                                "MODEL.DISTILL.TEACHER.OPTS", tiny, "MODEL.DISTILL.LOSSES", sorted(DISTILL_LOSSES)] + SMALL_PARTS)
    no_imagenet_start(cfg)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    losses = model(random_batch(2, 64, 64, classes))  # PSP's 1x1 pooling bin needs two images under BN
    assert {"loss_sem_seg"} | {f"loss_{n}" for n in ("pd", "cwd", "hwd", "mgd", "dist", "fitnet", "at")} <= set(losses)
    assert {"loss_skd_pairwise", "loss_ifvd", "loss_cirkd_batch"} <= set(losses)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.distill_losses.parameters())


# demo config -> MODEL.DISTILL.LOSSES (a paper's full objective where it adds the pixel-wise PD or CWD)
DEMO = {"pd": ["pd"], "cwd": ["cwd"], "hwd": ["hwd"], "fakd_cwd": ["fakd_cwd"], "fakd_pd": ["fakd_pd"],
        "hwd_fakd_pd": ["hwd", "fakd_pd"], "skd": ["pd", "skd"], "ifvd": ["pd", "ifvd"], "cirkd": ["pd", "cirkd"],
        "mgd": ["mgd", "cwd"], "dist": ["dist"], "fitnet": ["pd", "fitnet"], "at": ["pd", "at"],
        "afdcd": ["pd", "afdcd"],
        "diffkd": ["pd", "diffkd"],
        "maskd": ["maskd"]}


@pytest.mark.parametrize("name", ["student"] + list(DEMO))
def test_demo_configs(name):
    from detectron2.config import LazyConfig

    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, f"configs/demo/distill/{name}.yaml"))
    if name == "student":
        assert cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentorAnySize"
        return
    assert cfg.MODEL.DISTILL.TEACHER.CONFIG_FILE == "configs/demo/distill/teacher.yaml"
    assert cfg.MODEL.DISTILL.LOSSES == DEMO[name]
    if name != "hwd_fakd_pd":
        lazy = LazyConfig.load(os.path.join(REPO, f"configs/demo/distill/{name}.py"))
        assert list(lazy.model.losses.names) == DEMO[name]


# ---------------------------------------------------------------------------------------------
# End to end through train_net.py (real teacher checkpoint, evaluation of teacher and student,
# resume of the covariance and of the lambda schedule, lazy config)
# ---------------------------------------------------------------------------------------------
TINY_TEACHER = ["MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "32"]


@pytest.fixture(scope="module")
def demo_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    teacher = build_teacher("configs/demo/distill/teacher.yaml", "", opts=TINY_TEACHER, allow_random=True)
    torch.save({"model": teacher.state_dict()}, path)
    return str(path)


@pytest.mark.slow
def test_train_net_distills_evaluates_both_and_resumes(tmp_path, demo_teacher, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from test_train_net import TINY, final_miou, run

    out_dir = str(tmp_path / "run")
    opts = TINY + [
        "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "16", "MODEL.DISTILL.TEACHER.WEIGHTS", demo_teacher,
        "MODEL.DISTILL.TEACHER.OPTS", str(TINY_TEACHER), "OUTPUT_DIR", out_dir,
    ]
    args = ["--config-file", "configs/demo/distill/hwd_fakd_pd.yaml"] + opts
    _, out = run(args)
    final_miou(out)
    conf = os.path.join(out_dir, "inference", "segdistill_demo_mini_val", "confusion_{}.json")
    assert os.path.isfile(conf.format("sem_seg")) and os.path.isfile(conf.format("sem_seg_teacher"))
    records = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.json"))]
    last = [r for r in records if "loss_hwd" in r][-1]
    assert {"loss_sem_seg", "loss_hwd", "loss_fakd_pd"} <= set(last)
    assert last["fakd_lambda"] == pytest.approx(cosine_ramp(last["iteration"], 3, 1.0))
    saved = torch.load(os.path.join(out_dir, "model_final.pth"), weights_only=False)["model"]
    fakd_pd_state = {k for k in LOSS_STATE if k.startswith("distill_losses.fakd_pd.")}
    assert fakd_pd_state <= set(saved) and saved["distill_losses.fakd_pd.covariance.count"].sum() > 0
    assert not any(k.startswith("teacher") for k in saved)

    # a resumed trainer holds the saved covariance and continues the lambda schedule
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs/demo/distill/hwd_fakd_pd.yaml"))
    cfg.merge_from_list(opts + ["SOLVER.MAX_ITER", "5"])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    for k in fakd_pd_state - {"distill_losses.fakd_pd.progress"}:
        assert torch.equal(trainer.model.state_dict()[k], saved[k])
    assert trainer.start_iter == 3
    resume = ["--config-file", "configs/demo/distill/hwd_fakd_pd.yaml", "--resume"]
    _, out = run(resume + opts + ["SOLVER.MAX_ITER", "5"])
    assert "Starting training from iteration 3" in out
    records = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.json"))]
    last = [r for r in records if "fakd_lambda" in r][-1]
    assert last["iteration"] == 4 and last["fakd_lambda"] == pytest.approx(cosine_ramp(4, 5, 1.0))
    resumed = torch.load(os.path.join(out_dir, "model_final.pth"), weights_only=False)["model"]
    key = "distill_losses.fakd_pd.covariance.count"
    assert resumed[key].sum() > saved[key].sum()


@pytest.mark.slow
def test_train_net_lazy_distillation(tmp_path, demo_teacher, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from test_train_net import final_miou, run

    out_dir = str(tmp_path / "lazy")
    _, out = run([
        "--config-file", "configs/demo/distill/fakd_cwd.py",
        "dataloader.train.dataset.names=segdistill_demo_mini_train",
        "dataloader.test.dataset.names=segdistill_demo_mini_val",
        "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
        "train.max_iter=2", "train.eval_period=0", f"train.output_dir={out_dir}",
        f"model.teacher.weights={demo_teacher}", f"model.teacher.opts={TINY_TEACHER}",
        "model.student.sem_seg_head.aspp_channels=16",
    ])
    final_miou(out)
    assert os.path.isfile(os.path.join(out_dir, "inference", "confusion_sem_seg_teacher.json"))
    saved = torch.load(os.path.join(out_dir, "model_final.pth"), weights_only=False)["model"]
    assert "distill_losses.fakd_cwd.covariance.cov" in saved and not any(k.startswith("teacher") for k in saved)
