"""Test-time protocols (segdistill.modeling.test_time): slide windows and multi-scale + flip,
against mmsegmentation 1.2.2's own ``slide_inference`` and ``SegTTAModel`` (tests/mmseg_oracle.py)
on the converter's oracle models, and how the trainer, the lazy loop and the anytime model use them.

Tolerance: relative to the largest logit (slide), absolute on probabilities (aug: at most 1).
Crop sizes are multiples of 8 and image sizes are not: every window of an image larger than
the crop is a full crop, which the d8 models compute as mmsegmentation does today. The one
case marked ODD asks for a window narrower than the crop (60 px wide): it equals
mmsegmentation because the oracle models resize their logits to the input tensor's size at
any size (``MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE "input"``, mmsegmentation's rule).
"""
from __future__ import annotations

import pytest
import torch
from mmengine import ConfigDict

from conftest import tiny_cfg
from detectron2.modeling import build_model
from mmseg_oracle import build_mmseg
from segdistill.config import ConfigError
from segdistill.convert import load_model_weights
from segdistill.modeling.test_time import TestTimeSegmentor, build_test_time_model, slide_windows
from test_convert_mmseg import CASES, our_model
from test_mmseg_input_sizes import _any_size

REL_TOL = 1e-4


def _pair(case, tmp_path):
    mm_cfg, keys, kwargs, _ = CASES[case]
    mm = build_mmseg(mm_cfg)
    path = tmp_path / f"{case}.pth"
    torch.save({"state_dict": mm.state_dict()}, path)
    # logits resized to the input size, as mmsegmentation (the rule its files need)
    ours = _any_size(our_model(dict(keys, **{"MODEL.SEM_SEG_HEAD.OUTPUT_RESIZE": "input"}), kwargs))
    load_model_weights(ours, str(path))
    return mm, ours


def _ours(wrapper, x):
    with torch.no_grad():
        return wrapper([{"image": x[0], "height": x.shape[-2], "width": x.shape[-1]}])[0]["sem_seg"]


def _rel(got, expected):
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("case,size,crop,stride", [
    ("deeplabv3_r18_d8", (100, 132), (64, 64), (40, 48)),
    ("pspnet_r50_d8", (90, 122), (64, 80), (32, 40)),
    ("deeplabv3_r18_d8", (64, 101), (64, 64), (64, 64)),  # windows that only touch (stride = crop)
    ("deeplabv3_r18_d8", (100, 60), (64, 64), (40, 48)),  # ODD: a 64x60 window (narrower than the crop)
])
def test_slide_equals_mmseg_slide_inference(case, size, crop, stride, tmp_path):
    mm, ours = _pair(case, tmp_path)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2))
    mm.test_cfg = ConfigDict(mode="slide", crop_size=crop, stride=stride)
    with torch.no_grad():
        expected = mm.slide_inference(x, [dict(img_shape=size, ori_shape=size)])[0]
    got = _ours(TestTimeSegmentor(model=ours, mode="slide", crop_size=crop, stride=stride), x)
    assert got.shape == expected.shape
    assert _rel(got, expected) < REL_TOL, _rel(got, expected)
    whole = _ours(ours, x)  # the windows change the answer: the comparison is not the whole image's
    assert _rel(whole, expected) > 1e-3


def _mmseg_tta(mm, x, scales, flip):
    """mmsegmentation's TTA: each view (the image rescaled, maybe flipped, as its TTA pipeline
    makes it) through ``predict`` (flip back, resize to ori_shape), merged by SegTTAModel."""
    from mmseg.models.segmentors.seg_tta import SegTTAModel
    from mmseg.structures import SegDataSample

    h, w = x.shape[-2:]
    views = []
    for s in scales:
        size = (int(h * s + 0.5), int(w * s + 0.5))
        img = x if size == (h, w) else torch.nn.functional.interpolate(x, size=size, mode="bilinear",
                                                                          align_corners=False)
        for f in ((False, True) if flip else (False,)):
            sample = SegDataSample(metainfo=dict(img_path="view", ori_shape=(h, w), img_shape=size, pad_shape=size, flip=f,
                                                 flip_direction="horizontal" if f else None))
            with torch.no_grad():
                views.append(mm.predict(img.flip(-1) if f else img, [sample])[0])
    tta = SegTTAModel(module=mm)
    merged = tta.merge_preds([views])[0]
    probs = sum(v.seg_logits.data.softmax(0) for v in views) / len(views)
    assert torch.equal(merged.pred_sem_seg.data[0], probs.argmax(0))  # the average SegTTAModel takes the argmax of
    return probs


