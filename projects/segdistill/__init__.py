"""segdistill: training-time supervision and distillation for semantic segmentation.

``import segdistill`` registers every backbone, head and meta-architecture with
detectron2's registries and every dataset with its catalogs, so that processes started by
``detectron2.engine.launch`` see them too.

Importing it leaves the warning filters as they were: detectron2's own import-time
deprecation warnings are silenced only while the package imports detectron2. A missing
dependency is an ImportError that says what to install and how.
"""
import os as _os
import warnings as _warnings

__version__ = "0.1.0"
__all__ = ["add_segdistill_config"]

_ROOT = _os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
_REPO = _ROOT if _os.path.isfile(_os.path.join(_ROOT, "pyproject.toml")) else "<the segdistill repository>"

# Import name -> what provides it. torch, torchvision and detectron2 are not declared in
# pyproject.toml (builds differ per machine; detectron2 is not on PyPI under its own name).
_TORCH = ("torch and torchvision built for your machine (https://pytorch.org/get-started/locally/); "
          "tools/setup_env.sh installs torch 2.14 and torchvision 0.29")
_PROVIDERS = {
    "torch": _TORCH,
    "torchvision": _TORCH,
    "detectron2": (
        "detectron2, after torch (it is not on PyPI under its own name): build it with "
        "`pip install 'git+https://github.com/facebookresearch/detectron2.git'`, or install the "
        "pure-Python wheel tools/setup_env.sh uses (sal-detectron2==0.7.2; the script shows how)"
    ),
    "sklearn": "scikit-learn",
    "cv2": "opencv-python-headless",
    "PIL": "Pillow",
    "yaml": "PyYAML",
}


def _missing_dependency(err: ModuleNotFoundError) -> ImportError:
    name = (err.name or "").split(".")[0]
    what = _PROVIDERS.get(name, name)
    if name in ("torch", "torchvision", "detectron2"):
        how = f"Install {what}; then `pip install -e {_REPO}` installs the rest."
    else:
        how = (f"Install {what!r}: `pip install -e {_REPO}` installs every runtime dependency segdistill "
               f"declares (pyproject.toml), or `pip install -r {_os.path.join(_REPO, 'requirements.txt')}`.")
    return ImportError(
        f"segdistill needs the module {name!r}, which this Python cannot import"
        + (f" (importing {err.name!r} failed)" if err.name != name else "") + f". {how} "
        f"On a machine with only Python, `make test` or `tools/setup_env.sh` creates .venv with everything "
        f"(README.md, 'Two commands')."
    )


try:
    with _warnings.catch_warnings():  # restores the caller's filters on exit
        # detectron2 (April 2024) decorates helpers with torch.jit.script, which torch 2.14
        # deprecates: one FutureWarning per helper while detectron2 imports, none actionable here.
        _warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)
        from . import data  # noqa: F401  (dataset registration)
        from . import modeling  # noqa: F401  (registries)
        from . import hs3  # noqa: F401
        from .config import add_segdistill_config
except ModuleNotFoundError as _err:
    if (_err.name or "").split(".")[0] == __name__:
        raise
    raise _missing_dependency(_err) from _err
