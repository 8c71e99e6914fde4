"""HS3 exit mode and HS3-Fuse: Eq. 1 against a brute-force loss, bit-for-bit inference,
deploy round trips, per-exit metrics in cluster space, clusters-file errors at model build,
and the demo / Cityscapes HS3 configs."""
import json
import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import REPO, no_imagenet_start, random_batch, set_keys, tiny_cfg, trained_model
from conftest import write_clusters as _write_clusters
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from segdistill import add_segdistill_config
from segdistill.convert import save_deployed_checkpoint
from segdistill.hs3 import ClustersFileError

K = 5
ASSIGN = {"res3": [0, 0, 1, 1, 2], "res4": [0, 1, 2, 2, 3]}


def write_clusters(path, assignments=ASSIGN, class_names=None, num_classes=K):
    return _write_clusters(path, assignments, class_names, num_classes)


def brute_hs3_loss(outs, labels, assign, gammas, ignore=255):
    """Eq. 1's exit term by hand: each exit's logits upsampled, every labelled pixel mapped
    class -> cluster through ``assign`` (a Python list), mean CE per exit, weighted sum."""
    lab = labels.numpy()
    valid = lab != ignore
    n_idx, y_idx, x_idx = np.nonzero(valid)
    total = 0.0
    for name, gamma in gammas.items():
        logits = F.interpolate(outs.exits[name].seg_logits, size=lab.shape[-2:], mode="bilinear", align_corners=False)
        logp = F.log_softmax(logits, dim=1).numpy()
        mapped = np.array([assign[name][c] for c in lab[valid]])
        total += gamma * float(-logp[n_idx, mapped, y_idx, x_idx].mean())
    return total


def hs3_cfg(clusters, fuse=False, **overrides):
    cfg = tiny_cfg(num_classes=K, **{"MODEL.META_ARCHITECTURE": "MultiExitSegmentor"})
    cfg.DATASETS.TRAIN = ()  # no dataset: the class count is what is checked
    cfg.MODEL.EXITS.MODE = "hs3"
    cfg.MODEL.EXITS.CHANNELS = 16
    cfg.MODEL.EXITS.IN_FEATURES = ["res3", "res4"]
    cfg.MODEL.EXITS.HS3.CLUSTERS_FILE = clusters
    cfg.MODEL.EXITS.HS3.FUSE.ENABLED = fuse
    cfg.MODEL.EXITS.HS3.FUSE.OCR_MID_CHANNELS = 16
    cfg.MODEL.EXITS.HS3.FUSE.OCR_KEY_CHANNELS = 8
    return set_keys(cfg, **overrides)


def trained(cfg, steps=1):
    return trained_model(cfg, K, steps)


def test_loss_is_eq1_against_brute_force_ce(tmp_path):
    cfg = hs3_cfg(write_clusters(tmp_path / "c.json"), **{"MODEL.EXITS.HS3.WEIGHT": [0.5, 2.0]})
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert {n: e.segmenter.out_channels for n, e in model.exits.items()} == {"res3": 3, "res4": 4}
    assert model.final_classifier is None and all(e.classifier is None for e in model.exits.values())
    batch = random_batch(2, 64, 64, K, seed=3)
    torch.manual_seed(1)
    losses = model(batch)
    assert set(losses) == {"loss_sem_seg", "loss_hs3"}
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    # brute force: recompute the exits' logits (same BN batch statistics), map each pixel by hand
    with torch.no_grad():
        images = model._images(batch)
        outs = model.forward_outputs(model.backbone(images.tensor), tuple(images.tensor.shape[-2:]))
    expected = brute_hs3_loss(outs, torch.stack([b["sem_seg"] for b in batch]), ASSIGN, {"res3": 0.5, "res4": 2.0})
    assert losses["loss_hs3"].item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("fuse", [False, True])
