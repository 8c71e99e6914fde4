"""Reading checkpoint files that come from outside: safely, with errors that name the file.

Files from the internet are untrusted: PyTorch files are read with
``torch.load(..., weights_only=True)``, which unpickles tensors and plain containers only.
Model-zoo files also carry a ``meta`` dict (mmsegmentation's: config text, class names,
palette, sometimes a numpy scalar such as the best score); the numpy scalar, array and
dtype types are the only extra globals allowed (:data:`ALLOWED_GLOBALS`). Anything else
(e.g. an mmengine ``HistoryBuffer`` in a resumable training checkpoint) is refused with the
list of the globals the file wants; ``unsafe_unpickle=True`` (``tools/convert_checkpoint.py
--unsafe-unpickle``) loads such a file with full unpickling, after a warning, and should be
used once to write a clean copy of a file you trust. ``.safetensors`` files need no pickle.

:func:`unwrap_state_dict` finds the tensors inside the usual wrappers (``state_dict``,
``model``, DDP's ``module.`` prefix).
"""
from __future__ import annotations

import logging
import os
import pickle
import zipfile
from typing import Dict, Tuple

import torch

__all__ = ["CheckpointReadError", "load_checkpoint_file", "unwrap_state_dict", "ALLOWED_GLOBALS"]

logger = logging.getLogger(__name__)


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot be read (missing, truncated, or not allowed to unpickle)."""


def _allowed_globals():
    """numpy scalars, arrays and dtypes (under their numpy 1 and numpy 2 module names)."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    allowed = [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype]
    for name in ("scalar", "_reconstruct"):  # files written with numpy 1 name numpy.core.*
        allowed.append((getattr(multiarray, name), f"numpy.core.multiarray.{name}"))
    for t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"):
        allowed.append(type(np.dtype(t)))
    return allowed


ALLOWED_GLOBALS = _allowed_globals()


def load_checkpoint_file(path: str, *, key: str = "", unsafe_unpickle: bool = False) -> dict:
    """The object stored in ``path`` (a dict), read without arbitrary unpickling.

    ``key`` names the config key that pointed at the file (for the error messages).
    """
    where = f" ({key})" if key else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Checkpoint not found: {path!r}{where}. Nothing is downloaded by this project: put the file "
            "at that path (see docs/reproduce.md for the official file names)."
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return dict(load_file(path, device="cpu"))
        except Exception as e:  # noqa: BLE001  (any safetensors error names the file)
            raise CheckpointReadError(f"Cannot read {path!r}{where}: {type(e).__name__}: {e}") from e
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001  (an old non-zip file: the message of torch.load says it)
            wanted = []
        if not unsafe_unpickle:
            raise CheckpointReadError(
                f"{path!r}{where} holds Python objects other than tensors, containers and numpy scalars"
                f"{f': {wanted}' if wanted else ''}; it is not unpickled (files from outside are untrusted). "
                "If you trust the file, write a clean copy once with\n  python tools/convert_checkpoint.py "
                f"--unsafe-unpickle --config-file <config> {path} <output.pth>\n(torch said: {str(e).splitlines()[0]})"
            ) from e
        logger.warning(
            "UNSAFE: %s is unpickled with weights_only=False (it holds %s). Do this only for files you trust.",
            path, wanted or "objects that weights_only refuses",
        )
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointReadError(
            f"Cannot read {path!r}{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "The file is truncated (an interrupted download?) or not a PyTorch / safetensors checkpoint."
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointReadError(f"{path!r}{where} holds a {type(obj).__name__}, not a dict of tensors.")
    return obj


def unwrap_state_dict(obj: dict) -> Tuple[Dict[str, torch.Tensor], str]:
    """(flat ``{name: tensor}``, where it was found): ``state_dict`` (OpenMMLab), ``model``
    (detectron2), ``state_dict_ema``/``model_ema`` are not used; DDP's ``module.`` is stripped."""
    where = "top level"
    for wrapper in ("state_dict", "model"):
        inner = obj.get(wrapper)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            obj, where = inner, f"'{wrapper}'"
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
        where += " (DDP 'module.' prefix removed)"
    return state, where
