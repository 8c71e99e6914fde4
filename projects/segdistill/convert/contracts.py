"""What reading, converting and deploying checkpoints need of a model, written down.

``segdistill.convert`` sits below ``segdistill.modeling`` (docs/architecture.md, "Layers"):
it never imports a model class. The models implement these contracts instead, and the
converters ask ``isinstance`` of the contract:

* :class:`SegmentorWrapper`: a model whose checkpoints of a segmentor are those of a segmentor
  it wraps, under a prefix (the ``Distiller``: its student, ``student.``);
* :class:`ConvertibleBackbone`: a backbone whose weights are those of one timm network
  (``body``, whose ImageNet checkpoints the key maps convert) of a known ``family``
  (:func:`backbone_family`), and its HRNet fusion mode; ``TimmBackbone`` and ``HRNetBackbone``;
* :class:`ConvertibleHead`: a head the whole-model key maps know; the map is chosen by the
  name of the class it is registered under in detectron2's ``SEM_SEG_HEADS_REGISTRY``
  (:func:`head_key_map`); ``SegHeadMixin``, so every segdistill head;
* :class:`DeployableModel`: a model with training-only parts, which writes the weights of
  its plain deployed model (``MultiExitSegmentor``, ``Distiller``).
"""
from __future__ import annotations

import abc
from typing import Callable, Dict, Optional, Tuple, TypeVar

import torch
from torch import nn

__all__ = ["SegmentorWrapper", "ConvertibleBackbone", "ConvertibleHead", "DeployableModel", "backbone_family",
           "head_key_map"]

T = TypeVar("T")


class SegmentorWrapper(abc.ABC):
    """A model that holds the segmentor a whole-model checkpoint is for, under a prefix of its
    own ``state_dict``: foreign files (``MODEL.WEIGHTS``) load into that segmentor."""

    @abc.abstractmethod
    def wrapped_segmentor(self) -> Tuple[nn.Module, str]:
        """(the wrapped segmentor, the prefix of its keys in this model's ``state_dict``)."""


class ConvertibleBackbone:
    """A backbone whose parameters are those of one timm network.

    Implementations set, in ``__init__``:

    * ``body``: the timm network (its ``state_dict`` is what ImageNet checkpoints hold, with
      their own names, which the key maps rename);
    * ``family``: ``backbone_family(body)`` (which key map applies);
    * ``fuse_upsample``: how an HRNet upsamples branches when it fuses them ("nearest" or
      "bilinear", ``MODEL.TIMM.HRNET_FUSE_UPSAMPLE``); "" for a backbone without fusion.
      Shape-free: the file's source pins it (:mod:`.source_options`).

    (Declared as annotations only: a class attribute would shadow the submodule ``body``
    that ``nn.Module`` keeps in ``_modules``.)
    """

    body: nn.Module
    family: str
    fuse_upsample: str


class ConvertibleHead:
    """A segmentation head the whole-model key maps know (mmsegmentation, CIRKD).

    The key map of a head is chosen by the name of its class as registered in detectron2's
    ``SEM_SEG_HEADS_REGISTRY`` (the closest class of its MRO that has a map, so a subclass
    keeps its base's map). Implementations set:

    * ``layout``: the code base whose structure the head reproduces where layouts differ
      (``MODEL.SEM_SEG_HEAD.LAYOUT``; "" for heads with one structure);
    * ``aux_head``: ``None`` or the auxiliary FCN head (training only), whose ``in_feature``
      names the stage it reads; its ``conv`` and ``predictor`` take the file's auxiliary head;
    * ``align_corners``: of every bilinear resize of the head and of its output
      (``MODEL.SEM_SEG_HEAD.ALIGN_CORNERS``). Shape-free: the file's source pins it
      (:mod:`.source_options`);
    * ``output_resize``: how inference brings the logits to the input, "stride" (upsample by
      the head's stride, then crop) or "input" (resize to the input size)
      (``MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE``). Shape-free: the file's source pins it
      (:mod:`.source_options`).
    """

    layout: str
    aux_head: Optional[nn.Module]
    align_corners: bool
    output_resize: str


class DeployableModel(abc.ABC):
    """A model with training-only parts (exits, a teacher, loss state): its deployed
    checkpoint holds :meth:`deploy_state_dict`, which loads with no missing or unexpected key
    into the plain model its deployed config builds. Other models deploy their whole
    ``state_dict()``."""

    @abc.abstractmethod
    def deploy_state_dict(self) -> Dict[str, torch.Tensor]:
        """The weights of the plain deployed model (that model's own keys)."""


def backbone_family(body: nn.Module) -> str:
    """"resnet", "mobilenetv2", "hrnet" or "other": the family of a timm body (which key map applies)."""
    from timm.models.efficientnet import EfficientNetFeatures
    from timm.models.hrnet import HighResolutionNet
    from timm.models.resnet import BasicBlock, Bottleneck

    if isinstance(body, HighResolutionNet):
        return "hrnet"
    if isinstance(body, EfficientNetFeatures):
        return "mobilenetv2"
    if any(isinstance(m, (BasicBlock, Bottleneck)) for m in body.modules()):
        return "resnet"
    return "other"


def head_key_map(head: nn.Module, maps: Dict[str, Callable[..., T]], source: str) -> Callable[..., T]:
    """The entry of ``maps`` (registered head class name -> key map) for ``head``: that of the
    closest class in its MRO with an entry; ValueError naming ``source`` and the heads that
    have one otherwise."""
    if isinstance(head, ConvertibleHead):
        for cls in type(head).__mro__:
            if cls.__name__ in maps:
                return maps[cls.__name__]
    raise ValueError(f"No {source} key map for the head {type(head).__name__} ({', '.join(sorted(maps))} have one).")
