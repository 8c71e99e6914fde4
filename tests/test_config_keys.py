"""One name per idea (docs/config_keys.md): where the keys come from and the renamed keys.

Every registered distillation loss and exit mode adds its own section, every head file its own
MODEL.SEM_SEG_HEAD keys; add_segdistill_config stays idempotent. A renamed key fails with an
error naming the new key wherever a config is read: a YAML file, a KEY VALUE list (command
line, MODEL.DISTILL.TEACHER.OPTS), the opts of a lazy config's distill_losses_from_names; an
old constructor argument of a lazy config is refused by the override check and by instantiate.
"""
import os
import re

import pytest

from conftest import REPO
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, get_cfg, instantiate
from segdistill import add_segdistill_config
from segdistill.config import RENAMED_KEYS, LazyOverrideError, SectionHook, apply_lazy_overrides, config_hooks
from segdistill.modeling.distill import DISTILL_LOSSES, distill_losses_from_names
from segdistill.modeling.distill.at import AttentionTransfer
from segdistill.modeling.exits import EXIT_OBJECTIVES, HS3Objective
from segdistill.modeling.heads.deeplab import add_deeplab_head_config
from segdistill.modeling.heads.fcn import add_fcn_head_config
from segdistill.modeling.heads.hrnetv2 import add_hrnetv2_head_config
from segdistill.modeling.heads.isa import add_isa_head_config
from segdistill.modeling.heads.ocr import add_ocr_head_config
from segdistill.modeling.heads.psp import add_psp_head_config


def fresh_cfg():
    cfg = get_cfg()
    add_segdistill_config(cfg)
    return cfg


def flat(node, prefix=""):
    for k, v in node.items():
        if isinstance(v, dict):
            yield from flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_every_registered_method_adds_its_own_section_and_the_config_stays_idempotent():
    cfg = fresh_cfg()
    for name, cls in DISTILL_LOSSES.items():
        assert SectionHook("MODEL.DISTILL", name, cls.add_config) in config_hooks(), name
        assert cfg.MODEL.DISTILL[name.upper()], name  # a section with keys
    for mode, cls in EXIT_OBJECTIVES.items():
        assert SectionHook("MODEL.EXITS", mode, cls.add_config) in config_hooks(), mode
        assert cfg.MODEL.EXITS[mode.upper()], mode
    # running it again changes nothing, also on a config changed in between
    cfg.MODEL.DISTILL.PD.WEIGHT = 7.0
    before = cfg.dump()
    add_segdistill_config(cfg)
    assert cfg.dump() == before and cfg.MODEL.DISTILL.PD.WEIGHT == 7.0


# Each head file's config hook and the MODEL.SEM_SEG_HEAD keys only that file reads.
HEAD_HOOKS = {
    add_psp_head_config: ["PSP_BINS", "PSP_POOL_CHANNELS"],
    add_hrnetv2_head_config: ["HRNETV2_CHANNELS"],
    add_ocr_head_config: ["OCR_MID_CHANNELS", "OCR_KEY_CHANNELS", "OCR_DROPOUT", "OCR_REGION_CHANNELS",
                          "OCR_AUX_LOSS_WEIGHT"],
    add_isa_head_config: ["ISA_CHANNELS", "ISA_DOWN_FACTOR"],
    add_fcn_head_config: ["NUM_CONVS", "CONCAT_INPUT"],
    add_deeplab_head_config: ["ASPP_POOLING", "ASPP_BOTTLENECK_CONVS"],
}


@pytest.mark.parametrize("hook", list(HEAD_HOOKS), ids=lambda h: h.__name__)
def test_a_heads_own_keys_are_added_by_its_files_hook(hook):
    assert hook in config_hooks()
    cfg = fresh_cfg()
    before = cfg.dump()
    for key in HEAD_HOOKS[hook]:
        del cfg.MODEL.SEM_SEG_HEAD[key]
    hook(cfg)  # adds them back, with the same defaults
    assert cfg.dump() == before
    cfg.MODEL.SEM_SEG_HEAD[HEAD_HOOKS[hook][-1]] = 3
    hook(cfg)  # present: changes nothing
    assert cfg.MODEL.SEM_SEG_HEAD[HEAD_HOOKS[hook][-1]] == 3


