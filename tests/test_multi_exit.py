"""MultiExitSegmentor: zero inference cost, deploy round trip, tau in checkpoints, config
errors, and every mode end to end through train_net.py."""
import json
import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import REPO, no_imagenet_start, random_batch, run_train_net, set_keys, tiny_cfg
from conftest import trained_model as train_steps
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from segdistill import add_segdistill_config
from segdistill.convert import save_deployed_checkpoint

K = 5


def exit_cfg(mode="sr", backbone="resnet18", head="SegDeepLabV3Head", **overrides):
    cfg = tiny_cfg(backbone, head, num_classes=K, **{"MODEL.META_ARCHITECTURE": "MultiExitSegmentor"})
    cfg.MODEL.EXITS.MODE = mode
    cfg.MODEL.EXITS.CHANNELS = 16
    return set_keys(cfg, **overrides)


def trained_model(cfg, steps=1):
    """A model after a few SGD steps, so BN statistics and weights are not at their init."""
    return train_steps(cfg, K, steps)


def plain_twin(cfg, model):
    """The plain SemanticSegmentor of the same config, loaded strictly from the deployed weights."""
    base = cfg.clone()
    base.MODEL.META_ARCHITECTURE = "SemanticSegmentorAnySize"
    plain = build_model(base).eval()
    plain.load_state_dict(model.deploy_state_dict(), strict=True)
    return plain


@pytest.mark.parametrize("mode", ["ds", "sr"])
def test_eval_equals_plain_segmentor_bit_for_bit(mode):
    cfg = exit_cfg(mode)
    model = trained_model(cfg)
    plain = plain_twin(cfg, model)
    batch = random_batch(2, 70, 90, K, seed=5)  # labels present, as in evaluation
    with torch.no_grad():
        ours, ref = model(batch), plain(batch)
        assert [set(o) for o in ours] == [{"sem_seg"}] * 2  # exits do not run unless asked
        assert all(torch.equal(a["sem_seg"], b["sem_seg"]) for a, b in zip(ours, ref))
        model.eval_exits = True
        ours = model(batch)
    assert all(torch.equal(a["sem_seg"], b["sem_seg"]) for a, b in zip(ours, ref))
    assert set(ours[0]) == {"sem_seg", "sem_seg_res2", "sem_seg_res3", "sem_seg_res4"}
    assert all(v.shape == (K, 70, 90) for v in ours[0].values())


def test_training_losses_and_parameters_per_mode():
    names = {}
    for mode in ("none", "ds", "sr"):
        model = build_model(exit_cfg(mode)).train()
        losses = model(random_batch(2, 64, 64, K))
        names[mode] = set(losses)
        sum(losses.values()).backward()
        unused = [n for n, p in model.named_parameters() if p.grad is None]
        assert not unused, f"{mode}: parameters without gradient {unused[:5]}"  # no FIND_UNUSED_PARAMETERS needed
    # SR without a term that reads class logits builds no classifiers (nothing unused under DDP)
    model = build_model(exit_cfg("sr", **{"MODEL.EXITS.SR.CLS_WEIGHT": 0.0, "MODEL.EXITS.SR.L_WEIGHT": 0.0})).train()
    assert model.final_classifier is None and all(e.classifier is None for e in model.exits.values())
    sum(model(random_batch(2, 64, 64, K)).values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert names == {
        "none": {"loss_sem_seg"},
        "ds": {"loss_sem_seg", "loss_ds"},
        "sr": {"loss_sem_seg", "loss_mea_cls", "loss_mea_seg", "loss_sr_f", "loss_sr_l"},
    }


def test_sr_teachers_receive_no_gradient_from_their_own_loss():
    model = build_model(exit_cfg("sr")).train()
    losses = model(random_batch(2, 64, 64, K))
    losses["loss_sr_f"].backward(retain_graph=True)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is None for n in grads if n.startswith("exits.res2.")), "SR-F teacher got a gradient"
    assert grads["exits.res3.feature.weight"].abs().sum() > 0 and grads["exits.res4.feature.weight"].abs().sum() > 0
    model.zero_grad(set_to_none=True)
    losses["loss_sr_l"].backward()
    assert all(p.grad is None for p in model.final_classifier.parameters()), "SR-L teacher got a gradient"
    assert all(model.exits[n].classifier.fc.weight.grad.abs().sum() > 0 for n in ("res2", "res3", "res4"))


