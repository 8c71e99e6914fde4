"""Training hooks of the project."""
from __future__ import annotations

import logging
import os
import random
from typing import Optional, Protocol, runtime_checkable

import numpy as np
import torch

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.build import SemSegTrainLoader, step_seed
from ..utils.plots import plot_training_curves
from .ddp import unwrap_model

__all__ = ["ExactResumeHook", "TrainingCurvesHook", "TrainingProgressHook", "FollowsTrainingProgress",
           "exact_resume_hook", "unwrap_model"]


@runtime_checkable
class FollowsTrainingProgress(Protocol):
    """The contract of a model whose losses follow a schedule (a temperature, a ramped weight,
    a warm-up): :class:`TrainingProgressHook` calls ``set_training_progress`` before every step
    with the iteration about to run and the run's last iteration. The project's
    ``MultiExitSegmentor`` and ``Distiller`` implement it (and pass it on to their exit
    objective and losses)."""

    def set_training_progress(self, iteration: int, max_iter: int) -> None: ...


class TrainingProgressHook(HookBase):
    """Tell the model where training stands, before every step.

    The schedules of a :class:`FollowsTrainingProgress` model are then a pure function of the
    iteration, so a resumed run continues them exactly. Other models are left alone.
    """

    def before_step(self):
        model = unwrap_model(self.trainer.model)
        if isinstance(model, FollowsTrainingProgress):
            model.set_training_progress(self.trainer.iter, self.trainer.max_iter)


class TrainingCurvesHook(HookBase):
    """Plot the losses, learning rate and eval metrics of ``metrics.json`` to
    ``training_curves.png`` in the output folder, at the end of training (and every
    ``period`` iterations, so an interrupted run still has its picture)."""

    def __init__(self, output_dir: str, period: int = 0):
        self._output_dir = output_dir
        self._period = period

    def _plot(self):
        if not comm.is_main_process():
            return
        metrics = os.path.join(self._output_dir, "metrics.json")
        try:
            plot_training_curves(metrics, os.path.join(self._output_dir, "training_curves.png"))
        except Exception as e:  # a failed plot must never stop training
            logging.getLogger(__name__).warning("Could not plot training curves from %s: %s", metrics, e)

    def after_step(self):
        it = self.trainer.iter + 1
        if self._period and it % self._period == 0 and it != self.trainer.max_iter:
            self._plot()

    def after_train(self):
        self._plot()


class ExactResumeHook(HookBase):
    """Make a resumed run continue exactly where the interrupted one stopped.

    * Its state (saved in every checkpoint with the trainer's, under ``hooks``) is the
      training loader's seed; loading a checkpoint restores it, so the data order and every
      sample's augmentation continue even when ``SEED`` is -1 (a random seed).
    * Before training it tells the loader the first iteration, so the sampler skips the
      samples the interrupted run consumed.
    * Before every step it seeds Python's, numpy's and torch's (CPU and CUDA) generators
      from ``(seed, iteration, process rank)``: dropout and any other randomness of a step
      is a function of the iteration, not of what ran before it in this process.

    What stays inexact: CUDA kernels that are not deterministic (atomic adds; set
    ``torch.use_deterministic_algorithms`` for those), a change of the number of processes or of
    the batch size between the runs, and aspect-ratio grouping (its buckets are lost).
    """

    def __init__(self, loader: SemSegTrainLoader):
        self._loader = loader
        self._restored = False

    def state_dict(self):
        return self._loader.state_dict()

    def load_state_dict(self, state):
        self._loader.load_state_dict(state)
        self._restored = True

    def before_train(self):
        start = self.trainer.start_iter
        if start > 0 and not self._restored:
            logging.getLogger(__name__).warning(
                "The checkpoint holds no data-stream state (an older checkpoint): the data order continues from "
                "iteration %d with seed %d, which is not the interrupted run's unless SEED was set.", start,
                self._loader.seed)
        self._loader.set_start_iter(start)
        if start > 0:
            logging.getLogger(__name__).info(
                "Data stream: seed %d, continuing after %d samples (iteration %d).", self._loader.seed,
                start * self._loader.total_batch_size, start)

    def before_step(self):
        seed = step_seed(self._loader.seed, self.trainer.iter, comm.get_rank())
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


def exact_resume_hook(loader, source: str) -> Optional[ExactResumeHook]:
    """The :class:`ExactResumeHook` of a training loader made by
    :func:`segdistill.data.build_sem_seg_train_loader`; for any other loader None, with a
    warning that ``--resume`` restarts its data order (``source`` names where the loader
    came from, e.g. ``build_train_loader``)."""
    if isinstance(loader, SemSegTrainLoader):
        return ExactResumeHook(loader)
    logging.getLogger(__name__).warning(
        "%s returned a %s, not segdistill.data.build_sem_seg_train_loader's loader: --resume restarts its data "
        "order.", source, type(loader).__name__)
    return None
