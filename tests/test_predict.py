"""tools/predict.py: images (files, folders, globs) and a video through a tiny model, every
checkpoint kind the project writes, label files in the dataset's own ids."""
from __future__ import annotations

import logging
import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import LAZY_TINY, REPO, YAML_TINY, load_script
from detectron2.config import instantiate
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from mmseg_oracle import randomize
from segdistill.config import load_lazy_config, load_yaml_config
from segdistill.convert import WeightsMismatchError
from segdistill.modeling import test_time
from segdistill.utils.predictions import submission_ids

predict = load_script("predict_tool", "tools/predict.py")

TINY = YAML_TINY + ["MODEL.DEVICE", "cpu"]
SIZES = [(37, 53), (48, 30)]  # odd sizes: the model pads and crops


def _cfg(config, opts=()):
    return load_yaml_config(os.path.join(REPO, config), TINY + list(opts))


def _checkpoint(model, path):
    """A model with random convolutions and BatchNorm statistics (a varied argmax), saved as train_net does."""
    randomize(model, 0)
    torch.save({"model": model.state_dict(), "iteration": 3}, path)
    return str(path)


@pytest.fixture
def log():
    """The tool's log lines (its logger does not propagate once detectron2's setup_logger ran)."""
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("segdistill.predict")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def _images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for i, (h, w) in enumerate(SIZES):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img[: h // 2] = (40, 120, 200)  # a flat region: more than one class answered
        f = folder / f"img{i}.png"
        Image.fromarray(img).save(f)
        files.append(f)
    return files


def _argmax(model, file):
    img = np.asarray(Image.open(file).convert("RGB"))
    with torch.no_grad():
        out = model.eval()([{"image": torch.as_tensor(img.transpose(2, 0, 1).copy()), "height": img.shape[0],
                              "width": img.shape[1]}])[0]
    return out["sem_seg"].argmax(0).numpy()


def _labels(out, file):
    return np.asarray(Image.open(out / "labels" / f"{file.stem}.png"))


def test_images_folder_glob_and_file_write_overlays_labels_confidence(tmp_path, log):
    cfg = _cfg("configs/demo/deeplabv3_r18.yaml")
    model = build_model(cfg)
    weights = _checkpoint(model, tmp_path / "model.pth")
    files = _images(tmp_path / "in")
    out = tmp_path / "out"
    predict.main(["--config-file", os.path.join(REPO, "configs/demo/deeplabv3_r18.yaml"), "--input",
                  str(tmp_path / "in"), "--output", str(out), "--confidence", *TINY, "MODEL.WEIGHTS", weights])
    assert any("2 images in" in line and "images/s" in line for line in log)
    for f, (h, w) in zip(files, SIZES):
        expected = _argmax(model, f)
        assert len(np.unique(expected)) > 1
        np.testing.assert_array_equal(_labels(out, f), expected)  # demo ids are the class indices
        overlay = np.asarray(Image.open(out / "overlay" / f"{f.stem}.png"))
        assert overlay.shape[1] == w and overlay.shape[0] > h  # the image, then its legend
        conf = np.asarray(Image.open(out / "confidence" / f"{f.stem}.png"))
        assert conf.shape == (h, w) and conf.min() >= 255 // 10  # at least 1 / (10 classes)
    # one file by a glob, the overlay written where --output says
    single = tmp_path / "one.png"
    predict.main(["--config-file", os.path.join(REPO, "configs/demo/deeplabv3_r18.yaml"), "--input",
                  str(tmp_path / "in" / "img1.p*"), "--output", str(single), *TINY, "MODEL.WEIGHTS", weights])
    assert single.is_file()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "one_labels.png")), _argmax(model, files[1]))
    with pytest.raises(FileNotFoundError, match="no image file there"):
        predict.expand_inputs([str(tmp_path / "nothing*.png")])


def test_cityscapes_labels_are_raw_label_ids(tmp_path):
    opts = ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "19"]
    cfg = _cfg("configs/demo/deeplabv3_r18.yaml", opts)
    model = build_model(cfg)
    weights = _checkpoint(model, tmp_path / "model.pth")
    files = _images(tmp_path / "in")
    out = tmp_path / "out"
    predict.main(["--config-file", os.path.join(REPO, "configs/demo/deeplabv3_r18.yaml"), "--input", *map(str, files),
                  "--output", str(out), "--dataset", "cityscapes_fine_sem_seg_val", *TINY, *opts,
                  "MODEL.WEIGHTS", weights])
    from cityscapesscripts.helpers.labels import trainId2label

    for f in files:
        expected = np.vectorize(lambda t: trainId2label[int(t)].id)(_argmax(model, f))
        np.testing.assert_array_equal(_labels(out, f), expected)
        assert _labels(out, f).min() >= 7  # road (train id 0) is label id 7


def test_coco_stuff_ids_are_the_inverse_of_the_contiguous_map():
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get("coco_2017_train_stuff_sem_seg")
    lut = submission_ids(meta)
    for raw, c in meta.stuff_dataset_id_to_contiguous_id.items():
        assert lut[c] == raw


def test_video_has_the_input_frame_count(tmp_path):
    cfg = _cfg("configs/demo/deeplabv3_r18.yaml")
    weights = _checkpoint(build_model(cfg), tmp_path / "model.pth")
    video = tmp_path / "clip.mp4"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5, (42, 34))
    for i in range(5):
        w.write(np.full((34, 42, 3), 30 * i, np.uint8))
    w.release()
    written = predict.main(["--config-file", os.path.join(REPO, "configs/demo/deeplabv3_r18.yaml"), "--video-input",
                            str(video), "--output", str(tmp_path / "out"), *TINY, "MODEL.WEIGHTS", weights])
    cap = cv2.VideoCapture(written)
    frames = 0
    while cap.read()[0]:
        frames += 1
    assert written.endswith("clip.mp4") and frames == 5