@pytest.mark.parametrize("case,size,scales,flip,mode", [
    ("deeplabv3_r18_d8", (64, 96), (0.5, 1.0, 1.5), True, "whole"),
    ("pspnet_r50_d8", (64, 80), (1.0, 1.5), True, "whole"),
    ("deeplabv3_r18_d8", (80, 104), (1.0,), True, "whole"),  # flip only
    ("deeplabv3_r18_d8", (72, 88), (1.0, 1.5), True, "slide"),  # each view in windows
    ("deeplabv3_r18_d8", (67, 93), (0.75, 1.0, 1.25), True, "whole"),  # sizes not multiples of the stride
    ("pspnet_r50_d8", (90, 122), (1.0, 1.5), True, "slide"),
])
def test_aug_equals_mmseg_seg_tta(case, size, scales, flip, mode, tmp_path):
    mm, ours = _pair(case, tmp_path)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3))
    crop, stride = (64, 64), (40, 48)
    mm.test_cfg = ConfigDict(mode=mode, crop_size=crop, stride=stride)
    expected = _mmseg_tta(mm, x, scales, flip)
    wrapper = TestTimeSegmentor(model=ours, mode=mode, crop_size=crop, stride=stride, scales=scales, flip=flip)
    got = _ours(wrapper, x)
    assert torch.allclose(got.softmax(0), got.exp(), atol=1e-6)  # log-probabilities: softmax gives them back
    diff = (got.exp() - expected).abs().max().item()
    assert diff < 1e-4, diff
    # averaging logits instead of probabilities (the other common form) is measurably different
    logit_avg = _ours(TestTimeSegmentor(model=ours, mode=mode, crop_size=crop, stride=stride), x).softmax(0)
    assert (logit_avg - expected).abs().max() > 1e-3


def test_slide_windows_cover_the_image_and_end_at_the_border():
    wins = slide_windows(100, 132, (64, 64), (40, 48))
    assert wins[0] == (0, 64, 0, 64) and wins[-1] == (36, 100, 68, 132)
    assert all(y2 - y1 == 64 and x2 - x1 == 64 for y1, y2, x1, x2 in wins)
    assert slide_windows(50, 60, (64, 64), (40, 48)) == [(0, 50, 0, 60)]


class _Recorder(torch.nn.Module):
    """A segmentor that records the sizes it is asked for and answers constant logits."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.sizes = []
        self.num_classes = num_classes

    def forward(self, batched_inputs):
        out = []
        for x in batched_inputs:
            self.sizes.append(tuple(x["image"].shape[-2:]))
            out.append({"sem_seg": torch.zeros(self.num_classes, x["height"], x["width"])})
        return out


def test_config_keys_and_their_errors():
    cfg = tiny_cfg()
    assert cfg.TEST.MODE == "whole" and not cfg.TEST.AUG.ENABLED
    model = _Recorder()
    assert build_test_time_model(cfg, model) is model
    cfg.TEST.MODE = "slid"
    with pytest.raises(ConfigError, match="TEST.MODE 'slid'.*whole.*slide"):
        build_test_time_model(cfg, model)
    cfg.TEST.MODE, cfg.TEST.SLIDE.CROP_SIZE = "slide", (64,)
    with pytest.raises(ConfigError, match=r"TEST.SLIDE.CROP_SIZE must be two positive integers"):
        build_test_time_model(cfg, model)
    cfg.TEST.SLIDE.CROP_SIZE, cfg.TEST.SLIDE.STRIDE = (32, 32), (16, 24)
    wrapped = build_test_time_model(cfg, model)
    assert isinstance(wrapped, TestTimeSegmentor) and wrapped.views == [(1.0, False)]
    cfg.TEST.AUG.ENABLED, cfg.TEST.AUG.SCALES = True, (0.5, 1.0)
    assert build_test_time_model(cfg, model).views == [(0.5, False), (0.5, True), (1.0, False), (1.0, True)]


def test_trainer_evaluates_through_the_test_time_mode():
    """Trainer.test (periodic evaluation and --eval-only) runs the model in TEST.MODE's windows."""
    from detectron2.evaluation import DatasetEvaluator
    from segdistill.engine import Trainer

    class Count(DatasetEvaluator):
        def reset(self):
            self.n = 0

        def process(self, inputs, outputs):
            assert outputs[0]["sem_seg"].shape[-2:] == (inputs[0]["height"], inputs[0]["width"])
            self.n += 1

        def evaluate(self):
            return {"sem_seg": {"n": self.n}}

    cfg = tiny_cfg(**{"DATASETS.TEST": ("segdistill_demo_mini_val",), "DATALOADER.NUM_WORKERS": 0,
                      "TEST.MODE": "slide", "TEST.SLIDE.CROP_SIZE": (32, 32), "TEST.SLIDE.STRIDE": (24, 24)})
    model = _Recorder()
    Trainer.test(cfg, model, evaluators=[Count()])
    assert model.sizes and set(model.sizes) == {(32, 32)}


