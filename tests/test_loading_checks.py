"""Loading paths accept nothing unchecked and fail with errors that say why:

* an AnytimeSegmentor evaluated by train_net.py refuses a plain deployed checkpoint (no exits);
* tools/convert_checkpoint.py checks a file it does not convert against the config's model;
* a file converted from a recipe that names the source format loads in that same recipe;
* evaluation with full weights skips the backbone's ImageNet file (YAML and lazy configs);
* a file that is not a checkpoint is told apart from one that holds Python objects;
* the load report counts the tensors its percentage counts (no BatchNorm step counters).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import LAZY_TINY, REPO, TINY, load_script
from mmseg_oracle import TINY_DEEPLABV3, TINY_DEEPLABV3_YAML
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from segdistill import add_segdistill_config
from segdistill.convert import (
    CheckpointMismatchError, CheckpointReadError, WeightsMismatchError, deployed_state_dict, load_checked_weights,
    load_checkpoint_file, load_weights,
)
from segdistill.convert.openmmlab import describe_model, suggest_config


train_net = load_script("train_net", "train_net.py")
convert_tool = load_script("convert_checkpoint_tool", "tools/convert_checkpoint.py")
YAML = os.path.join(REPO, "configs/demo/deeplabv3_r18.yaml")
LAZY = os.path.join(REPO, "configs/demo/deeplabv3_r18.py")
DS = os.path.join(REPO, "configs/demo/exits/ds.yaml")


def args(*argv):
    return train_net.argument_parser().parse_args([str(a) for a in argv])


def yaml_cfg(config, *opts):
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list([str(o) for o in opts])
    cfg.MODEL.DEVICE = "cpu"
    return cfg


# ----------------------------------------------------------------------------- anytime evaluation
def test_anytime_evaluation_refuses_a_plain_deployed_checkpoint(tmp_path):
    trained = build_model(yaml_cfg(DS, *TINY))
    plain = deployed_state_dict(trained)  # backbone and head only: what tools/deploy_model.py --target plain writes
    assert not any(k.startswith("exits.") for k in plain)
    torch.save({"model": plain}, tmp_path / "plain.pth")
    anytime = ["MODEL.META_ARCHITECTURE", "AnytimeSegmentor"]
    # it covers most of the anytime model: the 90 % share alone would accept it
    model = build_model(yaml_cfg(DS, *TINY, *anytime))
    assert load_weights(model, str(tmp_path / "plain.pth")).matched > 0.9
    out = tmp_path / "eval"
    with pytest.raises(WeightsMismatchError, match=r"(?s)does not fit the anytime model.*at least 100% must match"):
        train_net.main(args("--config-file", DS, "--eval-only", *TINY, *anytime, "MODEL.WEIGHTS",
                            tmp_path / "plain.pth", "OUTPUT_DIR", out))
    assert not out.exists()
    # the lazy loop's evaluation load (lazy_evaluate) is the same function
    from segdistill.engine import load_evaluation_weights

    with pytest.raises(WeightsMismatchError, match=r"train\.init_checkpoint = .*does not fit the anytime model"):
        load_evaluation_weights(model, str(tmp_path / "plain.pth"), key="train.init_checkpoint", min_matched=0.9)


# ----------------------------------------------------------------------------- convert_checkpoint.py
def test_convert_tool_checks_a_file_it_does_not_convert(tmp_path, capsys):
    cfg = yaml_cfg(YAML, "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "32")
    own = tmp_path / "own.pth"
    torch.save({"model": build_model(cfg).state_dict()}, own)
    opts = ["MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "32"]
    # a checkpoint of this config's model: nothing to convert, and said to fit
    assert convert_tool.main(["--config-file", YAML, str(own), str(tmp_path / "o1.pth"), *opts]) == 0
    assert "fits the model" in capsys.readouterr().out and not (tmp_path / "o1.pth").exists()
    # an unrecognised tensor dict
    torch.save({"x": torch.zeros(3), "y": torch.ones(2)}, tmp_path / "xy.pth")
    assert convert_tool.main(["--config-file", YAML, str(tmp_path / "xy.pth"), str(tmp_path / "o2.pth"), *opts]) == 1
    err = capsys.readouterr().err
    assert "does not fit" in err and "0.0%" in err and "'x'" in err and not (tmp_path / "o2.pth").exists()
    # a checkpoint of another network (a ResNet-18 model given to a MobileNetV2 config)
    assert convert_tool.main(["--config-file", YAML, str(own), str(tmp_path / "o3.pth"), *opts,
                              "MODEL.TIMM.NAME", "mobilenetv2_100"]) == 1
    err = capsys.readouterr().err
    assert "does not fit" in err and "backbone.body." in err and not (tmp_path / "o3.pth").exists()


# ----------------------------------------------------------------------------- converted files in their recipe
MM_CFG = TINY_DEEPLABV3  # tests/mmseg_oracle.py


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model.sem_seg_head(model.backbone(x))[0]


def test_a_converted_file_loads_in_the_recipe_that_names_the_source_format(tmp_path, capsys):
    from mmseg_oracle import build_mmseg, mmseg_logits
    from segdistill.convert import SegDistillCheckpointer

    mm = build_mmseg(MM_CFG)
    src = tmp_path / "deeplabv3_r18-d8_tiny.pth"
    torch.save({"state_dict": mm.state_dict()}, src)
    config = tmp_path / "teacher.yaml"
    config.write_text(TINY_DEEPLABV3_YAML.format(repo=REPO, weights_format="mmseg"))
    cfg = yaml_cfg(str(config))
    out = tmp_path / "converted.pth"
    assert convert_tool.main(["--config-file", str(config), str(src), str(out)]) == 0, capsys.readouterr().err
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = mmseg_logits(mm, x)
    # the recipe (MODEL.WEIGHTS_FORMAT mmseg) loads the original file and the converted one alike
    for path in (src, out):
        model = build_model(cfg)
        report = load_checked_weights(model, str(path), min_matched=1.0, weights_format=cfg.MODEL.WEIGHTS_FORMAT)
        assert report.matched == 1.0
        assert (_logits(model, x) - expected).abs().max() < 1e-4
    SegDistillCheckpointer(build_model(cfg), weights_format="mmseg").load(str(out))  # the trainer's path too
    # a file of this project's format that does not fit: the checked loader's usual error
    other = build_model(yaml_cfg(str(config), "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "7"))
    head = {k: v for k, v in other.state_dict().items() if k.startswith("sem_seg_head.")}
    torch.save({"model": head}, tmp_path / "head_only.pth")
    with pytest.raises(WeightsMismatchError, match=r"(?s)does not fit.*another shape"):
        load_checked_weights(build_model(cfg), str(tmp_path / "head_only.pth"), weights_format="mmseg")
    # a file in no known format: read as mmseg (the config says so), the hint is true and grammatical
    torch.save({"model": {"sem_seg_head.predictor.bias": head["sem_seg_head.predictor.bias"][:5],
                          **{f"extra.{i}": torch.zeros(1) for i in range(3)}}}, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointMismatchError) as e:
        load_checked_weights(build_model(cfg), str(tmp_path / "mixed.pth"), weights_format="mmseg")
    msg = str(e.value)
    assert "an mmsegmentation an" not in msg and "unknown" not in msg
    assert "without mmsegmentation's decode_head.* tensors" in msg and "MODEL.WEIGHTS_FORMAT auto" in msg
    # the predictor's name is listed as the file's (no rule) and as the model's (not given): it says why
    assert "1 tensors of the file already have the model's names (sem_seg_head.predictor.bias)" in msg


def test_mmseg_descriptions_are_noun_phrases():
    assert describe_model(["decode_head.psp_modules.0.1.conv.weight", "backbone.stem.0.weight"]).startswith(
        "an mmsegmentation PSPHead on ResNetV1c-")
    odd = describe_model(["decode_head.weird.weight", "backbone.odd.weight"])
    assert odd == ("an mmsegmentation model whose decode head this project does not recognise on a backbone this "
                   "project does not recognise")
    assert "the file is an mmsegmentation model" in suggest_config(["decode_head.weird.weight"])


# ----------------------------------------------------------------------------- ImageNet file vs full weights
def test_evaluation_with_full_weights_skips_the_imagenet_file(tmp_path):
    from detectron2.config import LazyConfig, instantiate
    from segdistill.config import apply_lazy_overrides

    missing = tmp_path / "imagenet" / "resnet18_missing.pth"
    weights = tmp_path / "model_final.pth"
    torch.save({"model": build_model(yaml_cfg(YAML, *TINY)).state_dict()}, weights)
    res = train_net.main(args("--config-file", YAML, "--eval-only", *TINY, "MODEL.TIMM.CHECKPOINT", missing,
                              "MODEL.WEIGHTS", weights, "OUTPUT_DIR", tmp_path / "eval"))
    assert "mIoU" in res["sem_seg"]
    # training still loads it first (then MODEL.WEIGHTS): the error says how to do without it
    with pytest.raises(FileNotFoundError, match=r'(?s)resnet18_missing\.pth.*MODEL\.TIMM\.CHECKPOINT ""'):
        build_model(yaml_cfg(YAML, *TINY, "MODEL.TIMM.CHECKPOINT", missing, "MODEL.WEIGHTS", weights))
    # lazy configs: train.init_checkpoint wins over the backbone's checkpoint
    lazy = apply_lazy_overrides(LazyConfig.load(LAZY), LAZY_TINY)
    torch.save({"model": instantiate(lazy.model).state_dict()}, tmp_path / "lazy_final.pth")
    res = train_net.main(args("--config-file", LAZY, "--eval-only", *LAZY_TINY, f"model.backbone.checkpoint={missing}",
                              f"train.init_checkpoint={tmp_path / 'lazy_final.pth'}",
                              f"train.output_dir={tmp_path / 'lazy_eval'}"))
    assert "mIoU" in res["sem_seg"]


# ----------------------------------------------------------------------------- unreadable files
def test_not_a_checkpoint_is_told_apart_from_unsafe_objects(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(12):  # random bytes fail torch.load in several ways
        path = tmp_path / f"random{i}.pth"
        path.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        for unsafe in (False, True):
            with pytest.raises(CheckpointReadError, match=r"not a PyTorch or safetensors checkpoint") as e:
                load_checkpoint_file(str(path), unsafe_unpickle=unsafe)
            assert "Python objects" not in str(e.value)
    # a real checkpoint holding a class: refused (both file layouts), loaded with --unsafe-unpickle
    import argparse

    for zip_format in (True, False):
        path = tmp_path / f"objects_{zip_format}.pth"
        torch.save({"w": torch.ones(1), "ns": argparse.Namespace(a=1)}, path, _use_new_zipfile_serialization=zip_format)
        with pytest.raises(CheckpointReadError, match=r"(?s)holds Python objects.*argparse\.Namespace"):
            load_checkpoint_file(str(path))
        assert load_checkpoint_file(str(path), unsafe_unpickle=True)["ns"].a == 1
    # full unpickling that fails (the class's module is gone): a clear error, not a traceback from pickle
    (tmp_path / "gone_module_i27.py").write_text("class Thing:\n    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import gone_module_i27

        torch.save({"thing": gone_module_i27.Thing()}, tmp_path / "gone.pth")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("gone_module_i27", None)
    with pytest.raises(CheckpointReadError, match=r"(?s)even with full unpickling.*ModuleNotFoundError"):
        load_checkpoint_file(str(tmp_path / "gone.pth"), unsafe_unpickle=True)


# ----------------------------------------------------------------------------- the load report
def test_load_report_counts_what_its_percentage_counts(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
    torch.save({"model": {"other.weight": torch.zeros(4, 3, 3, 3)}}, tmp_path / "other.pth")
    report = load_weights(model, str(tmp_path / "other.pth"))
    assert report.matched == 0.0
    assert "0.0% of the model's parameters and buffers by elements (0 of 5 tensors" in report.summary()
    torch.save({"model": model.state_dict()}, tmp_path / "same.pth")
    assert "100.0% of the model's parameters and buffers by elements (5 of 5 tensors" in \
        load_weights(model, str(tmp_path / "same.pth")).summary()


class _Bomb:
    """Unpickling calls os.getpid through __reduce__ (a stand-in for any code a pickle can run)."""

    def __reduce__(self):
        return (os.getpid, ())


def test_a_pkl_file_is_unpickled_only_when_it_holds_arrays(tmp_path):
    """detectron2 unpickles .pkl files in full; the checkpointer lets only containers and numpy
    arrays through, and refuses a pickle naming any other global before detectron2 reads it."""
    import pickle

    import numpy as np
    from torch import nn

    from segdistill.convert import CheckpointReadError, SegDistillCheckpointer

    model = nn.Linear(3, 2)
    good = tmp_path / "zoo.pkl"
    weights = {"weight": np.full((2, 3), 0.5, dtype=np.float32), "bias": np.array([1.0, -1.0], dtype=np.float32)}
    with open(good, "wb") as f:
        pickle.dump({"model": weights, "__author__": "test"}, f)
    SegDistillCheckpointer(model).load(str(good))
    assert torch.equal(model.weight, torch.full((2, 3), 0.5)) and torch.equal(model.bias, torch.tensor([1.0, -1.0]))

    bad = tmp_path / "bad.pkl"
    with open(bad, "wb") as f:
        pickle.dump({"model": weights, "__author__": _Bomb()}, f)
    with pytest.raises(CheckpointReadError, match="posix.getpid|os.getpid"):
        SegDistillCheckpointer(nn.Linear(3, 2)).load(str(bad))
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointReadError, match="not a PyTorch or safetensors checkpoint"):
        SegDistillCheckpointer(nn.Linear(3, 2)).load(str(junk))
