"""The project's Trainer: detectron2's DefaultTrainer with semantic-segmentation defaults.

Differences from ``DefaultTrainer``, in its overridable ``build_*`` methods and ``test``, and
in the constructor (the reason is written there):

* DDP is built by :meth:`Trainer.build_ddp_model` (:func:`segdistill.engine.ddp.create_ddp_model`),
  which works for CPU models (gloo) and takes ``MODEL.FIND_UNUSED_PARAMETERS`` from the config
  (detectron2 hard-codes it off; multi-exit models need it);
* data: :class:`SemSegDatasetMapper` for training and testing; the training loader is
  :func:`segdistill.data.build_sem_seg_train_loader` (resumable data order, per-sample
  augmentation seeds, ``DATALOADER.ON_UNREADABLE``), and :class:`ExactResumeHook` makes
  ``--resume`` continue exactly; the evaluation sets are loaded (and checked) at the start;
* nothing is written into ``OUTPUT_DIR`` before the model and the data are built
  (:class:`segdistill.engine.run.RunOutput`);
* before every evaluation in several processes, rank 0's BatchNorm statistics are copied to
  every process, so the evaluated model is the saved one;
* evaluation: :class:`SemSegEvaluator` for ``evaluator_type`` ``sem_seg`` and
  ``cityscapes_sem_seg``, with the label spaces of exits that predict their own class
  sets (:func:`segdistill.evaluation.build_label_spaces`);
* :class:`TrainingProgressHook` tells the model the iteration (loss schedules);
* LR: detectron2's DeepLab ``WarmupPolyLR`` when ``SOLVER.LR_SCHEDULER_NAME`` asks for it;
* a missing ``MODEL.WEIGHTS`` file is a clear error before anything is loaded;
* ``SOLVER.AMP.ENABLED``: the project's :class:`~segdistill.engine.mixed_precision.MixedPrecisionTrainer`
  (CPU bf16, CUDA fp16 / bf16 by ``SOLVER.AMP.DTYPE``), resolved before anything is built;
  ``MODEL.CHANNELS_LAST``: the model (training, evaluation) in channels_last; ``TEST.FOLD_BN``:
  evaluation runs a copy of the model with its convolutions' BatchNorms folded;
* ``training_curves.png`` in ``OUTPUT_DIR``.
"""
from __future__ import annotations

import logging
import os
import weakref

import torch

from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.engine import DefaultTrainer, TrainerBase
from detectron2.projects.deeplab import build_lr_scheduler as build_deeplab_lr_scheduler
from detectron2.projects.deeplab.lr_scheduler import WarmupPolyLR
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import amp_dtype
from ..convert import DEFAULT_MIN_MATCHED, SegDistillCheckpointer, load_weights, load_weights_for_evaluation
from ..data import SemSegDatasetMapper, build_sem_seg_train_loader, check_eval_datasets
from ..data.datasets.demo import is_demo_dataset
from ..evaluation import CocoStuffEvaluator, SemSegEvaluator, build_label_spaces
from ..evaluation.anytime import AnytimeEvaluator
from ..modeling.meta_arch.anytime import AnytimeSegmentor, load_anytime_weights
from ..modeling.meta_arch.distill import Distiller
from ..modeling.test_time import build_test_time_model
from .budget import apply_budget
from .ddp import broadcast_batchnorm_buffers, create_ddp_model
from .mixed_precision import build_train_step, fold_for_inference, inference_precision, use_channels_last
from .hooks import TrainingCurvesHook, TrainingProgressHook, exact_resume_hook, unwrap_model
from .run import RunOutput

__all__ = ["Trainer", "anytime_evaluators", "load_evaluation_weights"]

SEM_SEG_EVALUATOR_TYPES = ("sem_seg", "cityscapes_sem_seg")


def anytime_evaluators(model, dataset_names, output_dir: str):
    """One :class:`~segdistill.evaluation.anytime.AnytimeEvaluator` per dataset when ``model``
    is an ``AnytimeSegmentor`` (its outputs carry the answering exit and the path's cost),
    else None (the usual evaluators)."""
    model = unwrap_model(model)
    if not isinstance(model, AnytimeSegmentor):
        return None
    return [AnytimeEvaluator.for_model(model, name, output_dir=os.path.join(output_dir, "inference", name))
            for name in dataset_names]