def test_lazy_loop_uses_test_time_and_refuses_it_for_anytime():
    from detectron2.config import LazyCall as L
    from omegaconf import OmegaConf
    from segdistill.engine.lazy import check_lazy_config, lazy_test_time_model
    from segdistill.modeling.meta_arch.anytime import AnytimeSegmentor

    cfg = OmegaConf.create({"train": {"device": "cpu", "amp": {"enabled": False}}, "dataloader": {"train": {}, "test": {}},
                            "model": {"_target_": "torch.nn.Identity"}})
    model = _Recorder()
    assert lazy_test_time_model(cfg, model) is model
    cfg.test_time = L(TestTimeSegmentor)(mode="slide", crop_size=(32, 32), stride=(32, 32))
    wrapped = lazy_test_time_model(cfg, model).eval()
    with torch.no_grad():
        wrapped([{"image": torch.zeros(3, 40, 64), "height": 40, "width": 64}])
    assert model.sizes == [(32, 32), (32, 32), (32, 32), (32, 32)]
    check_lazy_config(cfg)
    cfg.model = L(AnytimeSegmentor)()
    with pytest.raises(ConfigError, match="AnytimeSegmentor runs whole images only"):
        check_lazy_config(cfg)


def test_anytime_refuses_other_modes_before_building(monkeypatch):
    from segdistill.modeling.meta_arch import anytime

    def never(*args, **kwargs):
        raise AssertionError("built something")

    monkeypatch.setattr(anytime, "build_backbone", never)
    cfg = tiny_cfg(**{"MODEL.META_ARCHITECTURE": "AnytimeSegmentor", "MODEL.EXITS.MODE": "ds",
                      "MODEL.EXITS.IN_FEATURES": ["res3"], "TEST.AUG.ENABLED": True})
    with pytest.raises(ConfigError, match="AnytimeSegmentor runs whole images only.*TEST.AUG.ENABLED True"):
        build_model(cfg)
    with pytest.raises(ConfigError, match="runs whole images only"):
        TestTimeSegmentor(model=anytime.AnytimeSegmentor.__new__(anytime.AnytimeSegmentor), mode="slide",
                          crop_size=(8, 8), stride=(8, 8))


def test_each_mmseg_recipe_tests_with_its_source_configs_protocol():
    """configs/reproduce: a recipe built from an mmsegmentation config evaluates with that config's
    test_cfg (whole, or slide with its crop and stride); the lazy twins say the same."""
    import os

    import mmseg
    from detectron2.config import LazyConfig
    from mmengine.config import Config
    from mmseg_oracle import import_mmseg
    from test_reproduce import MMSEG_SOURCES, RECIPES, _cfg

    import_mmseg()
    for recipe, source in MMSEG_SOURCES.items():
        cfg = _cfg(os.path.join(RECIPES, recipe))
        if source is None:  # no mmseg config (ISANet-R18): FAKD's single-scale whole-image test
            assert cfg.TEST.MODE == "whole", recipe
            continue
        test_cfg = Config.fromfile(os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs", source)).model.test_cfg
        assert cfg.TEST.MODE == test_cfg.mode and not cfg.TEST.AUG.ENABLED, recipe
        if test_cfg.mode == "slide":
            assert tuple(cfg.TEST.SLIDE.CROP_SIZE) == tuple(test_cfg.crop_size), recipe
            assert tuple(cfg.TEST.SLIDE.STRIDE) == tuple(test_cfg.stride), recipe
        lazy = recipe[:-5] + ".py"
        if os.path.isfile(os.path.join(RECIPES, lazy)):
            lazy_cfg = LazyConfig.load(os.path.join(RECIPES, lazy))
            if test_cfg.mode == "whole":
                assert "test_time" not in lazy_cfg, lazy
            else:
                t = lazy_cfg.test_time
                assert (t.mode, tuple(t.crop_size), tuple(t.stride)) == ("slide", tuple(test_cfg.crop_size),
                                                                       tuple(test_cfg.stride)), lazy
                assert t.align_corners == cfg.MODEL.SEM_SEG_HEAD.ALIGN_CORNERS, lazy
