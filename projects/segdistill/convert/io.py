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
import re
import zipfile
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["CheckpointReadError", "load_checkpoint_file", "check_pickle_file", "unwrap_state_dict", "ALLOWED_GLOBALS"]

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


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def _not_a_checkpoint(path: str, where: str, e: BaseException) -> CheckpointReadError:
    return CheckpointReadError(
        f"Cannot read {path!r}{where}: it is not a PyTorch or safetensors checkpoint, or it is truncated (an "
        f"interrupted download?) ({type(e).__name__}: {_first_line(e)[:200]})."
    )


#: what torch's weights-only unpickler says when a valid pickle names a class it does not allow
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
#: a pickle stream of protocol 2 to 5 (PyTorch's legacy, non-zip files start with one)
_PICKLE_HEADER = re.compile(rb"\x80[\x02-\x05]")


def _refused_globals(path: str, error: Exception) -> Optional[List[str]]:
    """The classes and functions a PyTorch file names that ``weights_only`` refuses, or None
    when the file is not a checkpoint that stopped at such an object (random bytes, another
    file type, a corrupted pickle: their unpickling errors look alike)."""
    named = _REFUSED_GLOBAL.search(str(error))
    if named is None:
        return None
    if zipfile.is_zipfile(path):
        try:
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001  (a damaged archive: not a readable checkpoint)
            return None
        return wanted or None
    with open(path, "rb") as f:
        header = f.read(2)
    return [named.group(1)] if _PICKLE_HEADER.fullmatch(header) else None


def load_checkpoint_file(path: str, *, key: str = "", unsafe_unpickle: bool = False) -> dict:
    """The object stored in ``path`` (a dict), read without arbitrary unpickling.

    ``key`` names the config key that pointed at the file (for the error messages).
    """
    where = f" ({key})" if key else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Checkpoint not found: {path!r}{where}: put the file at that path, or name it by its URL "
            "(downloaded once into a cache; docs/reproduce.md lists the official files and URLs)."
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
        wanted = _refused_globals(path, e)
        if wanted is None:  # not a pickle that stopped at a Python object: not a checkpoint at all
            raise _not_a_checkpoint(path, where, e) from e
        if not unsafe_unpickle:
            raise CheckpointReadError(
                f"{path!r}{where} holds Python objects other than tensors, containers and numpy scalars: {wanted}; "
                "it is not unpickled (files from outside are untrusted). If you trust the file, write a clean copy "
                f"once with\n  python tools/convert_checkpoint.py --unsafe-unpickle --config-file <config> {path} "
                "<output.pth>"
            ) from e
        logger.warning("UNSAFE: %s is unpickled with weights_only=False (it holds %s). Do this only for files you "
                       "trust.", path, wanted)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:  # noqa: BLE001  (full unpickling can fail anywhere: the file is named)
            raise CheckpointReadError(
                f"Cannot read {path!r}{where} even with full unpickling (--unsafe-unpickle): {type(e2).__name__}: "
                f"{_first_line(e2)}. The classes it holds ({wanted}) may need their package installed "
                "(e.g. mmengine for an OpenMMLab training checkpoint)."
            ) from e2
    except Exception as e:  # noqa: BLE001  (random bytes make torch.load fail in many ways)
        raise _not_a_checkpoint(path, where, e) from e
    if not isinstance(obj, dict):
        raise CheckpointReadError(f"{path!r}{where} holds a {type(obj).__name__}, not a dict of tensors.")
    return obj


def _pickle_allowed() -> Dict[Tuple[str, str], object]:
    """(module, name) -> object for :data:`ALLOWED_GLOBALS` and ``collections.OrderedDict``."""
    import collections

    table = {("collections", "OrderedDict"): collections.OrderedDict}
    for entry in ALLOWED_GLOBALS:
        obj, dotted = entry if isinstance(entry, tuple) else (entry, f"{entry.__module__}.{entry.__qualname__}")
        module, name = dotted.rsplit(".", 1)
        table[(module, name)] = obj
    return table


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles containers, numbers, strings and numpy arrays; any other global is refused."""

    _allowed = None

    def find_class(self, module, name):
        if _ArraysOnlyUnpickler._allowed is None:
            _ArraysOnlyUnpickler._allowed = _pickle_allowed()
        obj = self._allowed.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
        return obj


def check_pickle_file(path: str, *, key: str = "") -> None:
    """Refuse a plain pickle (``.pkl``: detectron2's and Caffe2's model-zoo files, dicts of numpy
    arrays) that holds anything but containers, numbers, strings and numpy arrays: detectron2
    unpickles such files in full, so this runs first (:class:`SegDistillCheckpointer`)."""
    where = f" ({key})" if key else ""
    try:
        with open(path, "rb") as f:
            _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        named = _REFUSED_GLOBAL.search(str(e))
        if named is None:
            raise _not_a_checkpoint(path, where, e) from e
        raise CheckpointReadError(
            f"{path!r}{where} is a pickle that holds Python objects other than containers and numpy arrays "
            f"({named.group(1)}); it is not unpickled (files from outside are untrusted)."
        ) from e
    except Exception as e:  # noqa: BLE001  (random bytes make pickle fail in many ways)
        raise _not_a_checkpoint(path, where, e) from e


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