def test_inference_and_deploy_round_trip(tmp_path, fuse):
    cfg = hs3_cfg(write_clusters(tmp_path / "c.json"), fuse=fuse)
    model = trained(cfg)
    batch = random_batch(2, 70, 90, K, seed=5)
    DetectionCheckpointer(model, str(tmp_path)).save("model_final")
    loaded = build_model(cfg)  # what tools/deploy_model.py does: the training checkpoint -> deployed weights
    DetectionCheckpointer(loaded).load(str(tmp_path / "model_final.pth"))
    out = save_deployed_checkpoint(loaded.eval(), str(tmp_path / "deploy.pth"))
    state = torch.load(out, map_location="cpu", weights_only=True)["model"]
    if fuse:  # the deployed hs3-fuse model keeps the fused exits, not their classifiers or the objective
        twin_cfg = cfg
        assert any(k.startswith("hs3_fuse.blocks.res3.") for k in state)
        assert any(k.startswith("exits.res4.segmenter.") for k in state)
    else:  # the plain SemanticSegmentor of the same config
        twin_cfg = cfg.clone()
        twin_cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentorAnySize"
        assert not [k for k in state if not k.startswith(("backbone.", "sem_seg_head."))]
    twin = build_model(twin_cfg).eval()
    incompatible = twin.load_state_dict(state, strict=False)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    with torch.no_grad():
        ours, ref = model(batch), twin(batch)
        assert [set(o) for o in ours] == [{"sem_seg"}] * 2
        assert all(torch.equal(a["sem_seg"], b["sem_seg"]) for a, b in zip(ours, ref))
        model.eval_exits = True
        ours = model(batch)
    assert all(torch.equal(a["sem_seg"], b["sem_seg"]) for a, b in zip(ours, ref))
    assert {k: v.shape[0] for k, v in ours[0].items()} == {"sem_seg": K, "sem_seg_res3": 3, "sem_seg_res4": 4}


def test_fuse_channels_halve_and_lighter_variant(tmp_path):
    from segdistill.modeling.exits.hs3 import fuse_channels

    assert fuse_channels(3, 256, 128, 1.0) == [(64, 32), (128, 64), (256, 128)]
    assert fuse_channels(2, 256, 128, 0.5) == [(64, 32), (128, 64)]
    path = write_clusters(tmp_path / "c.json")
    params = {}
    for name, scale in (("hs3", None), ("fuse", 1.0), ("lighter", 0.5)):
        cfg = hs3_cfg(path, fuse=scale is not None, **{"MODEL.EXITS.HS3.FUSE.CHANNEL_SCALE": scale or 1.0})
        model = build_model(cfg)
        params[name] = sum(v.numel() for v in model.deploy_state_dict().values())
        if scale:
            blocks = model.fusion.blocks
            assert [blocks[n].pixel_conv.out_channels for n in ("res3", "res4")] == [int(8 * scale), int(16 * scale)]
            # the head reads res5 widened by the fused channels
            assert model.fusion.target == "res5" and model.fusion.out_channels == int(24 * scale)
    assert params["hs3"] < params["lighter"] < params["fuse"]


