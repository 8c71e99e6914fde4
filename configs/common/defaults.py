# The default of every config key (add_segdistill_config: projects/segdistill/config/defaults.py and
# each method's own file, the one source of defaults), for lazy configs: the project's backbones and
# heads take every argument explicitly, and the lazy building blocks pass these for the arguments
# they do not choose themselves.
from detectron2.config import get_cfg
from segdistill import add_segdistill_config


def default_cfg():
    """detectron2's defaults + segdistill's keys, frozen."""
    cfg = get_cfg()
    add_segdistill_config(cfg)
    cfg.freeze()
    return cfg