@pytest.mark.parametrize("kind", ["multi_exit", "anytime", "distiller", "slide"])
def test_each_checkpoint_kind_loads(kind, tmp_path, log):
    files = _images(tmp_path / "in")
    config = "configs/demo/exits/ds.yaml"
    opts = ["MODEL.EXITS.CHANNELS", "16"]
    if kind == "distiller":
        teacher_cfg = _cfg("configs/demo/deeplabv3_r18.yaml")
        teacher = tmp_path / "teacher.yaml"
        teacher.write_text(teacher_cfg.dump())
        teacher_weights = _checkpoint(build_model(teacher_cfg), tmp_path / "teacher.pth")
        config = "configs/demo/distill/cwd.yaml"
        opts = ["MODEL.DISTILL.TEACHER.CONFIG_FILE", str(teacher), "MODEL.DISTILL.TEACHER.WEIGHTS", teacher_weights]
    elif kind == "slide":
        config, opts = "configs/demo/deeplabv3_r18.yaml", ["TEST.MODE", "slide", "TEST.SLIDE.CROP_SIZE", "(32, 32)",
                                                           "TEST.SLIDE.STRIDE", "(16, 16)"]
    trained = build_model(_cfg(config, opts))
    weights = _checkpoint(trained, tmp_path / "model.pth")
    run_opts = list(opts)
    if kind == "anytime":
        run_opts += ["MODEL.META_ARCHITECTURE", "AnytimeSegmentor", "MODEL.EXITS.ANYTIME.POLICY", "exit:res3"]
    out = tmp_path / "out"
    predict.main(["--config-file", os.path.join(REPO, config), "--input", str(files[0]), "--output", str(out),
                  *TINY, *run_opts, "MODEL.WEIGHTS", weights])
    text = "\n".join(log)
    got = _labels(out, files[0])
    if kind == "multi_exit":
        assert "the final head answers" in text
        expected = _argmax(trained, files[0])
    elif kind == "anytime":
        assert "(exit: res3)" in text
        with torch.no_grad():
            img = np.asarray(Image.open(files[0]))
            out_ = trained.eval()([{"image": torch.as_tensor(img.transpose(2, 0, 1).copy()), "height": img.shape[0],
                                    "width": img.shape[1]}])[0]
        expected = out_["sem_seg_res3"].argmax(0).numpy()
    elif kind == "distiller":
        assert "predicting with its student" in text
        expected = _argmax(trained.wrapped_segmentor()[0], files[0])
    else:  # slide: the windows' answer, not the whole image's
        from segdistill.modeling.test_time import TestTimeSegmentor

        wrapper = TestTimeSegmentor(model=trained, mode="slide", crop_size=(32, 32), stride=(16, 16))
        expected = _argmax(wrapper, files[0])
        assert not np.array_equal(expected, _argmax(trained, files[0]))
    np.testing.assert_array_equal(got, expected)


def test_lazy_config_predicts_with_init_checkpoint_and_the_test_mapper(tmp_path, log):
    """A lazy (.py) config: its model with train.init_checkpoint (as --eval-only loads it), the test
    mapper's image format and resize, its test_time, the test dataset's classes."""
    config = os.path.join(REPO, "configs/demo/deeplabv3_r18.py")
    overrides = LAZY_TINY + ["train.device=cpu"]
    model = instantiate(load_lazy_config(config, overrides).model)
    weights = _checkpoint(model, tmp_path / "model.pth")
    files = _images(tmp_path / "in")
    out = tmp_path / "out"
    # windows, and a resize to 24 px on the short side: the answer is neither the whole image's nor full size's
    resize = ["dataloader.test.mapper.augmentations=[{_target_: detectron2.data.transforms.ResizeShortestEdge, "
              "short_edge_length: 24, max_size: 64}]",
              "+test_time={_target_: segdistill.modeling.test_time.TestTimeSegmentor, mode: slide, crop_size: [16, 16], "
              "stride: [8, 8]}"]
    predict.main(["--config-file", config, "--input", str(tmp_path / "in"), "--output", str(out), *overrides, *resize,
                  f"train.init_checkpoint={weights}"])
    wrapper = test_time.TestTimeSegmentor(model=model.eval(), mode="slide", crop_size=(16, 16), stride=(8, 8))
    for f, (h, w) in zip(files, SIZES):
        img = np.asarray(Image.open(f).convert("RGB"))  # the demo mapper's image_format is RGB
        small = T.ResizeShortestEdge(24, 64).get_transform(img).apply_image(img)
        with torch.no_grad():
            expected = wrapper([{"image": torch.as_tensor(small.transpose(2, 0, 1).copy()), "height": h,
                                 "width": w}])[0]["sem_seg"].argmax(0).numpy()
        got = _labels(out, f)
        assert got.shape == (h, w) and len(np.unique(expected)) > 1
        assert not np.array_equal(expected, _argmax(model, f))  # the windows and the resize changed the answer
        np.testing.assert_array_equal(got, expected)
    # no weights: refused as --eval-only refuses them, with the key to set
    with pytest.raises(WeightsMismatchError, match=r"train\.init_checkpoint is empty"):
        predict.main(["--config-file", config, "--input", str(files[0]), "--output", str(tmp_path / "o2"), *overrides])