def test_per_exit_metrics_are_in_cluster_space(tmp_path, write_label_dataset):
    from segdistill.engine import Trainer

    rng = np.random.default_rng(0)
    labels = [rng.integers(0, K, (48, 48)) for _ in range(2)]
    labels[0][:3] = 255
    name = write_label_dataset("hs3_eval_ds", labels, K)
    cfg = hs3_cfg(write_clusters(tmp_path / "c.json"), **{"MODEL.EXITS.EVAL_EXITS": True})
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATASETS.TEST = (name,)
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    cfg.DATALOADER.NUM_WORKERS = 0
    model = trained(cfg)
    results = Trainer.test(cfg, model)
    assert {"sem_seg", "sem_seg_res3", "sem_seg_res4"} <= set(results)
    assert {k for k in results["sem_seg_res3"] if k.startswith("IoU-")} == {"IoU-c0+c1", "IoU-c2+c3", "IoU-c4"}
    # brute force: the exit's argmax against the ground truth mapped by hand
    from segdistill.data import SemSegDatasetMapper
    from detectron2.data import DatasetCatalog

    mapper = SemSegDatasetMapper(cfg, False)
    conf = np.zeros((3, 3), np.int64)
    with torch.no_grad():
        for rec in DatasetCatalog.get(name):
            d = mapper(rec)
            pred = model([d])[0]["sem_seg_res3"].argmax(0).numpy()
            gt = np.array(labels[int(os.path.basename(rec["file_name"])[:3])])
            for g, p in zip(gt.ravel(), pred.ravel()):
                if g != 255:
                    conf[ASSIGN["res3"][g], p] += 1
    saved = json.load(open(os.path.join(cfg.OUTPUT_DIR, "inference", name, "confusion_sem_seg_res3.json")))
    assert saved["classes"] == ["c0+c1", "c2+c3", "c4"]
    assert np.array_equal(np.array(saved["matrix"]), conf)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(class_names=d["class_names"][:4]) or [a["assignment"].pop() for a in d["exits"].values()],
     r"made for 4 classes but the model/dataset has 5"),
    (lambda d: d["exits"].update(res2=d["exits"].pop("res3")),
     r"exit names do not match the model's.*missing in the file: \['res3'\]; not in the model: \['res2'\]"),
    (lambda d: d["exits"]["res4"].update(num_clusters=3),
     r"exit 'res4': cluster indices \[3\] \(classes \['c4'\]\) are out of range \[0, 3\)"),
    (lambda d: d["exits"]["res3"].update(assignment=None, clusters=[["c0", "c1"], ["c2", "c3"]]) or d["exits"]["res3"].pop("assignment"),
     r"exit 'res3'.*classes \['c4'\] are in no cluster"),
])
def test_bad_clusters_file_is_a_clear_error_at_model_build(tmp_path, mutate, message):
    data = {"class_names": [f"c{i}" for i in range(K)], "exits": {e: {"assignment": list(a)} for e, a in ASSIGN.items()}}
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ClustersFileError, match=message):
        build_model(hs3_cfg(str(path)))


def test_config_errors(tmp_path, write_label_dataset):
    path = write_clusters(tmp_path / "c.json")
    with pytest.raises(ValueError, match=r"WEIGHT has 3 values for 2 exits \['res3', 'res4'\]"):
        build_model(hs3_cfg(path, **{"MODEL.EXITS.HS3.WEIGHT": [1.0, 1.0, 1.0]}))
    with pytest.raises(ClustersFileError, match=r"CLUSTERS_FILE is empty"):
        build_model(hs3_cfg(""))
    with pytest.raises(ValueError, match=r"NUM_CLASSES \[3, 3\] contradicts the clusters file"):
        build_model(hs3_cfg(path, **{"MODEL.EXITS.NUM_CLASSES": [3, 3]}))
    # class names come from the training dataset when it is registered
    name = write_label_dataset("hs3_names_ds", [np.zeros((8, 8), np.uint8)] * 2, K)
    cfg = hs3_cfg(write_clusters(tmp_path / "d.json", class_names=["sky", "c1", "c2", "c3", "c4"]))
    cfg.DATASETS.TRAIN = (name,)
    with pytest.raises(ClustersFileError, match=r"class names differ.*#0: 'sky' in the file vs 'c0'"):
        build_model(cfg)
    # ... also through its derived HS3 split, registered on demand
    cfg.DATASETS.TRAIN = (name + "_hs3_reduced",)
    cfg.MODEL.EXITS.HS3.CLUSTERS_FILE = path
    build_model(cfg)
    from segdistill.hs3.splits import register_config_splits

    cfg.DATASETS.TEST = (name + "_hs3_analysis", "other")
    assert register_config_splits(cfg) == [name + "_hs3_reduced", name + "_hs3_analysis"]


def _yaml(path, **opts):
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, path))
    cfg.MODEL.DEVICE = "cpu"
    no_imagenet_start(cfg)
    for k, v in opts.items():
        cfg.merge_from_list([k, v])
    return cfg


