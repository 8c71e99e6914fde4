"""Shared by the preparation scripts of ADE20K, PASCAL VOC + SBD and PASCAL-Context: convert
many label files in parallel, with a progress bar, resumably.

Each job writes one output PNG through a temporary file and a rename, so an output that
exists is complete: a second run (or a run after an interruption) converts only what is
missing or older than its source (a source edited since; ``force`` redoes everything). A job's problems (unreadable input, unexpected
values) are collected and reported together, naming the files; nothing is written for them.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

__all__ = ["save_png", "run_jobs", "read_ids", "fail", "base_parser"]

Job = Tuple[str, str]  # (source, destination)


def save_png(array: np.ndarray, dst: str) -> None:
    """Write an 8-bit single-channel PNG atomically (temporary file + rename)."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.tmp{os.getpid()}.png"
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="L").save(tmp)
    os.replace(tmp, dst)


def read_ids(path: str) -> List[str]:
    """Image ids of a split list (first column of each non-empty line)."""
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


def base_parser(doc: str) -> argparse.ArgumentParser:
    """--root ($DETECTRON2_DATASETS or ./datasets), --workers, --force: every preparation script's options."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets")))
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--force", action="store_true", help="convert again what was converted")
    return p


def fail(message: str) -> None:
    raise SystemExit(f"error: {message}\nSee datasets/README.md.")


def _call(args):
    fn, job = args
    try:
        return job, fn(*job)
    except Exception as e:  # noqa: BLE001  (reported with the file's name)
        return job, f"{type(e).__name__}: {e}"


def _stale(src: str, dst: str) -> bool:
    """``dst`` is missing, or older than ``src`` (edited after it was converted)."""
    if not os.path.exists(dst):
        return True
    return os.path.exists(src) and os.stat(src).st_mtime_ns > os.stat(dst).st_mtime_ns


def run_jobs(jobs: Sequence[Job], convert: Callable[[str, str], Optional[str]], *, workers: int, force: bool,
             desc: str) -> Tuple[int, int]:
    """Run ``convert(src, dst)`` (returns None, or a problem) for every job whose ``dst`` is
    missing or older than ``src`` (all with ``force``); returns (converted, skipped). Problems
    stop the script with a message naming the files (after every other job ran)."""
    from tqdm import tqdm

    todo = [j for j in jobs if force or _stale(*j)]
    problems: List[Tuple[str, str]] = []
    if todo:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        tasks: Iterable = ((convert, j) for j in todo)
        if workers > 1:
            with ctx.Pool(workers) as pool:
                for job, problem in tqdm(pool.imap_unordered(_call, tasks, chunksize=16), total=len(todo), desc=desc):
                    if problem:
                        problems.append((job[0], problem))
        else:
            for job, problem in tqdm(map(_call, tasks), total=len(todo), desc=desc):
                if problem:
                    problems.append((job[0], problem))
    if problems:
        shown = "\n  ".join(f"{src}: {p}" for src, p in sorted(problems)[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        fail(f"{len(problems)} of {len(todo)} files could not be converted ({desc}):\n  {shown}{more}")
    return len(todo), len(jobs) - len(todo)
