"""train_net.py end to end, a few iterations at a time, through its real command line."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, free_port

pytestmark = pytest.mark.slow

TINY = [
    "DATASETS.TRAIN", '("segdistill_demo_mini_train",)', "DATASETS.TEST", '("segdistill_demo_mini_val",)',
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.CHECKPOINT_PERIOD", "2", "INPUT.CROP.SIZE", "(64,64)", "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "32",
    "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
]


def run(args, check=True):
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "projects") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "train_net.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"train_net.py {' '.join(args)} failed ({proc.returncode}):\n{out[-4000:]}")
    return proc.returncode, out


def final_miou(out):
    rows = re.findall(r"copypaste: ([\d.]+),([\d.]+),([\d.]+),([\d.]+)", out)
    assert rows, out[-3000:]
    return float(rows[-1][0])


def test_yaml_train_evaluate_resume_and_eval_only(tmp_path):
    out_dir = str(tmp_path / "run")
    cfg = ["--config-file", "configs/demo/deeplabv3_r18.yaml"]
    _, out = run(cfg + TINY + ["OUTPUT_DIR", out_dir])
    miou = final_miou(out)
    for f in ("model_final.pth", "model_0000001.pth", "metrics.json", "training_curves.png",
              "inference/segdistill_demo_mini_val/confusion_sem_seg.json"):
        assert os.path.isfile(os.path.join(out_dir, f)), f
    conf = json.load(open(os.path.join(out_dir, "inference/segdistill_demo_mini_val/confusion_sem_seg.json")))
    assert conf["metrics"]["mIoU"] == pytest.approx(miou, abs=1e-3)

    # --resume continues from the last checkpoint up to the new MAX_ITER
    _, out = run(cfg + ["--resume"] + TINY + ["SOLVER.MAX_ITER", "5", "OUTPUT_DIR", out_dir])
    assert "Starting training from iteration 3" in out
    records = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.json"))]
    assert max(r["iteration"] for r in records if "total_loss" in r) == 4

    # --eval-only on the saved weights gives the numbers of a fresh evaluation
    weights = ["MODEL.WEIGHTS", os.path.join(out_dir, "model_final.pth")]
    _, out = run(cfg + ["--eval-only"] + TINY + weights + ["OUTPUT_DIR", str(tmp_path / "eval")])
    _, out2 = run(cfg + ["--eval-only"] + TINY + weights + ["OUTPUT_DIR", str(tmp_path / "eval2")])
    assert final_miou(out) == final_miou(out2)


def test_lazy_config_train_and_eval(tmp_path):
    out_dir = str(tmp_path / "lazy")
    _, out = run([
        "--config-file", "configs/demo/deeplabv3_r18.py",
        "dataloader.train.dataset.names=segdistill_demo_mini_train",
        "dataloader.test.dataset.names=segdistill_demo_mini_val",
        "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
        "train.max_iter=3", "train.eval_period=0", f"train.output_dir={out_dir}",
    ])
    final_miou(out)
    assert os.path.isfile(os.path.join(out_dir, "model_final.pth"))
    assert os.path.isfile(os.path.join(out_dir, "inference", "confusion_sem_seg.json"))
    _, out = run([
        "--config-file", "configs/demo/deeplabv3_r18.py", "--eval-only",
        "dataloader.test.dataset.names=segdistill_demo_mini_val", "dataloader.test.num_workers=0",
        f"train.init_checkpoint={out_dir}/model_final.pth", f"train.output_dir={tmp_path / 'lazy_eval'}",
    ])
    final_miou(out)


def test_two_processes_on_cpu_with_gloo_evaluate_the_saved_model(tmp_path):
    """Two training processes with plain BN keep BN statistics of their own batches; the final
    evaluation (both processes) must be the evaluation of the saved model (rank 0's)."""
    out_dir = str(tmp_path / "ddp")
    _, out = run(["--config-file", "configs/demo/fcn_r18.yaml", "--num-gpus", "2",
                  "--dist-url", f"tcp://127.0.0.1:{free_port()}"] + TINY + ["OUTPUT_DIR", out_dir])
    assert "world size: 2" in out.lower() or "Rank of current process: 1" in out
    final_miou(out)
    assert os.path.isfile(os.path.join(out_dir, "model_final.pth"))
    trained = json.load(open(os.path.join(out_dir, "inference/segdistill_demo_mini_val/confusion_sem_seg.json")))

    # the saved model, evaluated in this process
    from test_no_silent_failures import args, train_net

    eval_dir = tmp_path / "eval"
    train_net.main(args("--config-file", os.path.join(REPO, "configs/demo/fcn_r18.yaml"), "--eval-only", *TINY,
                        "MODEL.WEIGHTS", os.path.join(out_dir, "model_final.pth"), "OUTPUT_DIR", eval_dir))
    saved = json.load(open(eval_dir / "inference/segdistill_demo_mini_val/confusion_sem_seg.json"))
    assert trained["matrix"] == saved["matrix"] and trained["metrics"] == saved["metrics"]


@pytest.mark.parametrize("override,message", [
    (["DATASETS.TRAIN", '("no_such_dataset",)'], "unregistered dataset"),
    (["MODEL.WEIGHTS", "/nonexistent/model.pth"], "Weights file not found: '/nonexistent/model.pth'"),
])
def test_bad_command_lines_fail_clearly(tmp_path, override, message):
    from test_no_silent_failures import args, train_net

    with pytest.raises(Exception) as e:
        train_net.main(args("--config-file", os.path.join(REPO, "configs/demo/deeplabv3_r18.yaml"), *TINY, *override,
                            "OUTPUT_DIR", tmp_path / "run"))
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()  # failed before the build: nothing written


def test_the_trainer_constructor_leaves_what_detectron2s_leaves(tmp_path):
    """Trainer.__init__ builds DefaultTrainer's pieces itself (DefaultTrainer.__init__ cannot wrap
    a CPU model for several processes, nor find unused parameters). In one process, where
    detectron2's constructor works, both leave the same attributes, of the same kinds, so a
    detectron2 release that changes its constructor fails here rather than in a training."""
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultTrainer
    from segdistill.config import add_segdistill_config
    from segdistill.engine import Trainer

    def cfg_in(out):
        cfg = get_cfg()
        add_segdistill_config(cfg)
        cfg.merge_from_file(os.path.join(REPO, "configs/demo/deeplabv3_r18.yaml"))
        cfg.merge_from_list(TINY + ["OUTPUT_DIR", str(out)])
        return cfg

    class WithDetectron2Constructor(Trainer):
        def __init__(self, cfg):
            DefaultTrainer.__init__(self, cfg)

    ours, theirs = vars(Trainer(cfg_in(tmp_path / "ours"))), vars(WithDetectron2Constructor(cfg_in(tmp_path / "d2")))
    assert set(ours) - {"output"} == set(theirs)
    for name, value in theirs.items():
        assert isinstance(ours[name], type(value)), (name, type(ours[name]), type(value))