def warn_random_backbone(datasets, why: str) -> bool:
    """A WARNING (True) when a model for real data starts training from a randomly initialised
    backbone: the papers all start from ImageNet, and a silent random start costs many points.
    The demo's datasets are exempt (its trainings start from scratch on purpose)."""
    real = [d for d in datasets if not is_demo_dataset(d)]
    if not real:
        return False
    logging.getLogger(__name__).warning(
        "Training on %s with a RANDOMLY initialised backbone (%s). The papers start from ImageNet weights: set "
        "MODEL.TIMM.PRETRAINED default (timm's weights, or a model.tag) or MODEL.TIMM.CHECKPOINT to a file or URL "
        "(docs/reproduce.md lists the publishers' files); in a lazy config, the backbone's pretrained / checkpoint.",
        ", ".join(real), why)
    return True


def load_evaluation_weights(model, path: str, *, key: str = "MODEL.WEIGHTS", allow_random: bool = False,
                            allow_key: str = "TEST.ALLOW_RANDOM_WEIGHTS", min_matched: float = DEFAULT_MIN_MATCHED,
                            weights_format: str = "auto") -> None:
    """The weights of a model about to be evaluated (``--eval-only``, YAML and lazy configs):
    :func:`segdistill.convert.load_weights_for_evaluation` (no weights, or too little of the
    model matched, is an error). An ``AnytimeSegmentor`` needs every tensor from the file
    (:func:`load_anytime_weights`, ``min_matched`` ignored): its exits are a small share of the
    model, so a plain deployed checkpoint without them would pass the share and run them at random."""
    if path and isinstance(unwrap_model(model), AnytimeSegmentor):
        load_anytime_weights(unwrap_model(model), path, key=key, weights_format=weights_format)
        return
    load_weights_for_evaluation(model, path, key=key, allow_random=allow_random, allow_key=allow_key,
                                min_matched=min_matched, weights_format=weights_format)