def test_deploy_round_trip_into_the_baseline_config(tmp_path):
    cfg = exit_cfg("sr")
    model = trained_model(cfg)
    DetectionCheckpointer(model, str(tmp_path)).save("model_final")
    loaded = build_model(cfg)  # what tools/deploy_model.py does: the training checkpoint -> deployed weights
    DetectionCheckpointer(loaded).load(str(tmp_path / "model_final.pth"))
    out = save_deployed_checkpoint(loaded.eval(), str(tmp_path / "deploy.pth"))
    state = torch.load(out, map_location="cpu", weights_only=True)["model"]
    assert not [k for k in state if not k.startswith(("backbone.", "sem_seg_head."))]

    # the plain baseline config (configs/demo/deeplabv3_r18.yaml at the same tiny sizes)
    base = get_cfg()
    add_segdistill_config(base)
    base.merge_from_file(os.path.join(REPO, "configs/demo/deeplabv3_r18.yaml"))
    base.MODEL.SEM_SEG_HEAD.NUM_CLASSES = K
    base.MODEL.SEM_SEG_HEAD.ASPP_CHANNELS = cfg.MODEL.SEM_SEG_HEAD.ASPP_CHANNELS
    plain = build_model(base).eval()
    incompatible = plain.load_state_dict(state, strict=False)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    batch = random_batch(1, 64, 64, K, with_labels=False)
    with torch.no_grad():
        assert torch.equal(plain(batch)[0]["sem_seg"], model(batch)[0]["sem_seg"])


def test_checkpoint_restores_temperature(tmp_path):
    cfg = exit_cfg("sr")
    model = build_model(cfg)
    model.exit_objective.temperature.fill_(1.05 ** 7)
    DetectionCheckpointer(model, str(tmp_path)).save("model_0000009")
    fresh = build_model(cfg)
    assert float(fresh.exit_objective.temperature) == 1.0
    DetectionCheckpointer(fresh, str(tmp_path)).resume_or_load("", resume=True)
    assert float(fresh.exit_objective.temperature) == pytest.approx(1.05 ** 7)


