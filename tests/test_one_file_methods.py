"""A new distillation loss and a new exit mode are one file each.

The examples of docs/distillation.md and docs/multi_exit.md (read from the pages, so the pages
cannot drift from what works) are written to a temporary file and imported as a project's own
module would be. That alone registers the method and its config keys: a YAML config naming the
method and setting one of its keys builds the model, one training step logs the method's term
at the configured weight, and the deployed model holds none of the method's parts. The
registries are cleaned up afterwards, so the other tests see the package's methods only.
"""
import contextlib
import importlib.util
import os
import re

import pytest
import torch

from conftest import REPO, random_batch, tiny_cfg
from detectron2.config import get_cfg
from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model
from segdistill import add_segdistill_config
from segdistill.modeling.distill import DISTILL_LOSSES, distill_losses_from_names, unregister_distill_loss
from segdistill.modeling.exits import EXIT_OBJECTIVES, unregister_exit_objective

K = 5


def doc_example(page, marker):
    """The one ```python block of docs/<page> that contains ``marker``."""
    with open(os.path.join(REPO, "docs", page)) as f:
        blocks = [b for b in re.findall(r"```python\n(.*?)```", f.read(), re.S) if marker in b]
    assert len(blocks) == 1, f"docs/{page} should show one example with {marker!r}, found {len(blocks)}"
    return blocks[0]


@contextlib.contextmanager
def imported_from_file(tmp_path, name, source):
    """Import ``source`` as the module ``name`` from a file (a user's own module); on exit,
    unregister whatever it registered."""
    losses, modes = set(DISTILL_LOSSES), set(EXIT_OBJECTIVES)
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for n in set(DISTILL_LOSSES) - losses:
            unregister_distill_loss(n)
        for n in set(EXIT_OBJECTIVES) - modes:
            unregister_exit_objective(n)


def fresh_cfg():
    cfg = get_cfg()
    add_segdistill_config(cfg)
    return cfg


