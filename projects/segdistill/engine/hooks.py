"""Training hooks of the project."""
from __future__ import annotations

import logging
import os

from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["TrainingCurvesHook", "TrainingProgressHook", "unwrap_model"]


def unwrap_model(model):
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


class TrainingProgressHook(HookBase):
    """Tell the model where training stands, before every step.

    Models whose losses follow a schedule (a temperature, a ramped weight, a warm-up) define
    ``set_training_progress(iteration, max_iter)``; this hook calls it with the iteration
    about to run, so the schedules are a pure function of the iteration and a resumed run
    continues them exactly. Models without the method are left alone.
    """

    def before_step(self):
        model = unwrap_model(self.trainer.model)
        fn = getattr(model, "set_training_progress", None)
        if fn is not None:
            fn(self.trainer.iter, self.trainer.max_iter)


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
        from ..utils.plots import plot_training_curves

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
