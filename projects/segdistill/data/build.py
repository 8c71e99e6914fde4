"""The training data loader: resumable data order, per-sample augmentation seeds, and the
policy for files that cannot be decoded.

``build_sem_seg_train_loader`` (``@configurable``: ``build_sem_seg_train_loader(cfg,
mapper=...)`` for YAML configs, keyword arguments for lazy ones) returns a
:class:`SemSegTrainLoader`, an iterable of batches (lists of mapped dicts) like
detectron2's ``build_detection_train_loader``, with three guarantees:

* **Exact resume.** The order is a :class:`ResumableTrainingSampler` stream of a seed
  (``SEED``, else a seed shared by the processes) that is part of the training state
  (:meth:`state_dict`, saved in checkpoints by :class:`segdistill.engine.hooks.ExactResumeHook`);
  :meth:`set_start_iter` makes the stream start after the samples an interrupted run
  consumed. Every sample is mapped under numpy / Python / torch generators seeded from
  ``(seed, its position in the stream)``, so its random resize, crop and flip do not
  depend on which worker maps it, on the number of workers or on a restart.
  With ``aspect_ratio_grouping`` the batches depend on leftover buckets, which a restart
  loses: the order then continues approximately (a warning says so).
* **Files that cannot be decoded** (flagged by the dataset's load-time check, or failing
  when read) stop training with an error naming the file and its dataset
  (``on_unreadable="stop"``, the default), or are skipped (``"skip"``): flagged records are
  dropped when the loader is built, a file failing later is replaced by another sample
  drawn from the same seed; each skipped file is logged and listed in ``skipped_files``
  (``OUTPUT_DIR/skipped_files.txt``: path, dataset, error; tab-separated).
* **Pinned memory** (``pin_memory``, on when ``MODEL.DEVICE`` is a CUDA device): batches
  come in page-locked memory, so the model's ``non_blocking`` copies to the GPU overlap.
* :func:`check_eval_datasets` refuses evaluation sets with such files when a run starts
  (evaluation never skips an image: the metrics would be of another set).
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from detectron2.config import configurable
from detectron2.data import DatasetCatalog, get_detection_dataset_dicts
from detectron2.data.build import build_batch_data_loader
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm

from .datasets.folder import UnreadableFileError, unreadable_records
from .mapper import SemSegDatasetMapper
from .samplers import ResumableTrainingSampler

__all__ = ["SemSegTrainLoader", "SeededMapDataset", "build_sem_seg_train_loader", "check_eval_datasets",
           "ON_UNREADABLE_CHOICES", "SKIPPED_FILES", "sample_seed", "step_seed"]

logger = logging.getLogger(__name__)

ON_UNREADABLE_CHOICES = ("stop", "skip")
#: Name of the list of skipped files in OUTPUT_DIR.
SKIPPED_FILES = "skipped_files.txt"
_SKIP_HINT = ("Replace or remove the file, or set DATALOADER.ON_UNREADABLE skip (lazy configs: "
              "dataloader.train.on_unreadable=skip) to train without such files; they are then listed in "
              f"OUTPUT_DIR/{SKIPPED_FILES}.")


def sample_seed(seed: int, position: int, attempt: int = 0) -> int:
    """Seed of the generators that map the sample at ``position`` of the stream."""
    return int(np.random.SeedSequence([seed, 0, position, attempt]).generate_state(1)[0])


def step_seed(seed: int, iteration: int, rank: int) -> int:
    """Seed of the generators of training step ``iteration`` in process ``rank`` (dropout, ...)."""
    return int(np.random.SeedSequence([seed, 1, iteration, rank]).generate_state(1)[0])


@contextlib.contextmanager
def _seeded(seed: int):
    """numpy's, Python's and torch's (CPU) global generators seeded with ``seed``, restored after."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        np.random.seed(seed)
        random.seed(seed)
        torch.default_generator.manual_seed(seed)  # CPU only: CUDA generators are the step's
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def _append_lines(path: Optional[str], lines: Sequence[str]) -> None:
    """Add ``lines`` to the file at ``path`` (those not there yet)."""
    if not path or not lines:
        return
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        have = set()
        if os.path.isfile(path):
            with open(path) as f:
                have = {line.rstrip("\n") for line in f}
        new = [line for line in lines if line not in have]
        if new:
            with open(path, "a") as f:
                f.write("".join(line + "\n" for line in new))
    except OSError as e:
        logger.warning("Cannot write the list of skipped files %s: %s", path, e)


def _skip_line(path: str, dataset: Optional[str], error: str) -> str:
    return "\t".join([path, dataset or "", error.replace("\t", " ").replace("\n", " ")])


