"""A dataset of one's own from folders (DATASETS.FOLDER), and class-weighted cross-entropy."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from conftest import REPO, run_train_net
from detectron2.data import DatasetCatalog, MetadataCatalog
from segdistill.config import ConfigError, load_yaml_config
from segdistill.data import config_class_weights, dataset_class_weights, register_config_datasets
from segdistill.data.datasets import DatasetContentError, DatasetLayoutError
from segdistill.data.datasets.user_folders import register_folder_dataset
from segdistill.modeling.exits.ds import DeepSupervisionObjective
from segdistill.modeling.exits.heads import ExitOutput, MultiExitOutputs
from segdistill.modeling.heads.base import safe_cross_entropy, sem_seg_loss

SIZE = 32
RED, GREEN = (220, 20, 60), (0, 200, 0)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGDISTILL_CACHE_DIR", str(tmp_path / "cache"))


def _scene(seed):
    """An image and a square's mask (the square is brighter: something to learn)."""
    rng = np.random.default_rng(seed)
    y0, x0 = rng.integers(2, SIZE // 2, size=2)
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[y0: y0 + SIZE // 3, x0: x0 + SIZE // 3] = True
    image = rng.integers(0, 60, size=(SIZE, SIZE, 3), dtype=np.uint8)
    image[mask] += 150
    return image, mask


def make_binary(root, n_train=4, n_val=2):
    """0/255 masks (L mode), JPEG images: the layout of many binary-segmentation sets."""
    for split, n in (("train", n_train), ("val", n_val)):
        os.makedirs(root / split / "images")
        os.makedirs(root / split / "masks")
        for i in range(n):
            image, mask = _scene(100 * (split == "val") + i)
            Image.fromarray(image).save(root / split / "images" / f"im{i}.jpg", quality=95)
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / split / "masks" / f"im{i}.png")
    return root


def palette_png(index: np.ndarray, path):
    """A palette PNG: black at 0, RED at 5, GREEN at 7 (indices that are not the training ids)."""
    pal = [0, 0, 0] * 256
    pal[15:18], pal[21:24] = RED, GREEN
    im = Image.fromarray(index.astype(np.uint8), mode="P")
    im.putpalette(pal)
    im.save(path)


def make_palette(root, n_train=6, n_val=2):
    """Palette-PNG labels (background, red square, green stripe, 255 border), PNG images."""
    for split, n in (("train", n_train), ("val", n_val)):
        os.makedirs(root / split / "img")
        os.makedirs(root / split / "lbl")
        for i in range(n):
            image, mask = _scene(200 * (split == "val") + i)
            index = np.zeros((SIZE, SIZE), dtype=np.uint8)
            index[mask] = 5
            index[-6:, :] = 7
            image[-6:, :, 1] = 230
            index[0, :] = 255
            Image.fromarray(image).save(root / split / "img" / f"s{i}.png")
            palette_png(index, root / split / "lbl" / f"s{i}_label.png")
    return root


def binary_keys(root, name="bin"):
    return ["DATASETS.FOLDER.NAME", name,
            "DATASETS.FOLDER.TRAIN_IMAGES", str(root / "train/images"), "DATASETS.FOLDER.TRAIN_LABELS",
            str(root / "train/masks"), "DATASETS.FOLDER.VAL_IMAGES", str(root / "val/images"),
            "DATASETS.FOLDER.VAL_LABELS", str(root / "val/masks"),
            "DATASETS.FOLDER.CLASSES", "['background', 'object']", "DATASETS.FOLDER.VALUE_MAP", "[[255, 1]]",
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "2"]


def palette_keys(root, name="pal"):
    return ["DATASETS.FOLDER.NAME", name,
            "DATASETS.FOLDER.TRAIN_IMAGES", str(root / "train/img"), "DATASETS.FOLDER.TRAIN_LABELS",
            str(root / "train/lbl"), "DATASETS.FOLDER.VAL_IMAGES", str(root / "val/img"),
            "DATASETS.FOLDER.VAL_LABELS", str(root / "val/lbl"),
            "DATASETS.FOLDER.CLASSES", "['background', 'square', 'stripe']",
            "DATASETS.FOLDER.VALUE_MAP", f"[[{list(RED)}, 1], [{list(GREEN)}, 2]]",
            "DATASETS.FOLDER.PALETTE", "[[0, 0, 0], [220, 20, 60], [0, 200, 0]]",
            "DATASETS.FOLDER.IMAGE_SUFFIX", ".png", "DATASETS.FOLDER.LABEL_SUFFIX", "_label.png",
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3"]


TINY = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.CHECKPOINT_PERIOD", "100", "INPUT.CROP.SIZE", "(32,32)", "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "16",
        "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0", "MODEL.TIMM.NAME", "resnet18"]


# ----------------------------------------------------------------------------- registration and checks
def test_config_keys_register_both_splits_with_their_maps(tmp_path):
    cfg = load_yaml_config(os.path.join(REPO, "configs/demo/deeplabv3_r18.yaml"),
                           palette_keys(make_palette(tmp_path / "p"), name="pal_reg"))
    assert register_config_datasets(cfg) == ["pal_reg_train", "pal_reg_val"]
    meta = MetadataCatalog.get("pal_reg_train")
    assert meta.stuff_classes == ["background", "square", "stripe"]
    assert meta.stuff_colors == [[0, 0, 0], [220, 20, 60], [0, 200, 0]] and meta.ignore_label == 255
    dicts = DatasetCatalog.get("pal_reg_train")
    assert len(dicts) == 6 and dicts[0]["sem_seg_file_name"].endswith("s0_label.png")
    assert dicts[0]["sem_seg_value_map"] == {5: 1, 7: 2}  # the colours, as the palette's indices
    from segdistill.data import read_dataset_label
    label = read_dataset_label(dicts[0])
    assert set(np.unique(label).tolist()) == {0, 1, 2, 255}


def test_missing_folder_names_the_key(tmp_path):
    root = make_binary(tmp_path / "b")
    keys = binary_keys(root, name="bin_missing")
    keys[keys.index("DATASETS.FOLDER.VAL_IMAGES") + 1] = str(tmp_path / "nowhere")
    cfg = load_yaml_config(os.path.join(REPO, "configs/demo/deeplabv3_r18.yaml"), keys)
    register_config_datasets(cfg)
    DatasetCatalog.get("bin_missing_train")
    with pytest.raises(DatasetLayoutError, match=r"(?s)nowhere.*does not exist.*DATASETS.FOLDER.VAL_IMAGES"):
        DatasetCatalog.get("bin_missing_val")


def test_label_value_outside_the_map_is_refused(tmp_path):
    root = make_binary(tmp_path / "b")
    keys = binary_keys(root, name="bin_nomap")
    keys[keys.index("DATASETS.FOLDER.VALUE_MAP") + 1] = "[[254, 1]]"  # 255 left unmapped, and not the ignore value
    keys += ["MODEL.SEM_SEG_HEAD.IGNORE_VALUE", "100"]
    cfg = load_yaml_config(os.path.join(REPO, "configs/demo/deeplabv3_r18.yaml"), keys)
    register_config_datasets(cfg)
    with pytest.raises(DatasetContentError, match=r"(?s)values \[255\].*after mapping raw values \{254: 1\}"
                                                  r".*DATASETS.FOLDER.VALUE_MAP"):
        DatasetCatalog.get("bin_nomap_train")


def test_class_names_count_must_match_num_classes(tmp_path):
    keys = binary_keys(make_binary(tmp_path / "b"), name="bin_count")
    keys[keys.index("MODEL.SEM_SEG_HEAD.NUM_CLASSES") + 1] = "3"
    cfg = load_yaml_config(os.path.join(REPO, "configs/demo/deeplabv3_r18.yaml"), keys)
    with pytest.raises(ConfigError, match=r"names 2 classes .*NUM_CLASSES is 3; write MODEL.SEM_SEG_HEAD.NUM_CLASSES 2"):
        register_config_datasets(cfg)


def test_bad_value_map_and_palette_are_config_errors(tmp_path):
    kw = dict(train_images="a", train_labels="b", val_images="c", val_labels="d", classes=["x", "y"])
    with pytest.raises(ConfigError, match=r"VALUE_MAP maps to ids \[5\]"):
        register_folder_dataset("bad1", value_map=[[255, 5]], **kw)
    with pytest.raises(ConfigError, match=r"PALETTE has 1 colours for 2 classes"):
        register_folder_dataset("bad2", palette=[[0, 0, 0]], **kw)
    with pytest.raises(ConfigError, match=r"TRAIN_LABELS is empty"):
        register_folder_dataset("bad3", **{**kw, "train_labels": ""})


# ----------------------------------------------------------------------------- class weights
def _two_images(tmp_path, name):
    """Image A: 3 pixels of class 0, 1 of class 1; image B: 4 of class 0 (+ an ignore pixel each)."""
    for split in ("train", "val"):
        os.makedirs(tmp_path / split / "i")
        os.makedirs(tmp_path / split / "l")
        for stem, label in (("a", [[0, 0, 0], [1, 255, 255]]), ("b", [[0, 0, 255], [0, 0, 255]])):
            Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / split / "i" / f"{stem}.png")
            Image.fromarray(np.array(label, np.uint8)).save(tmp_path / split / "l" / f"{stem}.png")
    return register_folder_dataset(name, train_images=str(tmp_path / "train/i"), train_labels=str(tmp_path / "train/l"),
                                   val_images=str(tmp_path / "val/i"), val_labels=str(tmp_path / "val/l"),
                                   classes=["a", "b", "never"], image_suffix=".png")