@pytest.mark.parametrize("name,exits", [
    ("hs3_r18", ["res3", "res4"]), ("hs3_fuse_r18", ["res3", "res4"]),
    ("hs3_hrnet", ["stage2_b0", "stage3_b0"]), ("hs3_fuse_hrnet", ["stage2_b0", "stage3_b0"]),
])
def test_demo_configs_build_and_train_a_step(tmp_path, name, exits):
    path = write_clusters(tmp_path / "c.json", {exits[0]: [0, 0, 1, 1, 0, 2, 2, 1, 1, 0], exits[1]: list(range(5)) * 2},
                          class_names=None, num_classes=10)
    cfg = _yaml(f"configs/demo/hs3/{name}.yaml", **{"MODEL.EXITS.HS3.CLUSTERS_FILE": path, "MODEL.EXITS.CHANNELS": 16})
    assert _yaml(f"configs/demo/hs3/{name}.yaml").MODEL.EXITS.HS3.CLUSTERS_FILE.endswith("/hs3/clusters.json")
    cfg.DATASETS.TRAIN = ()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert list(model.exits) == exits and (model.fusion is not None) == ("fuse" in name)
    losses = model(random_batch(2, 64, 64, 10))
    assert set(losses) == {"loss_sem_seg", "loss_hs3"}
    sum(losses.values()).backward()
    ds = _yaml(f"configs/demo/hs3/ds_{name.split('_')[-1]}.yaml")
    assert ds.MODEL.EXITS.MODE == "ds" and ds.DATASETS.TEST == ("segdistill_demo_train_hs3_analysis",)


def test_demo_lazy_hs3_config(tmp_path):
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(os.path.join(REPO, "configs/demo/hs3/hs3_r18.py"))
    from detectron2.data import MetadataCatalog

    demo_names = list(MetadataCatalog.get("segdistill_demo_val").stuff_classes)
    path = write_clusters(tmp_path / "c.json", {"res3": [0, 0, 1, 1, 0, 2, 2, 1, 1, 0], "res4": list(range(5)) * 2},
                          class_names=demo_names)
    cfg.model.exits.num_classes.path = path
    cfg.model.objective.label_luts.path = path
    cfg.model.objective.clusters_file = path
    cfg.model.exits.channels = 16
    model = instantiate(cfg.model).train()
    assert [e.segmenter.out_channels for e in model.exits.values()] == [3, 5]
    losses = model(random_batch(2, 64, 64, 10))
    assert set(losses) == {"loss_sem_seg", "loss_hs3"}
    cfg.dataloader.evaluator.label_spaces.path = path
    spaces = instantiate(cfg.dataloader.evaluator.label_spaces)
    assert len(spaces["sem_seg_res3"][1]) == 3 and spaces["sem_seg_res3"][0][:10].tolist() == [0, 0, 1, 1, 0, 2, 2, 1, 1, 0]


CITYSCAPES_HS3 = ["hrnetv2_w18_hs3", "hrnetv2_w48_hs3", "ocrnet_hrnetv2_w18_hs3", "ocrnet_hrnetv2_w18_hs3_fuse",
                  "ocrnet_hrnetv2_w18_hs3_fuse_lighter", "ocrnet_hrnetv2_w48_hs3", "ocrnet_hrnetv2_w48_hs3_fuse"]


def test_every_cityscapes_hs3_config_is_tested():
    folder = os.path.join(REPO, "configs/cityscapes/hs3")
    assert sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml")) == sorted(CITYSCAPES_HS3)


