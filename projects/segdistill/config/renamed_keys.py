"""Keys that were renamed, so an old config fails with the new name instead of changing meaning.

yacs refuses an unknown key while merging a YAML file (``merge_from_file``) or a command-line
list (``merge_from_list``, also what ``distill_losses_from_names(opts=...)`` and
``MODEL.DISTILL.TEACHER.OPTS`` go through); a key registered here as renamed is refused with
``Key <old> was renamed to <new>; please update your config. Note: <how the values map>``
(yacs's ``CfgNode.register_renamed_key``). docs/config_keys.md lists the same table.
"""
from __future__ import annotations

from typing import Dict, Tuple

__all__ = ["RENAMED_KEYS", "register_renamed_keys"]

_VARIANT = "MODEL.DISTILL.{}.VARIANT"

# old key -> (new key, how an old value reads under the new key)
RENAMED_KEYS: Dict[str, Tuple[str, str]] = {
    # One key for "the paper's form or the authors' code": VARIANT, values "paper" / "code"
    # (or the name of a third code base whose form it is).
    "MODEL.DISTILL.AT.FORM": (_VARIANT.format("AT"), "values unchanged: 'code' (default) or 'paper'."),
    "MODEL.DISTILL.CIRKD.ENQUEUE": (_VARIANT.format("CIRKD"), "'class' is now 'paper', 'code' stays 'code'."),
    "MODEL.DISTILL.HWD.DIVERGENCE_INPUT": (_VARIANT.format("HWD"),
                                           "'activation' is now 'paper', 'logits' is now 'code'."),
    "MODEL.DISTILL.DIST.INPUT": (_VARIANT.format("DIST"),
                                 "'probabilities' is now 'paper', 'logits' (HWD's code) is now 'hwd'."),
    # Taps: STUDENT_TAP / TEACHER_TAP everywhere.
    "MODEL.DISTILL.AT.TAPS": ("MODEL.DISTILL.AT.STUDENT_TAP",
                              "and MODEL.DISTILL.AT.TEACHER_TAP, two lists paired by position: "
                              "TAPS [a, b] is STUDENT_TAP [a, b] with TEACHER_TAP [a, b]."),
    # Loss weights: *_WEIGHT everywhere.
    "MODEL.EXITS.HS3.GAMMAS": ("MODEL.EXITS.HS3.WEIGHT", "the same list: one weight per exit or one for all."),
    "MODEL.DISTILL.DIST.BETA": ("MODEL.DISTILL.DIST.INTER_WEIGHT", "the weight of the inter-class term."),
    "MODEL.DISTILL.DIST.GAMMA": ("MODEL.DISTILL.DIST.INTRA_WEIGHT", "the weight of the intra-class term."),
    # Temperatures: TEMPERATURE everywhere (renamed earlier).
    "MODEL.DISTILL.CWD.TAU": ("MODEL.DISTILL.CWD.TEMPERATURE", "the same value."),
    "MODEL.DISTILL.HWD.TAU": ("MODEL.DISTILL.HWD.TEMPERATURE", "the same value."),
    "MODEL.DISTILL.FAKD_CWD.TAU": ("MODEL.DISTILL.FAKD_CWD.TEMPERATURE", "the same value."),
}


def register_renamed_keys(cfg) -> None:
    """Register every entry of :data:`RENAMED_KEYS` on the root ``cfg`` (idempotent)."""
    for old, (new, note) in RENAMED_KEYS.items():
        if not cfg.key_is_renamed(old):
            cfg.register_renamed_key(old, new, message=note)