def test_class_weights_equal_a_hand_computation(tmp_path):
    train, _ = _two_images(tmp_path, "cw")
    # n = (7, 1, 0); N_0 = 4 + 4 (both images), N_1 = 4 (image A only)
    f0, f1 = 7 / 8, 1 / 4
    median = (f0 + f1) / 2
    assert dataset_class_weights([train], "median_frequency", 3, 255) == pytest.approx([median / f0, median / f1, 0.0])
    enet = [1 / math.log(1.02 + 7 / 8), 1 / math.log(1.02 + 1 / 8), 1 / math.log(1.02)]
    assert dataset_class_weights([train], "enet", 3, 255) == pytest.approx(enet)
    cached = [json.load(open(tmp_path / "cache/class_weights" / f)) for f in os.listdir(tmp_path / "cache/class_weights")]
    assert sorted(c["method"] for c in cached) == ["enet", "median_frequency"]
    assert all(c["pixels"] == [7, 1, 0] for c in cached)


def test_config_class_weights_given_computed_or_refused(tmp_path):
    train, _ = _two_images(tmp_path, "cwc")
    cfg = load_yaml_config(os.path.join(REPO, "configs/demo/deeplabv3_r18.yaml"),
                           ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3", "DATASETS.TRAIN", f"('{train}',)"])
    assert config_class_weights(cfg) is None
    cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING = "enet"
    assert config_class_weights(cfg) == pytest.approx(dataset_class_weights([train], "enet", 3, 255))
    cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHTS = [1.0, 2.0, 3.0]
    with pytest.raises(ConfigError, match="set one"):
        config_class_weights(cfg)
    cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING = "none"
    assert config_class_weights(cfg) == [1.0, 2.0, 3.0]
    cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHTS = [1.0, 2.0]
    with pytest.raises(ConfigError, match="has 2 weights"):
        config_class_weights(cfg)


def _brute_force(logits, targets, weight, ignore=255):
    num, den = 0.0, 0.0
    logp = torch.log_softmax(logits.double(), dim=1)
    for n in range(targets.shape[0]):
        for y in range(targets.shape[1]):
            for x in range(targets.shape[2]):
                t = int(targets[n, y, x])
                if t == ignore:
                    continue
                num += -float(logp[n, t, y, x]) * float(weight[t])
                den += float(weight[t])
    return num / den


def test_weighted_loss_equals_a_brute_force_weighted_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 4, generator=g)
    targets = torch.randint(0, 3, (2, 5, 4), generator=g)
    targets[0, 0, :] = 255
    weight = torch.tensor([0.2, 1.5, 4.0])
    expected = _brute_force(logits, targets, weight)
    assert float(safe_cross_entropy(logits, targets, 255, weight)) == pytest.approx(expected, rel=1e-5)
    assert float(sem_seg_loss(logits, targets, 255, "cross_entropy", weight)) == pytest.approx(expected, rel=1e-5)
    assert float(safe_cross_entropy(logits, targets, 255)) != pytest.approx(expected, rel=1e-3)
    # the exits: deep supervision with the head's weights, logits at a lower resolution
    ds = DeepSupervisionObjective(weight=1.0, ignore_value=255)
    ds.set_class_weights(weight)
    low = torch.randn(2, 3, 3, 2, generator=g)
    up = F.interpolate(low, size=(5, 4), mode="bilinear", align_corners=False)
    exit_out = ExitOutput(features=low, seg_logits=low, cls_logits=None, stride=8)
    outputs = MultiExitOutputs(exits={"res3": exit_out}, final=exit_out)
    assert float(ds(outputs, targets)["loss_ds"]) == pytest.approx(_brute_force(up, targets, weight), rel=1e-5)
    # an all-ignore batch stays 0, not NaN
    assert float(safe_cross_entropy(logits, torch.full_like(targets, 255), 255, weight)) == 0.0