@pytest.mark.parametrize("name", CITYSCAPES_HS3)
def test_cityscapes_hs3_configs_build_and_run_a_step(tmp_path, name):
    path = os.path.join(REPO, "configs/cityscapes/hs3", name + ".yaml")
    assert os.path.isfile(path), f"{path} is missing"
    assign = {"stage2_b0": [i % 4 for i in range(19)], "stage3_b0": [i % 8 for i in range(19)]}
    clusters = write_clusters(tmp_path / "c.json", assign, class_names=[f"c{i}" for i in range(19)])
    cfg = _yaml(path, **{"MODEL.EXITS.HS3.CLUSTERS_FILE": clusters})
    cfg.MODEL.NORM = "BN"
    cfg.DATASETS.TRAIN = ()
    assert cfg.MODEL.EXITS.MODE == "hs3" and cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 19
    assert cfg.MODEL.SEM_SEG_HEAD.NAME in ("HRNetV2Head", "OCRHead")
    assert cfg.HS3_ANALYSIS.FRACTION == pytest.approx(0.1008)  # the paper's 300 of 2975 images
    if "w48" in name:  # same code path as W18; only check that it merges (a W48 step is slow on CPU)
        return
    cfg.MODEL.EXITS.CHANNELS = 16
    cfg.MODEL.SEM_SEG_HEAD.OCR_MID_CHANNELS, cfg.MODEL.SEM_SEG_HEAD.OCR_KEY_CHANNELS = 32, 16
    cfg.MODEL.EXITS.HS3.FUSE.OCR_MID_CHANNELS, cfg.MODEL.EXITS.HS3.FUSE.OCR_KEY_CHANNELS = 16, 8
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert [e.segmenter.out_channels for e in model.exits.values()] == [4, 8]
    assert (model.fusion is not None) == ("fuse" in name)
    batch = random_batch(2, 32, 32, 19)
    torch.manual_seed(1)
    losses = model(batch)
    assert {"loss_sem_seg", "loss_hs3"} <= set(losses)
    sum(losses.values()).backward()
    torch.manual_seed(1)  # the same dropout masks for the brute-force pass
    with torch.no_grad():
        images = model._images(batch)
        outs = model.forward_outputs(model.backbone(images.tensor), tuple(images.tensor.shape[-2:]))
    expected = brute_hs3_loss(outs, model._targets(batch), assign, {"stage2_b0": 1.0, "stage3_b0": 1.0})
    assert losses["loss_hs3"].item() == pytest.approx(expected, rel=1e-4)


def test_one_label_to_cluster_mapping_for_objective_and_evaluator(tmp_path):
    """The objective's targets and the evaluator's ground truth go through the same mapping:
    classes -> clusters, ignore stays ignore, and anything else (negative values, values past
    the table) becomes ignore (a negative label once took class 0's cluster in one of them)."""
    from segdistill.modeling.exits.hs3_clusters import ground_truth_lut, map_labels

    model = build_model(hs3_cfg(write_clusters(tmp_path / "c.json")))
    labels = torch.tensor([[0, 1, 2, 3, 4, 255, -1, -7, 5, 254, 300]])
    expected = [[0, 0, 1, 1, 2, 255, 255, 255, 255, 255, 255]]
    assert model.exit_objective.exit_targets("res3", labels).tolist() == expected
    lut = ground_truth_lut(ASSIGN["res3"], 255)
    assert map_labels(labels.numpy(), lut, 255).tolist() == expected  # what the evaluator calls on its ground truth


def test_checkpoint_with_other_clusters_is_an_error_naming_both(tmp_path):
    """A Phase-2 checkpoint loaded with another clusters file: an error naming the clusters file
    and both sets of clusters, not fvcore's shape warnings and silently dropped exits."""
    a = write_clusters(tmp_path / "a.json")
    model = trained(hs3_cfg(a))
    DetectionCheckpointer(model, str(tmp_path)).save("model_final")
    weights = str(tmp_path / "model_final.pth")
    same = build_model(hs3_cfg(a))
    DetectionCheckpointer(same).load(weights)  # the same clusters: loads
    assert torch.equal(same.exits["res3"].segmenter.weight, model.exits["res3"].segmenter.weight)
    for other in ({"res3": [0, 1, 1, 1, 2], "res4": [0, 1, 2, 2, 3]},  # same K, other grouping
                  {"res3": [0, 0, 1, 1, 1], "res4": [0, 1, 2, 2, 3]}):  # other K
        b = write_clusters(tmp_path / "b.json", other)
        with pytest.raises(ValueError) as e:
            DetectionCheckpointer(build_model(hs3_cfg(b))).load(weights)
        msg = str(e.value)
        assert "trained with other HS3 clusters" in msg and repr(b) in msg
        assert "res3: K=3 [0, 0, 1, 1, 2]" in msg and f"res3: K={max(other['res3']) + 1} {other['res3']}" in msg
