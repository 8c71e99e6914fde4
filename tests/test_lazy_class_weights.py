"""Class weights computed from the training labels for lazy configs: a head's ``class_weights``
names the weighting (``median_frequency``, ``enet``) and the lazy loop passes the weights the
YAML path computes (``MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING``), checked against a hand computation."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from conftest import LAZY_TINY, REPO
from detectron2.config import LazyConfig, instantiate
from segdistill.config import ConfigError
from segdistill.engine.lazy import resolve_class_weighting

LAZY = os.path.join(REPO, "configs/demo/deeplabv3_r18.py")
# Two 4x4 label images (classes 0..2 of the demo's label space, 255 ignored)
LABELS = [
    np.array([[0, 0, 0, 0], [0, 0, 1, 1], [255, 255, 0, 0], [0, 0, 0, 0]]),
    np.array([[2, 2, 2, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 255, 0, 0]]),
]


def _hand(method: str, num_classes: int):
    """The formulas by hand: image 1 has 12 x 0, 2 x 1 (14 labelled pixels); image 2 has
    11 x 0, 1 x 1, 3 x 2 (15 labelled pixels)."""
    n = {0: 23, 1: 3, 2: 3}
    images = {0: 14 + 15, 1: 14 + 15, 2: 15}  # labelled pixels of the images where the class occurs
    if method == "median_frequency":
        f = {c: n[c] / images[c] for c in n}
        med = sorted(f.values())[1]
        return [med / f[c] if c in f else 0.0 for c in range(num_classes)]
    total = sum(n.values())
    return [1.0 / math.log(1.02 + n.get(c, 0) / total) for c in range(num_classes)]


@pytest.fixture
def own_dataset(write_label_dataset, monkeypatch, tmp_path):
    monkeypatch.setenv("SEGDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    return write_label_dataset(f"lazy_weights_{tmp_path.name}", [lb.astype(np.uint8) for lb in LABELS], 3)


@pytest.mark.parametrize("method", ["median_frequency", "enet"])
def test_lazy_class_weighting_equals_the_hand_computation(own_dataset, method):
    cfg = LazyConfig.load(LAZY)
    cfg.dataloader.train.dataset.names = own_dataset
    cfg.model.sem_seg_head.class_weights = method
    assert resolve_class_weighting(cfg) == ["model.sem_seg_head.class_weights"]
    head = instantiate(cfg.model.sem_seg_head)
    expected = _hand(method, int(cfg.model.sem_seg_head.num_classes))
    assert torch.allclose(head.class_weights, torch.tensor(expected, dtype=head.class_weights.dtype), atol=1e-6)
    # the YAML path's weights for the same data: the same numbers
    from segdistill.data import dataset_class_weights

    assert np.allclose(dataset_class_weights([own_dataset], method, len(expected), 255), expected)


def test_lazy_class_weighting_names_and_evaluation(own_dataset):
    cfg = LazyConfig.load(LAZY)
    cfg.dataloader.train.dataset.names = own_dataset
    cfg.model.sem_seg_head.class_weights = "median_frequency"
    resolve_class_weighting(cfg, training=False)  # evaluation: the loss is not computed
    assert cfg.model.sem_seg_head.class_weights is None
    cfg.model.sem_seg_head.class_weights = "nope"
    with pytest.raises(ConfigError, match=r"model\.sem_seg_head\.class_weights='nope'.*median_frequency"):
        resolve_class_weighting(cfg)


def test_lazy_training_uses_the_computed_weights(own_dataset, tmp_path, monkeypatch):
    """lazy_train builds the model with the weights (not the name, which the head cannot take)."""
    import train_net
    from segdistill.modeling.heads import base

    seen = []
    original = base.SegHeadMixin._init_contract

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("class_weights"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(base.SegHeadMixin, "_init_contract", spy)
    overrides = [o for o in LAZY_TINY if not o.startswith("dataloader.train.dataset.names")]
    argv = ["--config-file", LAZY, *overrides, f"dataloader.train.dataset.names={own_dataset}",
            "model.sem_seg_head.class_weights=enet", "train.max_iter=1", f"train.output_dir={tmp_path / 'run'}"]
    train_net.main(train_net.argument_parser().parse_args(argv))
    assert seen and np.allclose(seen[0], _hand("enet", len(seen[0])))
