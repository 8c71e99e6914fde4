"""Where datasets live: ``$DETECTRON2_DATASETS`` (default ``./datasets``), as in detectron2."""
import os

__all__ = ["datasets_root"]


def datasets_root() -> str:
    """The datasets root, read at call time so a changed environment variable is honoured."""
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))