def test_no_old_name_is_left_in_the_config():
    keys = dict(flat(fresh_cfg()))
    assert not [old for old in RENAMED_KEYS if old in keys]
    assert all(new in keys for new, _ in RENAMED_KEYS.values())
    # the ideas' one names: no FORM / INPUT / ENQUEUE / TAPS / GAMMAS left in any method's section
    left = [k for k in keys if k.startswith(("MODEL.DISTILL.", "MODEL.EXITS."))
            and k.rsplit(".", 1)[1] in {"FORM", "INPUT", "ENQUEUE", "DIVERGENCE_INPUT", "TAPS", "GAMMAS", "TAU"}]
    assert not left


@pytest.mark.parametrize("old", sorted(RENAMED_KEYS))
def test_a_renamed_key_fails_naming_the_new_one_in_yaml_and_key_value_lists(tmp_path, old):
    new, note = RENAMED_KEYS[old]
    message = rf"{re.escape(old)} was renamed to {re.escape(new)}; please update your config\. Note: {re.escape(note)}"
    # a YAML file
    *parents, leaf = old.split(".")
    text, indent = "", ""
    for p in parents:
        text += f"{indent}{p}:\n"
        indent += "  "
    path = tmp_path / "old.yaml"
    path.write_text(f"{text}{indent}{leaf}: 1\n")
    with pytest.raises(KeyError, match=message):
        fresh_cfg().merge_from_file(str(path))
    # the command line / MODEL.DISTILL.TEACHER.OPTS
    with pytest.raises(KeyError, match=message):
        fresh_cfg().merge_from_list([old, "1"])


def test_a_renamed_key_in_a_lazy_configs_loss_options_fails_the_same_way():
    with pytest.raises(KeyError, match=r"MODEL.DISTILL.AT.FORM was renamed to MODEL.DISTILL.AT.VARIANT"):
        distill_losses_from_names(["at"], opts=["MODEL.DISTILL.AT.FORM", "paper"])
    # through a lazy config file, as `model.losses.opts` on the command line would set it
    cfg = LazyConfig.load(os.path.join(REPO, "configs/demo/distill/at.py"))
    cfg = apply_lazy_overrides(cfg, ["model.losses.opts=[MODEL.DISTILL.DIST.INPUT,logits]"])
    with pytest.raises(KeyError, match=r"MODEL.DISTILL.DIST.INPUT was renamed to MODEL.DISTILL.DIST.VARIANT.*'hwd'"):
        instantiate(cfg.model.losses)
    # the new names build
    [at] = distill_losses_from_names(["at"], opts=["MODEL.DISTILL.AT.VARIANT", "paper"])
    assert at.variant == "paper"


def test_an_old_constructor_argument_in_a_lazy_config_is_refused():
    # a command-line override of the argument: the override check names the arguments the target takes
    cfg = LazyConfig.load(os.path.join(REPO, "configs/demo/hs3/hs3_r18.py"))
    refused = r"HS3Objective\(weight, ignore_value.*\), which takes no argument 'gammas'"
    with pytest.raises(LazyOverrideError, match=refused):
        apply_lazy_overrides(cfg, ["model.objective.gammas=2.0"])
    apply_lazy_overrides(cfg, ["model.objective.weight=2.0"])
    assert cfg.model.objective.weight == 2.0
    # an argument written into the config file: instantiate refuses it
    with pytest.raises(TypeError, match="form"):
        instantiate(L(AttentionTransfer)(loss_weight=1.0, student_tap=["res4"], teacher_tap=["res4"], p=2.0,
                                         form="code"))
    with pytest.raises(TypeError, match="gammas"):
        instantiate(L(HS3Objective)(gammas=1.0, ignore_value=255, label_luts={}, clusters_file=""))


def test_config_keys_md_lists_every_renamed_key():
    with open(os.path.join(REPO, "docs/config_keys.md")) as f:
        doc = f.read()
    for old, (new, _) in RENAMED_KEYS.items():
        assert re.search(rf"`{re.escape(old)}`\s*\|\s*`{re.escape(new)}`", doc), f"{old} -> {new} missing"
