"""Failures that used to be silent or late. Each test reproduces one failure and
checks the new behaviour, mostly in-process through train_net.py's own functions (fast).

1. corrupt images (load-time decode check, stop / skip, errors naming file and dataset)
3. misspelled lazy-config keys
4. evaluation of random or mismatched weights
5. nothing written into OUTPUT_DIR before the build; no config.yaml replaced silently
7. an interrupted and resumed run equals the uninterrupted run (YAML and lazy paths)
(6, the 2-process evaluation, is in test_train_net.py with the other 2-process run.)
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import LAZY_TINY, REPO, TINY, load_script
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase
from segdistill.data import SemSegDatasetMapper, UnreadableFileError, build_sem_seg_train_loader
from segdistill.data.datasets import folder
from segdistill.config import LazyOverrideError, apply_lazy_overrides
from segdistill.convert import WeightsMismatchError
from segdistill.engine import OutputDirConflictError


train_net = load_script("train_net", "train_net.py")
YAML = os.path.join(REPO, "configs/demo/deeplabv3_r18.yaml")
LAZY = os.path.join(REPO, "configs/demo/deeplabv3_r18.py")


def args(*argv):
    return train_net.argument_parser().parse_args([str(a) for a in argv])


def listing(folder_):
    """{name: (size, mtime)} of every file under ``folder_``."""
    out = {}
    for d, _, files in os.walk(folder_):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), folder_)] = (st.st_size, st.st_mtime_ns)
    return out


def confusion(out_dir, dataset="segdistill_demo_mini_val"):
    with open(os.path.join(out_dir, "inference", dataset, "confusion_sem_seg.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- 1. corrupt images
def truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


@pytest.fixture
def corrupt_dataset(tmp_path, monkeypatch):
    """A 10-class folder dataset of 6 images (64x48) checked at load time, image 002 truncated."""
    monkeypatch.setenv("SEGDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(folder.CHECK_ENV, raising=False)
    name = f"i17_corrupt_{os.path.basename(tmp_path)}"
    img_dir, lbl_dir = tmp_path / "data" / "img", tmp_path / "data" / "lbl"
    img_dir.mkdir(parents=True)
    lbl_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(img_dir / f"{i:03d}.png")
        Image.fromarray(rng.integers(0, 10, (48, 64), dtype=np.uint8)).save(lbl_dir / f"{i:03d}.png")
    truncate(img_dir / "002.png")

    def load():
        dicts = folder.load_sem_seg_folder(str(img_dir), str(lbl_dir), dataset_name=name, layout_help="")
        folder.verify_sem_seg_dicts(dicts, dataset_name=name, num_classes=10)
        return dicts

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(stuff_classes=[f"c{k}" for k in range(10)], ignore_label=255, evaluator_type="sem_seg")
    yield name, str(img_dir)
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_corrupt_image_is_found_once_by_the_cached_load_time_check(corrupt_dataset, tmp_path, monkeypatch):
    name, img_dir = corrupt_dataset
    bad = os.path.join(img_dir, "002.png")
    dicts = DatasetCatalog.get(name)
    flagged = [d for d in dicts if "unreadable" in d]
    assert [d["file_name"] for d in flagged] == [bad] and "truncated" in flagged[0]["unreadable"]["error"]
    assert all(d["dataset_name"] == name for d in dicts)
    markers = [m for m in os.listdir(folder.dataset_check_cache_dir()) if m.endswith(".json")]
    assert len(markers) == 1
    assert list(json.load(open(os.path.join(folder.dataset_check_cache_dir(), markers[0])))["unreadable"]) == [bad]

    # a new process: the marker is enough, nothing is decoded again, the file is still flagged
    folder._VERIFIED.clear()
    monkeypatch.setattr(folder, "_check_record", lambda *a, **k: pytest.fail("decoded again"))
    assert [d["file_name"] for d in DatasetCatalog.get(name) if "unreadable" in d] == [bad]

    # JPEGs are decoded at 1/8 scale, which still finds a truncated file
    jpg = tmp_path / "x.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(jpg)
    truncate(jpg)
    monkeypatch.undo()
    assert folder._check_record({"file_name": str(jpg), "sem_seg_file_name": str(jpg)}, 10, 255, {})[0][0] == "unreadable"


def test_training_on_a_corrupt_image_stops_naming_it_or_skips_and_lists_it(corrupt_dataset, tmp_path):
    name, img_dir = corrupt_dataset
    bad = os.path.join(img_dir, "002.png")
    opts = TINY + ["DATASETS.TRAIN", f'("{name}",)', "SOLVER.MAX_ITER", "2"]
    out = tmp_path / "stop"
    with pytest.raises(UnreadableFileError) as e:
        train_net.main(args("--config-file", YAML, *opts, "OUTPUT_DIR", out))
    assert bad in str(e.value) and name in str(e.value) and "DATALOADER.ON_UNREADABLE skip" in str(e.value)
    assert not out.exists()  # failed before the model and data were built: nothing written

    out = tmp_path / "skip"
    train_net.main(args("--config-file", YAML, *opts, "DATALOADER.ON_UNREADABLE", "skip", "OUTPUT_DIR", out))
    lines = (out / "skipped_files.txt").read_text().splitlines()
    assert [line.split("\t")[:2] for line in lines] == [[bad, name]] and "truncated" in lines[0]
    assert bad in (out / "log.txt").read_text() and (out / "model_final.pth").is_file()


def test_a_file_failing_during_training_names_file_and_dataset(corrupt_dataset, tmp_path):
    from conftest import tiny_cfg

    name, img_dir = corrupt_dataset
    cfg = tiny_cfg(num_classes=10)
    cfg.INPUT.CROP.SIZE = (32, 32)
    dicts = [d for d in DatasetCatalog.get(name) if "unreadable" not in d]
    later = os.path.join(img_dir, "004.png")
    truncate(later)  # breaks after the load-time check (a storage problem mid-run)

    def loader(policy, workers, skipped=None):
        return build_sem_seg_train_loader(dicts, mapper=SemSegDatasetMapper(cfg, True), total_batch_size=5,
                                          num_workers=workers, seed=0, on_unreadable=policy, skipped_files=skipped)

    with pytest.raises(UnreadableFileError) as e:  # raised in a worker process, re-raised here
        next(iter(loader("stop", 1)))
    assert later in str(e.value) and f"Dataset '{name}'" in str(e.value)

    skipped = tmp_path / "skipped.txt"
    batches = []
    for batch in loader("skip", 0, str(skipped)):
        batches.append([d["file_name"] for d in batch])
        if len(batches) == 3:
            break
    assert sum(len(b) for b in batches) == 15 and later not in sum(batches, [])
    assert skipped.read_text().split("\t")[:2] == [later, name]


# ----------------------------------------------------------------------------- 3. lazy overrides
def test_misspelled_lazy_keys_are_errors_naming_the_nearest_keys(tmp_path):
    from detectron2.config import LazyConfig

    cfg = LazyConfig.load(LAZY)
    with pytest.raises(LazyOverrideError, match=r"'train.max_iters'.*Nearest valid keys: train.max_iter"):
        apply_lazy_overrides(cfg, ["train.max_iters=10"])
    with pytest.raises(LazyOverrideError, match=r"takes no argument 'output_strid'.*model.backbone.output_stride"):
        apply_lazy_overrides(cfg, ["model.backbone.output_strid=16"])
    with pytest.raises(LazyOverrideError, match=r"'train.max_iter' is a value"):
        apply_lazy_overrides(cfg, ["train.max_iter.x=1"])
    # keys the config does not set yet: an argument of a LazyCall target, or '+' on purpose
    apply_lazy_overrides(cfg, ["dataloader.test.dataset.filter_empty=True", "+train.note=hello",
                               "dataloader.train.mapper.augmentations.0.ratio_range=[1.0,1.0]"])
    assert cfg.dataloader.test.dataset.filter_empty is True and cfg.train.note == "hello"
    assert list(cfg.dataloader.train.mapper.augmentations[0].ratio_range) == [1.0, 1.0]

    out = tmp_path / "lazy"
    with pytest.raises(LazyOverrideError, match="train.max_iter"):
        train_net.main(args("--config-file", LAZY, "train.max_iters=10", f"train.output_dir={out}"))
    assert not out.exists()


# ----------------------------------------------------------------------------- 4. random weights
def test_evaluating_random_or_mismatched_weights_is_an_error(tmp_path):
    from detectron2.modeling import build_model

    # no weights at all
    out = tmp_path / "eval"
    with pytest.raises(WeightsMismatchError, match=r"MODEL.WEIGHTS is empty.*TEST.ALLOW_RANDOM_WEIGHTS"):
        train_net.main(args("--config-file", YAML, "--eval-only", *TINY, "OUTPUT_DIR", out))
    assert not out.exists()

    # an undeployed Distiller training checkpoint given to its student's config
    student = os.path.join(REPO, "configs/demo/distill/student.yaml")
    run = tmp_path / "cwd"
    run.mkdir()
    cfg, _ = train_net.setup(args("--config-file", os.path.join(REPO, "configs/demo/distill/cwd.yaml"), *TINY,
                                  "MODEL.DISTILL.TEACHER.WEIGHTS", "", "MODEL.DISTILL.TEACHER.ALLOW_RANDOM", "True",
                                  "MODEL.DISTILL.TEACHER.OPTS", '["MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "32"]',
                                  "OUTPUT_DIR", run))
    distiller = build_model(cfg)
    assert any(k.startswith("student.") for k in distiller.state_dict())
    torch.save({"model": distiller.state_dict(), "iteration": 2}, run / "model_final.pth")
    (run / "config.yaml").write_text(cfg.dump())
    with pytest.raises(WeightsMismatchError) as e:
        train_net.main(args("--config-file", student, "--eval-only", *TINY, "MODEL.WEIGHTS", run / "model_final.pth",
                            "OUTPUT_DIR", out))
    msg = str(e.value)
    assert str(run / "model_final.pth") in msg and "'student.'" in msg and "0.0%" in msg
    assert f"tools/deploy_model.py --config-file {run / 'config.yaml'}" in msg

    # a checkpoint of another class count: tensors of another shape
    tiny_model = build_model(train_net.setup(args("--config-file", student, *TINY, "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
                                                  "4", "OUTPUT_DIR", out))[0])
    torch.save({"model": tiny_model.state_dict()}, tmp_path / "four.pth")
    with pytest.raises(WeightsMismatchError, match=r"another shape.*predictor.weight \(4, 32, 1, 1\) vs \(10, 32, 1, 1\)"):
        train_net.main(args("--config-file", student, "--eval-only", *TINY, "MODEL.WEIGHTS", tmp_path / "four.pth",
                            "OUTPUT_DIR", out))

    # the explicit flag allows random weights (tests)
    res = train_net.main(args("--config-file", student, "--eval-only", *TINY, "TEST.ALLOW_RANDOM_WEIGHTS", "True",
                              "OUTPUT_DIR", out))
    assert "mIoU" in res["sem_seg"]

    # lazy configs: the same rule for train.init_checkpoint
    with pytest.raises(WeightsMismatchError, match=r"train.init_checkpoint is empty.*train.allow_random_weights"):
        train_net.main(args("--config-file", LAZY, "--eval-only", *LAZY_TINY, f"train.output_dir={tmp_path / 'lz'}"))
    assert not (tmp_path / "lz").exists()


# ----------------------------------------------------------------------------- 5. output folder
def test_a_run_failing_at_build_time_writes_nothing_into_output_dir(tmp_path):
    sr = os.path.join(REPO, "configs/demo/exits/sr.yaml")
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("MODEL:\n  EXITS:\n    MODE: sr\n")
    (out / "model_final.pth").write_bytes(b"checkpoint")
    (out / "last_checkpoint").write_text("model_final.pth")
    before = listing(out)
    with pytest.raises(Exception, match="bogus"):
        train_net.main(args("--config-file", sr, "--resume", *TINY, "MODEL.EXITS.MODE", "bogus", "OUTPUT_DIR", out))
    assert listing(out) == before and (out / "config.yaml").read_text().startswith("MODEL:\n  EXITS:\n    MODE: sr")
    fresh = tmp_path / "fresh"
    with pytest.raises(Exception, match="bogus"):
        train_net.main(args("--config-file", sr, *TINY, "MODEL.EXITS.MODE", "bogus", "OUTPUT_DIR", fresh))
    assert not fresh.exists()


def test_a_folder_with_checkpoints_of_another_config_is_not_overwritten_silently(tmp_path):
    from segdistill.engine import RunOutput

    out = tmp_path / "run"
    old, _ = train_net.setup(args("--config-file", YAML, *TINY, "OUTPUT_DIR", out))
    out.mkdir()
    (out / "config.yaml").write_text(old.dump())
    (out / "model_0000001.pth").write_bytes(b"checkpoint")
    # the same config: a plain rerun is fine
    train_net.setup(args("--config-file", YAML, *TINY, "OUTPUT_DIR", out))
    # another config: refused before anything is built, naming the folder and the differences
    with pytest.raises(OutputDirConflictError) as e:
        train_net.setup(args("--config-file", YAML, *TINY, "SOLVER.MAX_ITER", "5", "OUTPUT_DIR", out))
    assert str(out) in str(e.value) and "SOLVER.MAX_ITER: 3 -> 5" in str(e.value) and "--resume" in str(e.value)
    # --resume and --overwrite-output say what to do; an evaluation keeps the folder's config
    for flag in ("--resume", "--overwrite-output"):
        train_net.setup(args("--config-file", YAML, flag, *TINY, "SOLVER.MAX_ITER", "5", "OUTPUT_DIR", out))
    cfg, _ = train_net.setup(args("--config-file", YAML, "--eval-only", *TINY, "SOLVER.MAX_ITER", "5", "OUTPUT_DIR", out))
    output = RunOutput(cfg, mode="eval")
    output.open()
    assert (out / "config.yaml").read_text() == old.dump()
    assert "MAX_ITER: 5" in (out / "config_eval.yaml").read_text()


# ----------------------------------------------------------------------------- 7. exact resume
def test_the_loader_continues_its_stream_exactly_with_any_number_of_workers():
    from detectron2.data import get_detection_dataset_dicts
    from conftest import tiny_cfg

    cfg = tiny_cfg(num_classes=10)
    cfg.INPUT.CROP.SIZE = (48, 48)
    dicts = get_detection_dataset_dicts(["segdistill_demo_mini_train"])

    def batches(start, n, workers):
        loader = build_sem_seg_train_loader(dicts, mapper=SemSegDatasetMapper(cfg, True), total_batch_size=2,
                                            num_workers=workers, seed=7)
        loader.set_start_iter(start)
        out = []
        for b in loader:
            out.append([(d["file_name"], d["image"], d["sem_seg"]) for d in b])
            if len(out) == n:
                return out

    whole, resumed = batches(0, 10, 0), batches(6, 4, 2)
    for a, b in zip(whole[6:], resumed):
        assert [x[0] for x in a] == [x[0] for x in b]  # the same samples ...
        assert all(torch.equal(x[1], y[1]) and torch.equal(x[2], y[2]) for x, y in zip(a, b))  # ... augmented alike
    assert len({x[0] for b in whole for x in b}) > 10  # the stream crosses an epoch (16 images) in order


class _Interrupted(Exception):
    pass


class _Interrupt(HookBase):
    """Raises after iteration ``at`` (the run is killed there; its last checkpoint is older)."""

    def __init__(self, at):
        self.at = at

    def after_step(self):
        if self.trainer.iter == self.at:
            raise _Interrupted()


class _Losses(HookBase):
    def __init__(self):
        self.values = {}

    def after_step(self):
        self.values[self.trainer.iter] = self.trainer.storage.latest()["total_loss"][0]


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_an_interrupted_and_resumed_run_equals_the_uninterrupted_run(tmp_path):
    opts = TINY + ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "3", "SOLVER.BASE_LR", "0.1", "SEED", "3"]

    def train(out, *flags, interrupt=None, extra=()):
        cfg, output = train_net.setup(args("--config-file", YAML, *flags, *opts, *extra, "OUTPUT_DIR", out))
        trainer = train_net.Trainer(cfg, output=output)
        losses = _Losses()
        trainer.register_hooks([losses] + ([_Interrupt(interrupt)] if interrupt is not None else []))
        trainer.resume_or_load(resume="--resume" in flags)
        try:
            trainer.train()
        except _Interrupted:
            pass
        return losses.values

    whole = train(tmp_path / "whole")
    first = train(tmp_path / "cut", interrupt=3)  # killed after iteration 3; checkpoint of iteration 2
    assert sorted(first) == [0, 1, 2, 3] and not (tmp_path / "cut" / "model_final.pth").exists()
    # resumed with SEED -1: the data stream's seed comes from the checkpoint, not from the config
    rest = train(tmp_path / "cut", "--resume", extra=["SEED", "-1"])
    assert sorted(rest) == [3, 4, 5]
    assert [rest[i] for i in (3, 4, 5)] == [whole[i] for i in (3, 4, 5)]
    a, b = _weights(tmp_path / "whole" / "model_final.pth"), _weights(tmp_path / "cut" / "model_final.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = confusion(tmp_path / "whole"), confusion(tmp_path / "cut")
    assert ca["matrix"] == cb["matrix"] and ca["metrics"] == cb["metrics"]


def test_lazy_config_resume_is_exact_too(tmp_path, monkeypatch):
    import segdistill.engine.lazy as lazy

    class Curves(lazy.TrainingCurvesHook):  # the last hook: raise after iteration 2 of the first run
        at = None

        def after_step(self):
            super().after_step()
            if self.trainer.iter == Curves.at:
                raise _Interrupted()

    monkeypatch.setattr(lazy, "TrainingCurvesHook", Curves)
    opts = LAZY_TINY + ["train.max_iter=5", "train.checkpointer.period=2", "train.seed=5", "optimizer.lr=0.1"]

    def train(out, *flags):
        try:
            train_net.main(args("--config-file", LAZY, *flags, *opts, f"train.output_dir={out}"))
        except _Interrupted:
            pass

    train(tmp_path / "whole")
    Curves.at = 2
    train(tmp_path / "cut")  # checkpoint of iteration 1, killed after iteration 2
    Curves.at = None
    train(tmp_path / "cut", "--resume")
    a, b = _weights(tmp_path / "whole" / "model_final.pth"), _weights(tmp_path / "cut" / "model_final.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (json.load(open(tmp_path / r / "inference" / "confusion_sem_seg.json")) for r in ("whole", "cut"))
    assert ca["matrix"] == cb["matrix"]