class SeededMapDataset(Dataset):
    """Maps ``(position, index)`` to ``mapper(dicts[index])`` under generators seeded from
    ``(seed, position)``; applies the unreadable-file policy (module docstring). ``seed``
    may be changed before iterating (a resumed run restores its seed)."""

    def __init__(self, dicts: List[dict], mapper, *, seed: int, on_unreadable: str = "stop",
                 skipped_files: Optional[str] = None, max_attempts: int = 20):
        self._dicts = DatasetFromList(dicts, copy=False)
        self._mapper = mapper
        self.seed = int(seed)
        self._on_unreadable = on_unreadable
        self._skipped_files = skipped_files
        self._max_attempts = max_attempts
        self._skipped: set = set()

    def __len__(self) -> int:
        return len(self._dicts)

    def __getitem__(self, item):
        position, index = item
        for attempt in range(self._max_attempts):
            record = self._dicts[index]
            with _seeded(sample_seed(self.seed, position, attempt)):
                try:
                    return self._mapper(record)
                except UnreadableFileError as e:
                    if self._on_unreadable == "stop":
                        raise UnreadableFileError(f"{e} {_SKIP_HINT}") from e
                    self._skip(record, e)
            index = int(np.random.default_rng([self.seed, 2, position, attempt]).integers(len(self._dicts)))
        raise UnreadableFileError(
            f"{self._max_attempts} training files in a row cannot be decoded (the last ones are listed in "
            f"{self._skipped_files or 'the log'}): is the dataset's storage readable?"
        )

    def _skip(self, record: dict, error: UnreadableFileError) -> None:
        key = (record.get("file_name"), str(error))
        if key in self._skipped:
            return
        self._skipped.add(key)
        logger.warning("Skipping a training sample (DATALOADER.ON_UNREADABLE skip): %s", error)
        _append_lines(self._skipped_files, [_skip_line(record.get("file_name", "?"), record.get("dataset_name"),
                                                       str(error))])


class SemSegTrainLoader:
    """Iterable of training batches whose position and seed are part of the training state
    (module docstring). Build it with :func:`build_sem_seg_train_loader`."""

    def __init__(self, dataset: Sequence[dict], *, mapper, total_batch_size: int, num_workers: int = 0,
                 aspect_ratio_grouping: bool = False, shuffle: bool = True, seed: Optional[int] = None,
                 on_unreadable: str = "stop", skipped_files: Optional[str] = None, collate_fn=None,
                 pin_memory: bool = False):
        if on_unreadable not in ON_UNREADABLE_CHOICES:
            raise ValueError(f"on_unreadable (DATALOADER.ON_UNREADABLE) must be one of {ON_UNREADABLE_CHOICES}, "
                             f"got {on_unreadable!r}")
        world = comm.get_world_size()
        if total_batch_size <= 0 or total_batch_size % world:
            raise ValueError(f"The total batch size ({total_batch_size}) must be a positive multiple of the number "
                             f"of processes ({world}).")
        dicts = list(dataset)
        flagged = unreadable_records(dicts)
        self._pending: List[str] = []
        if flagged:
            shown = "; ".join(f"{d['unreadable']['file']!r} of '{d.get('dataset_name', '?')}' "
                              f"({d['unreadable']['error']})" for d in flagged[:5])
            more = f" and {len(flagged) - 5} more" if len(flagged) > 5 else ""
            if on_unreadable == "stop":
                raise UnreadableFileError(
                    f"{len(flagged)} of {len(dicts)} training images have a file that cannot be decoded (found by "
                    f"the dataset's load-time check): {shown}{more}. {_SKIP_HINT}"
                )
            dicts = [d for d in dicts if "unreadable" not in d]
            logger.warning("Skipping %d training images whose files cannot be decoded (DATALOADER.ON_UNREADABLE "
                           "skip): %s%s. Listed in %s.", len(flagged), shown, more, skipped_files or "the log only")
            self._pending = [_skip_line(d["unreadable"]["file"], d.get("dataset_name"), d["unreadable"]["error"])
                             for d in flagged]
        if not dicts:
            raise ValueError("The training set is empty" + (" once unreadable files are skipped." if flagged else "."))
        self.total_batch_size = total_batch_size
        self.num_workers = num_workers
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.shuffle = shuffle
        self.on_unreadable = on_unreadable
        self.skipped_files = skipped_files
        self._collate_fn = collate_fn
        self.pin_memory = bool(pin_memory)
        self._seed = int(seed) if seed is not None and int(seed) >= 0 else int(comm.shared_random_seed())
        self._dataset = SeededMapDataset(dicts, mapper, seed=self._seed, on_unreadable=on_unreadable,
                                         skipped_files=skipped_files)
        self._start_iter = 0

    # -- training state ------------------------------------------------------------------------
    @property
    def seed(self) -> int:
        """The seed of the data order, of every sample's augmentation and of the step generators."""
        return self._seed

    def set_start_iter(self, start_iter: int) -> None:
        """Start after the ``start_iter`` iterations an interrupted run did (before iterating)."""
        self._start_iter = int(start_iter)

    def state_dict(self) -> dict:
        return {"seed": self._seed, "total_batch_size": self.total_batch_size}

    def load_state_dict(self, state: dict) -> None:
        self._seed = int(state["seed"])
        self._dataset.seed = self._seed
        if int(state.get("total_batch_size", self.total_batch_size)) != self.total_batch_size:
            logger.warning("The checkpoint was trained with a total batch size of %s, this run uses %d: the data "
                           "order continues at iteration x %d samples, not exactly where it stopped.",
                           state.get("total_batch_size"), self.total_batch_size, self.total_batch_size)

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self):
        if comm.is_main_process():
            _append_lines(self.skipped_files, self._pending)
        start = self._start_iter * self.total_batch_size
        if start and self.aspect_ratio_grouping:
            logger.warning("Resuming with aspect-ratio grouping: the data order continues approximately "
                           "(the grouping buckets of the interrupted run are lost).")
        sampler = ResumableTrainingSampler(len(self._dataset), seed=self._seed, shuffle=self.shuffle, start=start)
        loader = build_batch_data_loader(
            self._dataset, sampler, self.total_batch_size, aspect_ratio_grouping=self.aspect_ratio_grouping,
            num_workers=self.num_workers, collate_fn=self._collate_fn, pin_memory=self.pin_memory,
            seed=self._seed,  # the DataLoader's own generator: making the iterator draws nothing from torch's
        )
        yield from loader