def write_yaml(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def logged_step(model, batch, seed):
    """One step of detectron2's SimpleTrainer; the scalars it logged (what metrics.json gets)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    trainer = SimpleTrainer(model, [batch], optimizer)
    torch.manual_seed(seed)
    trainer.train(0, 1)
    return {k: v.latest() for k, v in trainer.storage.histories().items()}


def unweighted_value(model, batch, seed, term, set_weight):
    """``term`` of one training forward with the method's weight set to 1 (then put back)."""
    restore = set_weight(1.0)
    torch.manual_seed(seed)
    with torch.no_grad():
        value = float(model(batch)[term])
    set_weight(restore)
    return value


def test_a_distillation_loss_in_one_file(tmp_path):
    source = doc_example("distillation.md", "@register_distill_loss(")
    # the student/teacher pair of the other distillation tests, as YAML files made before the import
    teacher = tiny_cfg("resnet18", "SegDeepLabV3Head", output_stride=16, num_classes=K,
                       **{"MODEL.SEM_SEG_HEAD.ASPP_CHANNELS": 48})
    teacher_path = write_yaml(tmp_path, "teacher.yaml", teacher.dump())
    base = tiny_cfg("resnet18", "SegDeepLabV3Head", num_classes=K, **{"MODEL.META_ARCHITECTURE": "Distiller"})
    base.MODEL.DISTILL.TEACHER.CONFIG_FILE = teacher_path
    base.MODEL.DISTILL.TEACHER.ALLOW_RANDOM = True
    base_path = write_yaml(tmp_path, "base.yaml", base.dump())
    before = fresh_cfg()
    assert "hint_l1" not in DISTILL_LOSSES and "HINT_L1" not in before.MODEL.DISTILL

    with imported_from_file(tmp_path, "hint_l1", source):
        # its keys, with their defaults, come with the import; a config made before gets them too
        assert dict(fresh_cfg().MODEL.DISTILL.HINT_L1) == {
            "WEIGHT": 1.0, "STUDENT_TAP": "head_features", "TEACHER_TAP": "head_features", "CONNECTOR": "conv1x1"}
        add_segdistill_config(before)
        assert before.MODEL.DISTILL.HINT_L1 == fresh_cfg().MODEL.DISTILL.HINT_L1

        method_path = write_yaml(tmp_path, "hint_l1.yaml", f"""_BASE_: {base_path}
MODEL:
  DISTILL:
    LOSSES: ["hint_l1"]
    HINT_L1:
      WEIGHT: 0.25
""")
        cfg = fresh_cfg()
        cfg.merge_from_file(method_path)
        assert cfg.MODEL.DISTILL.HINT_L1.WEIGHT == 0.25
        torch.manual_seed(0)
        model = build_model(cfg).train()
        loss = model.distill_losses["hint_l1"]
        assert loss.loss_weight == 0.25 and loss.connector.weight.shape == (48, 32, 1, 1)
        # a lazy config's losses are what the YAML config builds
        [lazy] = distill_losses_from_names(["hint_l1"], opts=["MODEL.DISTILL.HINT_L1.WEIGHT", 0.25])
        assert (type(lazy), lazy.loss_weight, lazy.taps, lazy.connector_kind) == (
            type(loss), loss.loss_weight, loss.taps, loss.connector_kind)

        batch = random_batch(2, 64, 64, K)

        def set_weight(w):
            old, loss.loss_weight = loss.loss_weight, w
            return old

        raw = unweighted_value(model, batch, 3, "loss_hint_l1", set_weight)
        before_step = loss.connector.weight.detach().clone()
        logged = logged_step(model, batch, 3)
        assert logged["loss_hint_l1"] == pytest.approx(0.25 * raw, rel=1e-6) and raw > 0
        assert not torch.equal(loss.connector.weight, before_step)  # the connector trains with the student

        # the deployed student has none of the loss's parts and loads strictly into its own config
        deployed = model.deploy_state_dict()
        assert not [k for k in deployed if "distill_losses" in k or "connector" in k]
        student_cfg = cfg.clone()
        student_cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentorAnySize"
        result = build_model(student_cfg).load_state_dict(deployed, strict=True)
        assert not result.missing_keys and not result.unexpected_keys

    assert "hint_l1" not in DISTILL_LOSSES and "HINT_L1" not in fresh_cfg().MODEL.DISTILL  # cleaned up


def test_an_exit_mode_in_one_file(tmp_path):
    source = doc_example("multi_exit.md", "@register_exit_objective(")
    base = tiny_cfg("resnet18", "SegDeepLabV3Head", num_classes=K, **{"MODEL.META_ARCHITECTURE": "MultiExitSegmentor"})
    base.MODEL.EXITS.IN_FEATURES = ["res3", "res4"]
    base.MODEL.EXITS.CHANNELS = 16
    base_path = write_yaml(tmp_path, "base.yaml", base.dump())
    assert "ramp_ds" not in EXIT_OBJECTIVES and "RAMP_DS" not in fresh_cfg().MODEL.EXITS

    with imported_from_file(tmp_path, "ramp_ds", source):
        assert dict(fresh_cfg().MODEL.EXITS.RAMP_DS) == {"WEIGHT": 1.0, "POWER": 1.0}
        method_path = write_yaml(tmp_path, "ramp_ds.yaml", f"""_BASE_: {base_path}
MODEL:
  EXITS:
    MODE: "ramp_ds"
    RAMP_DS:
      WEIGHT: 0.25
""")
        cfg = fresh_cfg()
        cfg.merge_from_file(method_path)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        assert type(model).__name__ == "MultiExitSegmentor" and set(model.exits) == {"res3", "res4"}
        objective = model.exit_objective
        assert objective.weight == 0.25 and objective.power == 1.0

        batch = random_batch(2, 64, 64, K)

        def set_weight(w):
            old, objective.weight = objective.weight, w
            return old

        raw = unweighted_value(model, batch, 4, "loss_ramp_ds", set_weight)
        logged = logged_step(model, batch, 4)
        assert logged["loss_ramp_ds"] == pytest.approx(0.25 * raw, rel=1e-6) and raw > 0
        assert {"loss_sem_seg", "loss_ramp_ds"} <= set(logged)

        # deployed: the plain segmentor's weights only (no exit, no objective state)
        deployed = model.deploy_state_dict()
        assert deployed and all(k.startswith(("backbone.", "sem_seg_head.")) for k in deployed)
        plain_cfg = cfg.clone()
        plain_cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentorAnySize"
        result = build_model(plain_cfg).load_state_dict(deployed, strict=True)
        assert not result.missing_keys and not result.unexpected_keys

    assert "ramp_ds" not in EXIT_OBJECTIVES and "RAMP_DS" not in fresh_cfg().MODEL.EXITS
