"""A YAML config of the project as the tools read it: from a file and KEY VALUE overrides."""
from __future__ import annotations

import argparse
from typing import Sequence

from detectron2.config import CfgNode, get_cfg

from .defaults import add_segdistill_config

__all__ = ["load_yaml_config", "config_tool_parser"]


def load_yaml_config(config_file: str, opts: Sequence = ()) -> CfgNode:
    """detectron2's defaults, segdistill's keys, ``config_file``, then ``opts`` (KEY VALUE ...)."""
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg


def config_tool_parser(description: str, config_help: str,
                       opts_help: str = "KEY VALUE overrides of the config") -> argparse.ArgumentParser:
    """The command line of a tool on one YAML config: ``--config-file`` (required) and the
    trailing overrides ``opts``; the tool adds its own arguments. ``description``: the tool's
    module docstring, printed as written."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help=config_help)
    p.add_argument("opts", nargs=argparse.REMAINDER, help=opts_help)
    return p