def test_exit_on_head_features_and_per_exit_class_counts():
    cfg = exit_cfg("ds", **{"MODEL.EXITS.IN_FEATURES": ["res3", "head_features"], "MODEL.EXITS.NUM_CLASSES": [3, 4]})
    model = build_model(cfg).train()
    assert [model.exits[n].segmenter.out_channels for n in ("res3", "head_features")] == [3, 4]
    luts = {"res3": [0, 0, 1, 2, 2], "head_features": [0, 1, 2, 3, 3]}
    model.exit_objective.label_luts = {n: torch.tensor(v) for n, v in luts.items()}
    batch = random_batch(2, 64, 64, K)
    torch.manual_seed(0)
    losses = model(batch)
    # brute force: the exits' logits (same BN batch statistics and dropout masks), labels mapped by hand
    torch.manual_seed(0)
    with torch.no_grad():
        images = model._images(batch)
        outs = model.forward_outputs(model.backbone(images.tensor), tuple(images.tensor.shape[-2:]))
    labels = torch.stack([b["sem_seg"] for b in batch])
    expected = 0.0
    for name, lut in luts.items():
        logits = F.interpolate(outs.exits[name].seg_logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        logp = F.log_softmax(logits, dim=1).numpy()
        lab = labels.numpy()
        valid = lab != 255
        n_idx, y_idx, x_idx = np.nonzero(valid)
        mapped = np.array(lut)[lab[valid]]
        expected += -logp[n_idx, mapped, y_idx, x_idx].mean()
    assert losses["loss_ds"].item() == pytest.approx(expected, rel=1e-4)
    model.eval()
    model.eval_exits = True
    with torch.no_grad():
        out = model(random_batch(1, 64, 64, K, with_labels=False))[0]
    assert out["sem_seg_res3"].shape[0] == 3 and out["sem_seg_head_features"].shape[0] == 4


@pytest.mark.parametrize("overrides,message", [
    ({"MODEL.EXITS.IN_FEATURES": ["res3", "layer9"]},
     r"Unknown MODEL.EXITS.IN_FEATURES \['layer9'\].*valid choices.*'res1', 'res2', 'res3', 'res4', 'res5'.*head_features"),
    ({"MODEL.EXITS.IN_FEATURES": ["res1", "res3"]},
     r"\['res1'\] \(stride \[2\]\) are finer than MODEL.EXITS.COMMON_STRIDE 8.*Valid choices: \['res2', 'res3', 'res4', 'res5', 'head_features'\]"),
    ({"MODEL.EXITS.MODE": "hs4"}, r"Unknown MODEL.EXITS.MODE 'hs4'; choose from \['none', 'ds', 'sr'"),
    ({"MODEL.EXITS.IN_FEATURES": ["res3"]}, r"SR-F needs at least two exits"),
    ({"MODEL.EXITS.NUM_CLASSES": [3, 5, 5]}, r"exits \{'res2': 3\} predict other class sets"),
    ({"MODEL.EXITS.NUM_CLASSES": [5, 5]}, r"has 2 entries for 3 exits"),
    ({"MODEL.EXITS.SR.VARIANT": "authors"}, r"VARIANT must be one of \('paper', 'code'\)"),
])
def test_config_errors_name_the_valid_choices(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_model(exit_cfg("sr", **overrides))


def test_hrnet_stage_names_are_the_choices():
    cfg = exit_cfg("ds", backbone="hrnet_w18_small", head="FCNHead", **{"MODEL.EXITS.IN_FEATURES": ["stage2_b0", "res9"]})
    with pytest.raises(ValueError, match=r"'layer1', 'stage2_b0', 'stage2_b1', 'stage3_b0'"):
        build_model(cfg)


@pytest.mark.parametrize("name", ["none", "ds", "sr"])
def test_lazy_configs_train_a_step_with_the_progress_hook(name):
    from types import SimpleNamespace

    from detectron2.config import LazyConfig, instantiate
    from segdistill.engine import TrainingProgressHook

    cfg = LazyConfig.load(os.path.join(REPO, f"configs/demo/exits/{name}.py"))
    if name != "none":
        cfg.model.exits.channels = 16
    if name == "sr":
        cfg.model.objective.warmup_iters = 1
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    assert set(model.exits) == (set() if name == "none" else {"res2", "res3", "res4"})
    hook = TrainingProgressHook()
    hook.trainer = SimpleNamespace(model=model, iter=0, max_iter=10)
    hook.before_step()
    losses = model(random_batch(2, 64, 64, 10))
    sum(losses.values()).backward()
    if name == "sr":  # MEA only during the warm-up, then SR on
        assert losses["loss_sr_f"].item() == 0 and losses["loss_sr_l"].item() == 0
        hook.trainer.iter = 1
        hook.before_step()
        losses = model(random_batch(2, 64, 64, 10))
        assert losses["loss_sr_f"].item() > 0 and losses["loss_sr_l"].item() > 0
    assert model.eval_exits == (name != "none")


def sr_reference_losses(model, batch):
    """Brute-force MEA terms of a built SR model in train mode: the final head's and every exit's
    pixel CE and the image-level BCE against class presence (numpy), from one forward pass
    (call it with the RNG seeded as for the model's own step: the same dropout masks)."""
    with torch.no_grad():
        images = model._images(batch)
        outs = model.forward_outputs(model.backbone(images.tensor), tuple(images.tensor.shape[-2:]))
    labels = model._targets(batch)
    lab = labels.numpy()
    ignore = model.exit_objective.ignore_value
    valid = lab != ignore
    n_idx, y_idx, x_idx = np.nonzero(valid)

    def ce(seg_logits):
        logits = F.interpolate(seg_logits.float(), size=lab.shape[-2:], mode="bilinear", align_corners=False)
        logp = F.log_softmax(logits, dim=1).numpy()
        return float(-logp[n_idx, lab[valid], y_idx, x_idx].mean())

    def bce(cls_logits):
        k = cls_logits.shape[1]
        presence = np.zeros((lab.shape[0], k))
        for i in range(lab.shape[0]):
            presence[i, np.unique(lab[i][lab[i] != ignore])] = 1
        p = torch.sigmoid(cls_logits.double()).numpy()
        return float(-(presence * np.log(p) + (1 - presence) * np.log(1 - p)).mean())

    head = model.sem_seg_head
    final = F.interpolate(outs.final.seg_logits, scale_factor=head.common_stride, mode="bilinear", align_corners=False)
    return {
        "sem_seg": head.loss_weight * ce(final),
        "mea_seg": sum(ce(e.seg_logits) for e in outs.exits.values()),
        "mea_cls": bce(outs.final.cls_logits) + sum(bce(e.cls_logits) for e in outs.exits.values()),
    }


@pytest.mark.parametrize("name", ["deeplabv3_r101_sr", "ocrnet_hrnetv2_w48_sr"])
def test_cityscapes_sr_configs_build_and_run_a_step(name):
    path = os.path.join(REPO, "configs/cityscapes/sr", name + ".yaml")
    assert os.path.isfile(path), f"{path} is missing"
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.NORM = "BN"
    no_imagenet_start(cfg)
    assert cfg.MODEL.EXITS.MODE == "sr" and cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 19
    assert cfg.SOLVER.IMS_PER_BATCH == 8 and cfg.SOLVER.BASE_LR == 0.01 and tuple(cfg.INPUT.CROP.SIZE) == (969, 969)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = random_batch(2, 32, 32, 19)
    torch.manual_seed(1)
    losses = model(batch)
    assert {"loss_sem_seg", "loss_mea_cls", "loss_mea_seg", "loss_sr_f", "loss_sr_l"} <= set(losses)
    sum(losses.values()).backward()
    torch.manual_seed(1)
    ref = sr_reference_losses(model, batch)  # the paper's weights: lambda1 0.2, lambda2 0.8, head CE at 1
    assert losses["loss_sem_seg"].item() == pytest.approx(ref["sem_seg"], rel=1e-4)
    assert losses["loss_mea_seg"].item() == pytest.approx(0.8 * ref["mea_seg"], rel=1e-4)
    assert losses["loss_mea_cls"].item() == pytest.approx(0.2 * ref["mea_cls"], rel=1e-4)
    assert losses["loss_sr_f"].item() > 0 and losses["loss_sr_l"].item() > 0  # soft cross-entropies of distinct maps


def test_mea_segmentation_weight_paper_and_authors_code():
    """Default: the head's CE at weight 1, SEG_WEIGHT on the exits only; SEG_WEIGHT_INCLUDES_FINAL
    (the authors' code): the head's CE inside SEG_WEIGHT too. Every other term is unchanged."""
    batch = random_batch(2, 64, 64, K, seed=4)
    out = {}
    for includes in (False, True):
        torch.manual_seed(0)
        model = build_model(exit_cfg("sr", **{"MODEL.EXITS.SR.SEG_WEIGHT": 0.7,
                                              "MODEL.EXITS.SR.SEG_WEIGHT_INCLUDES_FINAL": includes})).train()
        torch.manual_seed(1)
        out[includes] = {k: v.item() for k, v in model(batch).items()}
    torch.manual_seed(1)
    ref = sr_reference_losses(model, batch)
    assert out[False]["loss_sem_seg"] == pytest.approx(ref["sem_seg"], rel=1e-4)
    assert out[True]["loss_sem_seg"] == pytest.approx(0.7 * ref["sem_seg"], rel=1e-4)
    assert out[True]["loss_mea_seg"] == pytest.approx(0.7 * ref["mea_seg"], rel=1e-4)
    assert {k: v for k, v in out[True].items() if k != "loss_sem_seg"} == \
        {k: v for k, v in out[False].items() if k != "loss_sem_seg"}


# ------------------------------------------------------------------ end to end through train_net.py
TINY = [
    "DATASETS.TRAIN", '("segdistill_demo_mini_train",)', "DATASETS.TEST", '("segdistill_demo_mini_val",)',
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "100",
    "INPUT.CROP.SIZE", "(64,64)", "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "32", "MODEL.EXITS.CHANNELS", "16",
    "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
]


def metrics(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.json"))]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "ds"])
def test_train_net_modes(tmp_path, mode):
    out_dir = str(tmp_path / mode)
    out = run_train_net(["--config-file", f"configs/demo/exits/{mode}.yaml"] + TINY + ["OUTPUT_DIR", out_dir])
    rec = metrics(out_dir)
    losses = {k for r in rec for k in r if k.startswith("loss_")}
    # (detectron2 logs the terms separately only when there are several)
    assert losses == {"none": set(), "ds": {"loss_sem_seg", "loss_ds"}}[mode] and any("total_loss" in r for r in rec)
    inference = os.path.join(out_dir, "inference", "segdistill_demo_mini_val")
    assert os.path.isfile(os.path.join(inference, "confusion_sem_seg.json"))
    # per-exit metrics when exits exist (EVAL_EXITS in the demo configs)
    assert os.path.isfile(os.path.join(inference, "confusion_sem_seg_res3.json")) == (mode == "ds")
    assert ("copypaste: Task: sem_seg_res2" in out) == (mode == "ds")


@pytest.mark.slow
def test_train_net_sr_logs_tau_and_resume_continues_it(tmp_path):
    out_dir = str(tmp_path / "sr")
    cfg = ["--config-file", "configs/demo/exits/sr.yaml"] + TINY + [
        "MODEL.EXITS.SR.ANNEAL_THRESHOLD", "0.0", "OUTPUT_DIR", out_dir]  # threshold 0: tau grows every step
    out = run_train_net(cfg)
    rec = metrics(out_dir)
    losses = {k for r in rec for k in r if k.startswith("loss_")}
    assert losses == {"loss_sem_seg", "loss_mea_cls", "loss_mea_seg", "loss_sr_f", "loss_sr_l"}
    assert "copypaste: Task: sem_seg_res4" in out
    state = torch.load(os.path.join(out_dir, "model_final.pth"), map_location="cpu", weights_only=False)["model"]
    assert float(state["exit_objective.temperature"]) == pytest.approx(1.05 ** 2)
    out = run_train_net(cfg[:2] + ["--resume"] + cfg[2:] + ["SOLVER.MAX_ITER", "4"])
    assert "Starting training from iteration 2" in out
    tau = {r["iteration"]: r["sr_temperature"] for r in metrics(out_dir) if "sr_temperature" in r}
    assert tau[3] == pytest.approx(1.05 ** 3)  # not restarted from 1
    state = torch.load(os.path.join(out_dir, "model_final.pth"), map_location="cpu", weights_only=False)["model"]
    assert float(state["exit_objective.temperature"]) == pytest.approx(1.05 ** 4)


@pytest.mark.slow
def test_train_net_lazy_sr(tmp_path):
    out_dir = str(tmp_path / "lazy")
    out = run_train_net([
        "--config-file", "configs/demo/exits/sr.py",
        "dataloader.train.dataset.names=segdistill_demo_mini_train",
        "dataloader.test.dataset.names=segdistill_demo_mini_val",
        "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
        "model.exits.channels=16", "train.max_iter=2", "train.eval_period=0", f"train.output_dir={out_dir}",
    ])
    assert "copypaste: Task: sem_seg_res2" in out
    assert {"loss_mea_cls", "loss_mea_seg", "loss_sr_f", "loss_sr_l", "sr_temperature"} <= set(metrics(out_dir)[0])
    assert os.path.isfile(os.path.join(out_dir, "inference", "confusion_sem_seg_res4.json"))