class Trainer(DefaultTrainer):
    """DefaultTrainer for the project's segmentors (see the module docstring).

    ``output``: the run's :class:`RunOutput` (``train_net.py`` makes it from ``--resume`` /
    ``--overwrite-output``). Without one (``Trainer(cfg)``, as detectron2 projects do), the
    config is written by ``resume_or_load(resume)``: ``resume=True`` replaces the folder's
    config, ``resume=False`` refuses a folder holding checkpoints of another config.
    """

    def __init__(self, cfg, *, output: RunOutput = None):
        # The one method of DefaultTrainer replaced rather than extended. DefaultTrainer.__init__
        # wraps the model, in several processes, with detectron2's create_ddp_model(model,
        # broadcast_buffers=False): DistributedDataParallel with device_ids=[local rank], which DDP
        # refuses for a CPU model (gloo runs), and find_unused_parameters off, so a model that leaves
        # parameters out of a step (exits, loss parts) fails its next step. That call reads neither
        # the config nor an overridable method: no subclass can change it. This constructor builds
        # what DefaultTrainer's other methods (run_step, state_dict, train, build_hooks, test) use, with
        # the same build_* methods in the same order: model, optimizer and data loader held by its
        # SimpleTrainer / MixedPrecisionTrainer (``_trainer``, the name those methods read), scheduler,
        # checkpointer, start_iter, max_iter, cfg. tests/test_train_net.py checks in one process, where
        # DefaultTrainer.__init__ works, that both constructors leave the same attributes, so a
        # detectron2 release that changes them fails there rather than at training time.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        self.output = output if output is not None else RunOutput(cfg, mode=None)
        self.output.check()
        # an unsupported precision (fp16 on CPU, an unknown dtype) fails before anything is built or written
        step_dtype = amp_dtype(cfg.SOLVER.AMP.ENABLED, cfg.SOLVER.AMP.DTYPE, cfg.MODEL.DEVICE)
        inference_precision(cfg.TEST.PRECISION, cfg.MODEL.DEVICE)
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        if cfg.INPUT.CROP.ENABLED:
            # every training batch has the crop's size, so cuDNN's per-shape algorithm search pays
            # once (a no-op on CPU)
            torch.backends.cudnn.benchmark = True
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        # SOLVER.BUDGET (engine/budget.py): the iteration count and stretched schedule follow from
        # the budget and this model's counted step cost, before the scheduler and hooks read them
        cfg, _ = apply_budget(cfg, model)  # its record is OUTPUT_DIR/budget.json
        check_eval_datasets(cfg.DATASETS.TEST)
        model = self.build_ddp_model(cfg, model)
        self._trainer = build_train_step(model, data_loader, optimizer, dtype=step_dtype)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SegDistillCheckpointer(  # converts foreign MODEL.WEIGHTS (segdistill.convert)
            model, cfg.OUTPUT_DIR, weights_format=cfg.MODEL.WEIGHTS_FORMAT, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.output.open()  # the first write into OUTPUT_DIR: model and data are built
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_evaluation_model(cls, cfg, weights: str):
        """The model ``--eval-only`` evaluates: built from ``cfg`` and loaded from ``weights``
        (:func:`load_evaluation_weights`: refused when empty or not fitting, unless
        ``TEST.ALLOW_RANDOM_WEIGHTS``); ``TEST.PRECISION`` is checked first. With weights, the backbone's
        ImageNet initialisation (``MODEL.TIMM.CHECKPOINT``, ``MODEL.TIMM.PRETRAINED``) is skipped: the weights
        file gives the model, as in detectron2, and nothing is downloaded for it."""
        inference_precision(cfg.TEST.PRECISION, cfg.MODEL.DEVICE)  # fp16 on CPU: an error before the build
        start = [v for v in (cfg.MODEL.TIMM.CHECKPOINT, cfg.MODEL.TIMM.PRETRAINED) if v]
        if weights and start:
            logging.getLogger(__name__).info(
                "Evaluating %s: the backbone's ImageNet initialisation (%s) is skipped.", weights, ", ".join(start))
            cfg = cfg.clone()
            cfg.defrost()
            cfg.MODEL.TIMM.CHECKPOINT = ""
            cfg.MODEL.TIMM.PRETRAINED = ""
            cfg.freeze()
        model = cls.build_model(cfg)
        load_evaluation_weights(model, weights, allow_random=cfg.TEST.ALLOW_RANDOM_WEIGHTS,
                                min_matched=cfg.TEST.MIN_MATCHED_WEIGHTS, weights_format=cfg.MODEL.WEIGHTS_FORMAT)
        return model

    @classmethod
    def build_model(cls, cfg):
        """detectron2's model, in channels_last when ``MODEL.CHANNELS_LAST`` (training and evaluation)."""
        return use_channels_last(super().build_model(cfg), cfg.MODEL.CHANNELS_LAST)

    @classmethod
    def build_ddp_model(cls, cfg, model):
        """``model`` for several processes (itself in one): :func:`segdistill.engine.ddp.create_ddp_model`,
        i.e. DistributedDataParallel without ``device_ids`` for a CPU model, and with
        ``MODEL.FIND_UNUSED_PARAMETERS``."""
        return create_ddp_model(model, broadcast_buffers=False, find_unused_parameters=cfg.MODEL.FIND_UNUSED_PARAMETERS)

    def resume_or_load(self, resume: bool = True):
        self.output.write_config("resume" if resume else "train")
        if resume and self.checkpointer.has_checkpoint():
            super().resume_or_load(resume=True)
        else:
            self.start_iter = 0
            if self.cfg.MODEL.WEIGHTS:
                report = load_weights(self.model, self.cfg.MODEL.WEIGHTS, weights_format=self.cfg.MODEL.WEIGHTS_FORMAT)
                if report.matched < self.cfg.TEST.MIN_MATCHED_WEIGHTS:
                    logging.getLogger(__name__).warning(
                        "MODEL.WEIGHTS: %s. Training starts with the rest of the model at its initialisation; "
                        "an evaluation of such a load would be refused (TEST.MIN_MATCHED_WEIGHTS %.2f).",
                        report.summary(), self.cfg.TEST.MIN_MATCHED_WEIGHTS)
            else:
                logging.getLogger(__name__).info("MODEL.WEIGHTS is empty: training from the model's initialisation.")
                t = self.cfg.MODEL.TIMM
                if self.cfg.MODEL.BACKBONE.NAME == "build_timm_backbone" and not (t.CHECKPOINT or t.PRETRAINED):
                    warn_random_backbone(self.cfg.DATASETS.TRAIN,
                                         "MODEL.WEIGHTS, MODEL.TIMM.CHECKPOINT and MODEL.TIMM.PRETRAINED are empty")
        # A checkpoint restores the poly schedule's own length; a resumed run whose config asks
        # for a different SOLVER.MAX_ITER follows the config (the schedule would otherwise fail
        # once past its old end).
        if isinstance(self.scheduler, WarmupPolyLR) and self.scheduler.max_iters != self.max_iter:
            logging.getLogger(__name__).warning(
                "Resumed schedule had max_iter=%d; continuing with SOLVER.MAX_ITER=%d.", self.scheduler.max_iters,
                self.max_iter)
            self.scheduler.max_iters = self.max_iter

    def build_hooks(self):
        hooks = super().build_hooks()
        # after the IterationTimer, before the LR scheduler: the step's seeds, then the model's schedules
        hooks[1:1] = [exact_resume_hook(self.data_loader, "build_train_loader"), TrainingProgressHook()]
        hooks.append(TrainingCurvesHook(self.cfg.OUTPUT_DIR, period=self.cfg.TEST.EVAL_PERIOD))
        return hooks

    @classmethod
    def build_train_loader(cls, cfg):
        return build_sem_seg_train_loader(cfg, mapper=SemSegDatasetMapper(cfg, True))

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """detectron2's ``test``, after copying rank 0's BatchNorm statistics to every process
        (several processes with plain BN: the evaluated model is then the saved model). An
        ``AnytimeSegmentor`` is scored by :class:`AnytimeEvaluator` (mIoU, MACs, time, exits).
        ``TEST.MODE slide`` and ``TEST.AUG.ENABLED`` run the model through
        :class:`~segdistill.modeling.test_time.TestTimeSegmentor` (periodic and ``--eval-only``).
        A distiller's frozen teacher (``MODEL.DISTILL.EVAL_TEACHER``) is scored at the first
        evaluation of each dataset only; later ones report that score (:class:`SemSegEvaluator`). The model runs in ``TEST.PRECISION``;
        with ``TEST.FOLD_BN`` a copy of it with its convolutions' BatchNorms folded is evaluated (the
        training model keeps its norms)."""
        broadcast_batchnorm_buffers(model)
        if cfg.TEST.FOLD_BN:
            model = fold_for_inference(unwrap_model(model), True, copy_model=True)
        if evaluators is None:
            evaluators = anytime_evaluators(model, cfg.DATASETS.TEST, cfg.OUTPUT_DIR)
        distiller = unwrap_model(model)
        if evaluators is None and isinstance(distiller, Distiller) and distiller.eval_teacher:
            # the frozen teacher is scored once per run and dataset (SemSegEvaluator's cache)
            evaluators = [cls.build_evaluator(cfg, name, teacher=distiller) for name in cfg.DATASETS.TEST]
        with inference_precision(cfg.TEST.PRECISION, cfg.MODEL.DEVICE):
            return super().test(cfg, build_test_time_model(cfg, model), evaluators)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=SemSegDatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None, teacher=None):
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        # sem_seg / cityscapes_sem_seg: SemSegEvaluator; coco_stuff_sem_seg: + things/stuff and hierarchy breakdown
        evaluators = {t: SemSegEvaluator for t in SEM_SEG_EVALUATOR_TYPES}
        evaluators["coco_stuff_sem_seg"] = CocoStuffEvaluator
        if evaluator_type not in evaluators:
            raise NotImplementedError(
                f"No evaluator for dataset '{dataset_name}' of evaluator_type {evaluator_type!r}; "
                f"this trainer handles {tuple(evaluators)}."
            )
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return evaluators[evaluator_type](
            dataset_name, distributed=True, output_dir=output_folder, label_spaces=build_label_spaces(cfg, dataset_name),
            teacher=teacher,
        )

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_deeplab_lr_scheduler(cfg, optimizer)