def test_the_config_weights_reach_the_head_and_the_exits(tmp_path):
    from detectron2.modeling import build_model

    cfg = load_yaml_config(os.path.join(REPO, "configs/demo/exits/ds.yaml"),
                           ["MODEL.SEM_SEG_HEAD.CLASS_WEIGHTS", str([float(i + 1) for i in range(10)]),
                            "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "16", "MODEL.EXITS.CHANNELS", "16"])
    model = build_model(cfg)
    expected = torch.arange(1.0, 11.0)
    assert torch.equal(model.sem_seg_head.class_weights, expected)
    assert torch.equal(model.exit_objective.class_weights, expected)
    assert not any("class_weights" in k for k in model.state_dict())  # checkpoints unchanged


# ----------------------------------------------------------------------------- end to end, command line only
def _env(tmp_path):
    return dict(os.environ, SEGDISTILL_CACHE_DIR=str(tmp_path / "cache"))


@pytest.mark.slow
def test_binary_masks_train_evaluate_and_draw_from_the_command_line(tmp_path):
    root = make_binary(tmp_path / "data")
    out_dir = tmp_path / "run"
    keys = binary_keys(root) + ["MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING", "enet",
                                "DATASETS.TRAIN", "('bin_train',)", "DATASETS.TEST", "('bin_val',)"]
    out = run_train_net(["--config-file", "configs/demo/deeplabv3_r18.yaml"] + TINY + keys + ["OUTPUT_DIR", str(out_dir)],
                        env=_env(tmp_path))
    assert "Class weights (enet of bin_train)" in out
    conf = json.load(open(out_dir / "inference/bin_val/confusion_sem_seg.json"))
    assert "IoU-object" in conf["metrics"] and "IoU-background" in conf["metrics"]
    weights = json.load(open(next((tmp_path / "cache/class_weights").glob("*.json"))))
    assert weights["datasets"] == ["bin_train"] and sum(weights["pixels"]) == 4 * SIZE * SIZE
    env = _env(tmp_path)
    env["PYTHONPATH"] = os.path.join(REPO, "projects")
    proc = subprocess.run(
        [sys.executable, "tools/visualize_predictions.py", "--config-file", "configs/demo/deeplabv3_r18.yaml",
         "--weights", str(out_dir / "model_final.pth"), "--output", str(tmp_path / "pictures")] + TINY + keys,
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(list((tmp_path / "pictures").glob("*.png"))) == 2
    proc = subprocess.run(
        [sys.executable, "tools/deploy_model.py", "--config-file", "configs/demo/deeplabv3_r18.yaml",
         "--output", str(tmp_path / "deployed.pth")] + TINY + keys + ["MODEL.WEIGHTS", str(out_dir / "model_final.pth")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "deployed.pth").is_file()


@pytest.mark.slow
def test_palette_labels_run_hs3_phase1_from_the_command_line(tmp_path):
    """HS3's Phase 1 (deep supervision on <name>_train_hs3_reduced, evaluated on _hs3_analysis,
    with exits) on a palette-PNG dataset, class-weighted by median frequency."""
    root = make_palette(tmp_path / "data")
    out_dir = tmp_path / "phase1"
    keys = palette_keys(root) + ["MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING", "median_frequency",
                                 "DATASETS.TRAIN", "('pal_train_hs3_reduced',)",
                                 "DATASETS.TEST", "('pal_train_hs3_analysis',)", "HS3_ANALYSIS.FRACTION", "0.3",
                                 "MODEL.EXITS.CHANNELS", "16"]
    out = run_train_net(["--config-file", "configs/demo/hs3/ds_r18.yaml"] + TINY + keys + ["OUTPUT_DIR", str(out_dir)],
                        env=_env(tmp_path))
    assert "Class weights (median_frequency of pal_train_hs3_reduced)" in out
    folder = out_dir / "inference/pal_train_hs3_analysis"
    conf = json.load(open(folder / "confusion_sem_seg.json"))
    assert {"IoU-square", "IoU-stripe"} <= set(conf["metrics"])
    assert sorted(p.name for p in folder.glob("confusion_sem_seg_*.json")) == [
        "confusion_sem_seg_res3.json", "confusion_sem_seg_res4.json"]


@pytest.mark.parametrize("head", ["SegDeepLabV3Head", "SegDeepLabV3PlusHead", "FCNHead", "PSPHead", "OCRHead",
                                  "ISAHead"])
def test_every_head_weighs_its_loss(head):
    """A head's training loss_sem_seg with CLASS_WEIGHTS is the weighted cross-entropy of its logits."""
    from conftest import random_batch, tiny_cfg
    from detectron2.modeling import build_model
    from segdistill.modeling.heads.base import upsample_logits

    torch.manual_seed(0)
    cfg = tiny_cfg("resnet18", head, num_classes=3)
    cfg.MODEL.SEM_SEG_HEAD.DROPOUT = 0.0  # the logits are recomputed below: no random part
    cfg.MODEL.SEM_SEG_HEAD.ASPP_DROPOUT = 0.0
    cfg.MODEL.SEM_SEG_HEAD.OCR_DROPOUT = 0.0
    cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHTS = [0.5, 2.0, 7.0]
    model = build_model(cfg).train()
    seen = {}
    model.sem_seg_head.register_forward_hook(lambda m, inp, out: seen.update(features=inp[0], targets=inp[1]))
    losses = model(random_batch(2, 32, 32, 3))
    head_module = model.sem_seg_head
    assert torch.equal(head_module.class_weights, torch.tensor([0.5, 2.0, 7.0]))
    with torch.no_grad():
        logits = upsample_logits(head_module.forward_outputs(seen["features"])["logits"], head_module.common_stride,
                                 head_module.align_corners)
    expected = head_module.loss_weight * _brute_force(logits, seen["targets"], [0.5, 2.0, 7.0])
    assert float(losses["loss_sem_seg"].detach()) == pytest.approx(expected, rel=1e-4)


LAZY = '''from detectron2.config import LazyConfig
from segdistill.data import register_folder_dataset

# loaded in every process that launch() starts, so the names are registered in each
register_folder_dataset("lazybin", train_images="{root}/train/images", train_labels="{root}/train/masks",
                        val_images="{root}/val/images", val_labels="{root}/val/masks",
                        classes=["background", "object"], value_map=[[255, 1]])
_base = LazyConfig.load("{repo}/configs/demo/deeplabv3_r18.py")
model, dataloader, train = _base.model, _base.dataloader, _base.train
optimizer, lr_multiplier = _base.optimizer, _base.lr_multiplier
model.sem_seg_head.num_classes = 2
model.sem_seg_head.class_weights = [1.0, 3.0]
dataloader.train.mapper.num_classes = dataloader.test.mapper.num_classes = 2
dataloader.train.dataset.names = "lazybin_train"
dataloader.test.dataset.names = "lazybin_val"
dataloader.train.mapper.augmentations[1].crop_size = (32, 32)
'''


@pytest.mark.slow
def test_lazy_config_registers_folders_and_trains(tmp_path):
    root = make_binary(tmp_path / "data")
    cfg_file = tmp_path / "lazy_folders.py"
    cfg_file.write_text(LAZY.format(root=root, repo=REPO))
    out_dir = tmp_path / "lazy"
    run_train_net(["--config-file", str(cfg_file), "dataloader.train.total_batch_size=2",
                   "dataloader.train.num_workers=0", "dataloader.test.num_workers=0", "train.max_iter=2",
                   "train.eval_period=0", f"train.output_dir={out_dir}"], env=_env(tmp_path))
    conf = json.load(open(out_dir / "inference/confusion_sem_seg.json"))
    assert "IoU-object" in conf["metrics"]