def _train_loader_from_config(cfg, mapper=None, *, dataset=None):
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ValueError(f"DATALOADER.SAMPLER_TRAIN is {cfg.DATALOADER.SAMPLER_TRAIN!r}; segdistill's training "
                         "loader (resumable, seeded per sample) implements 'TrainingSampler' only.")
    if dataset is None:
        dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
    return {
        "dataset": dataset,
        "mapper": mapper if mapper is not None else SemSegDatasetMapper(cfg, True),
        "total_batch_size": cfg.SOLVER.IMS_PER_BATCH,
        "aspect_ratio_grouping": cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        "num_workers": cfg.DATALOADER.NUM_WORKERS,
        "seed": cfg.SEED if cfg.SEED >= 0 else None,
        "on_unreadable": cfg.DATALOADER.ON_UNREADABLE,
        "skipped_files": os.path.join(cfg.OUTPUT_DIR, SKIPPED_FILES) if cfg.OUTPUT_DIR else None,
        "pin_memory": torch.device(cfg.MODEL.DEVICE).type == "cuda",
    }


@configurable(from_config=_train_loader_from_config)
def build_sem_seg_train_loader(dataset, *, mapper, total_batch_size, num_workers=0, aspect_ratio_grouping=False,
                               shuffle=True, seed=None, on_unreadable="stop", skipped_files=None, collate_fn=None,
                               pin_memory=False):
    """A :class:`SemSegTrainLoader` (module docstring); ``build_sem_seg_train_loader(cfg, mapper=...)``
    reads ``DATASETS.TRAIN``, ``SOLVER.IMS_PER_BATCH``, ``DATALOADER.*``, ``SEED``, ``OUTPUT_DIR`` and
    ``MODEL.DEVICE`` (pinned memory for a CUDA device)."""
    return SemSegTrainLoader(dataset, mapper=mapper, total_batch_size=total_batch_size, num_workers=num_workers,
                             aspect_ratio_grouping=aspect_ratio_grouping, shuffle=shuffle, seed=seed,
                             on_unreadable=on_unreadable, skipped_files=skipped_files, collate_fn=collate_fn,
                             pin_memory=pin_memory)


def check_eval_datasets(names: Sequence[str], key: str = "DATASETS.TEST") -> None:
    """Load every evaluation set now (its load-time check included) and refuse one holding a
    file that cannot be decoded: such a problem then stops the run when it starts, not
    after training. Evaluation never skips an image."""
    for name in names:
        flagged = unreadable_records(DatasetCatalog.get(name))
        if flagged:
            shown = "; ".join(f"{d['unreadable']['file']!r} ({d['unreadable']['error']})" for d in flagged[:5])
            raise UnreadableFileError(
                f"{key}: dataset '{name}' has {len(flagged)} images with a file that cannot be decoded: {shown}"
                f"{' ...' if len(flagged) > 5 else ''}. Evaluation never skips images (its metrics would be of "
                "another set): replace or remove these files."
            )
