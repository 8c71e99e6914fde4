"""The built-in demo dataset: procedurally generated street scenes, made on first use.

Why synthetic: nothing can be downloaded on the machines this project is built on, and
the demo and the tests need a dataset that is always there. It is made to be a real
learning problem rather than a colour lookup:

* 10 classes: large regions (sky, building, road, sidewalk, vegetation), objects of a
  few to a few hundred pixels (car, person, sign) and thin structures (pole: 3-5 px,
  wire: 1 px);
* colour alone does not give the class: buildings, road, sidewalk, cars and overcast
  sky draw from overlapping grey/beige palettes and differ by texture (bricks and windows,
  fine asphalt noise and lane marks, paving tiles, leafy noise, smooth gradients) and by
  context (perspective layout, objects standing on the ground);
* per-image lighting, colour casts and sensor noise;
* ignore pixels (255): an "ego vehicle" hood at the bottom of some images and random
  unlabeled blobs with random texture in others.

Images and labels are written as PNG under ``$DETECTRON2_DATASETS/<name>/`` (see
:data:`DEMO_SPECS`) by :func:`ensure_demo_dataset`, deterministically from a seed; a
manifest records the generator version so a changed generator regenerates.
:func:`register_demo` registers every spec's ``<name>_{train,val}`` (loaded and checked like
every dataset of the project, :mod:`.folder`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import cv2
import numpy as np

from .folder import load_sem_seg_folder, verify_sem_seg_dicts
from .paths import datasets_root
from .registration import keep_registered, register_sem_seg

__all__ = [
    "DEMO_CLASSES", "DEMO_COLORS", "DemoSpec", "DEMO_SPECS", "generate_scene",
    "ensure_demo_dataset", "demo_split_dirs", "load_demo", "register_demo", "is_demo_dataset",
]

GENERATOR_VERSION = 2
IGNORE = 255

DEMO_CLASSES = ["sky", "building", "road", "sidewalk", "vegetation", "car", "person", "pole", "wire", "sign"]
DEMO_COLORS = [
    (70, 130, 180), (70, 70, 70), (128, 64, 128), (244, 35, 232), (107, 142, 35),
    (0, 0, 142), (220, 20, 60), (153, 153, 153), (250, 170, 30), (220, 220, 0),
]
SKY, BUILDING, ROAD, SIDEWALK, VEGETATION, CAR, PERSON, POLE, WIRE, SIGN = range(10)


@dataclass(frozen=True)
class DemoSpec:
    """How many images of what size; ``seed`` fixes every pixel."""

    num_train: int
    num_val: int
    height: int
    width: int
    seed: int = 0


DEMO_SPECS: Dict[str, DemoSpec] = {
    # The demo's dataset: a few hundred training images.
    "segdistill_demo": DemoSpec(num_train=300, num_val=60, height=160, width=160, seed=0),
    # A handful of small images for smoke tests and quick experiments.
    "segdistill_demo_mini": DemoSpec(num_train=16, num_val=8, height=96, width=96, seed=1),
}

# Overlapping palettes (RGB): the same greys and beiges serve walls, road, pavement, cars, sky.
_GREYS = [(90, 90, 95), (120, 120, 120), (150, 148, 140), (175, 170, 160), (105, 100, 110)]
_WARM = [(160, 90, 70), (185, 150, 110), (200, 180, 150), (140, 110, 90)]
_CAR = _GREYS + _WARM + [(30, 60, 150), (150, 30, 30), (30, 30, 35), (220, 220, 215)]
_CLOTHES = [(40, 40, 120), (120, 30, 30), (30, 90, 40), (200, 190, 60), (60, 60, 60), (230, 230, 230)]
_SIGN = [(200, 30, 30), (30, 70, 190), (230, 200, 30), (240, 240, 240)]


# ----------------------------------------------------------------------------- textures
def _smooth_noise(rng, h, w, cell: float) -> np.ndarray:
    """Value noise in [-1, 1] with features about ``cell`` pixels wide."""
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    grid = rng.uniform(-1, 1, size=(gh, gw)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _tint(base, rng, spread=18.0) -> np.ndarray:
    return np.clip(np.asarray(base, np.float32) + rng.normal(0, spread, 3), 0, 255)


def _sky(rng, h, w) -> np.ndarray:
    overcast = rng.random() < 0.4
    top = _tint((175, 175, 178) if overcast else (90, 140, 215), rng, 12)
    bottom = _tint((200, 198, 195) if overcast else (175, 200, 230), rng, 12)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    img = top * (1 - t) + bottom * t
    img = np.broadcast_to(img, (h, w, 3)).copy()
    clouds = np.clip(_smooth_noise(rng, h, w, 24) * 1.6, 0, 1)[..., None]
    return img * (1 - 0.5 * clouds) + 235 * 0.5 * clouds


def _bricks(rng, h, w) -> np.ndarray:
    base = _tint(_GREYS[rng.integers(len(_GREYS))] if rng.random() < 0.5 else _WARM[rng.integers(len(_WARM))], rng)
    bh, bw = int(rng.integers(4, 7)), int(rng.integers(8, 14))
    y, x = np.mgrid[0:h, 0:w]
    row = y // bh
    col = (x + (row % 2) * (bw // 2)) // bw
    jitter = rng.normal(0, 10, size=(h // bh + 2, w // bw + 3)).astype(np.float32)
    img = base[None, None, :] + jitter[row, col][..., None]
    mortar = (y % bh == 0) | ((x + (row % 2) * (bw // 2)) % bw == 0)
    img[mortar] = img[mortar] * 0.65 + 40
    # windows: a grid of dark (sometimes lit) rectangles, still "building"
    wy, wx = int(rng.integers(12, 20)), int(rng.integers(10, 16))
    win = ((y % wy) > wy * 0.35) & ((y % wy) < wy * 0.85) & ((x % wx) > wx * 0.3) & ((x % wx) < wx * 0.75)
    shade = np.where(rng.random((h // wy + 1, w // wx + 1)) < 0.15, 200, 45).astype(np.float32)
    img[win] = shade[(y // wy)[win], (x // wx)[win]][:, None] + rng.normal(0, 6, 3)
    return img


def _asphalt(rng, h, w) -> np.ndarray:
    base = _tint(_GREYS[rng.integers(len(_GREYS))], rng, 10)
    grain = rng.normal(0, 14, (h, w, 1)).astype(np.float32)
    return base + grain + 10 * _smooth_noise(rng, h, w, 30)[..., None]


def _tiles(rng, h, w) -> np.ndarray:
    base = _tint((_GREYS + _WARM)[rng.integers(len(_GREYS) + len(_WARM))], rng, 12)
    t = int(rng.integers(5, 9))
    y, x = np.mgrid[0:h, 0:w]
    jitter = rng.normal(0, 8, (h // t + 1, w // t + 1)).astype(np.float32)
    img = base + jitter[y // t, x // t][..., None]
    joint = (y % t == 0) | (x % t == 0)
    img[joint] *= 0.7
    return img


def _leaves(rng, h, w) -> np.ndarray:
    base = _tint([(60, 110, 40), (90, 120, 50), (120, 110, 50), (50, 80, 45)][rng.integers(4)], rng, 14)
    fine = rng.normal(0, 1, (h, w)).astype(np.float32)
    fine = cv2.GaussianBlur(fine, (3, 3), 0.8) * 45
    return base + fine[..., None] + 20 * _smooth_noise(rng, h, w, 6)[..., None]


def _flat(rng, color, h, w, spread=12.0, noise=4.0) -> np.ndarray:
    return _tint(color, rng, spread) + rng.normal(0, noise, (h, w, 1)).astype(np.float32)


# ----------------------------------------------------------------------------- painting
class _Canvas:
    def __init__(self, h, w):
        self.h, self.w = h, w
        self.img = np.zeros((h, w, 3), np.float32)
        self.label = np.zeros((h, w), np.uint8)

    def paint(self, mask: np.ndarray, texture: np.ndarray, cls: int) -> None:
        self.img[mask] = texture[mask]
        self.label[mask] = cls

    def mask(self, draw) -> np.ndarray:
        m = np.zeros((self.h, self.w), np.uint8)
        draw(m)
        return m.astype(bool)


def _poly(points) -> np.ndarray:
    return np.round(np.asarray(points, np.float32)).astype(np.int32)


def generate_scene(rng: np.random.Generator, height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """One street scene: (HxWx3 uint8 RGB image, HxW uint8 label with 255 = ignore)."""
    h, w = height, width
    c = _Canvas(h, w)
    horizon = rng.uniform(0.35, 0.55) * h
    c.paint(np.ones((h, w), bool), _sky(rng, h, w), SKY)

    # Buildings: blocks along both sides, standing a little below the horizon.
    x = rng.uniform(-0.1, 0.1) * w
    while x < w:
        bw = rng.uniform(0.15, 0.4) * w
        top = rng.uniform(0.02, horizon / h - 0.08) * h
        bottom = horizon + rng.uniform(0.02, 0.12) * h
        if rng.random() < 0.8:
            m = c.mask(lambda a: cv2.rectangle(a, (int(x), int(top)), (int(x + bw), int(bottom)), 1, -1))
            c.paint(m, _bricks(rng, h, w), BUILDING)
        x += bw + rng.uniform(0, 0.08) * w

    # Ground: sidewalk everywhere below the horizon, then the road in perspective.
    vx = rng.uniform(0.3, 0.7) * w
    half_top = rng.uniform(0.01, 0.05) * w
    xl, xr = rng.uniform(-0.35, 0.2) * w, rng.uniform(0.8, 1.35) * w
    ground = c.mask(lambda a: cv2.rectangle(a, (0, int(horizon)), (w, h), 1, -1))
    c.paint(ground, _tiles(rng, h, w), SIDEWALK)
    road_poly = _poly([(vx - half_top, horizon), (vx + half_top, horizon), (xr, h), (xl, h)])
    road = c.mask(lambda a: cv2.fillPoly(a, [road_poly], 1))
    road_tex = _asphalt(rng, h, w)
    # dashed lane marks along the centre line (still "road")
    for t0 in np.arange(rng.uniform(0, 0.1), 1.0, 0.18):
        t1 = t0 + 0.08
        ya, yb = horizon + t0 * (h - horizon), horizon + t1 * (h - horizon)
        xa, xb = vx + (((xl + xr) / 2) - vx) * t0, vx + (((xl + xr) / 2) - vx) * t1
        thick = max(1, int(1 + 2 * t0))
        cv2.line(road_tex, (int(xa), int(ya)), (int(xb), int(yb)), (225, 225, 215), thick)
    c.paint(road, road_tex, ROAD)

    def depth(y):  # perspective scale: 0 at the horizon, 1 at the bottom
        return max((y - horizon) / (h - horizon), 0.02)

    def on_sidewalk(y):
        t = depth(y)
        left = vx - half_top + (xl - vx + half_top) * t
        right = vx + half_top + (xr - vx - half_top) * t
        return [x for x in (left - rng.uniform(0.03, 0.2) * w, right + rng.uniform(0.03, 0.2) * w) if 0 <= x < w]

    # Far-to-near objects: trees, poles (with signs), people, cars.
    objects = []
    for _ in range(rng.integers(1, 4)):
        objects.append(("tree", horizon + rng.uniform(0.0, 0.35) * (h - horizon)))
    for _ in range(rng.integers(1, 4)):
        objects.append(("pole", horizon + rng.uniform(0.05, 0.7) * (h - horizon)))
    for _ in range(rng.integers(0, 4)):
        objects.append(("person", horizon + rng.uniform(0.1, 0.9) * (h - horizon)))
    for _ in range(rng.integers(1, 5)):
        objects.append(("car", horizon + rng.uniform(0.08, 0.95) * (h - horizon)))
    objects.sort(key=lambda o: o[1])
    pole_tops = []
    for kind, yb in objects:
        s = depth(yb)
        if kind == "car":
            t = s
            left = vx - half_top + (xl - vx + half_top) * t
            right = vx + half_top + (xr - vx - half_top) * t
            cw, ch = rng.uniform(0.25, 0.4) * (right - left), rng.uniform(0.5, 0.7) * 0.3 * (right - left)
            cx = rng.uniform(left + cw / 2, max(left + cw / 2 + 1, right - cw / 2))
            body = c.mask(lambda a: cv2.rectangle(a, (int(cx - cw / 2), int(yb - ch * 0.6)), (int(cx + cw / 2), int(yb)), 1, -1))
            cabin = c.mask(lambda a: cv2.rectangle(a, (int(cx - cw * 0.32), int(yb - ch)), (int(cx + cw * 0.32), int(yb - ch * 0.55)), 1, -1))
            tex = _flat(rng, _CAR[rng.integers(len(_CAR))], h, w)
            c.paint(body | cabin, tex, CAR)
            win = c.mask(lambda a: cv2.rectangle(a, (int(cx - cw * 0.26), int(yb - ch * 0.92)), (int(cx + cw * 0.26), int(yb - ch * 0.62)), 1, -1))
            c.paint(win & cabin, _flat(rng, (40, 50, 60), h, w), CAR)
            r = max(1, int(ch * 0.16))
            wheels = c.mask(lambda a: [cv2.circle(a, (int(cx + k * cw * 0.3), int(yb)), r, 1, -1) for k in (-1, 1)])
            c.paint(wheels, _flat(rng, (20, 20, 20), h, w, 5), CAR)
        elif kind == "person":
            for px in on_sidewalk(yb)[:1]:
                ph = rng.uniform(0.35, 0.6) * (h - horizon) * s + 6
                pw = ph * 0.28
                body = c.mask(lambda a: cv2.ellipse(a, (int(px), int(yb - ph * 0.4)), (max(1, int(pw / 2)), max(1, int(ph * 0.4))), 0, 0, 360, 1, -1))
                head = c.mask(lambda a: cv2.circle(a, (int(px), int(yb - ph * 0.88)), max(1, int(pw * 0.35)), 1, -1))
                c.paint(body, _flat(rng, _CLOTHES[rng.integers(len(_CLOTHES))], h, w), PERSON)
                c.paint(head, _flat(rng, (200, 160, 130), h, w), PERSON)
        elif kind == "tree":
            for tx in on_sidewalk(yb)[: int(rng.integers(1, 3))]:
                r = (rng.uniform(0.08, 0.16) * h) * (0.5 + s)
                cy = yb - r * 1.6
                blob = np.zeros((h, w), np.float32)
                for _ in range(4):
                    ox, oy = rng.normal(0, r * 0.4, 2)
                    cv2.circle(blob, (int(tx + ox), int(cy + oy)), int(r * rng.uniform(0.6, 1.0)), 1.0, -1)
                edge = _smooth_noise(rng, h, w, 3) * 0.6
                canopy = (cv2.GaussianBlur(blob, (0, 0), max(r * 0.25, 1)) + edge * 0.5) > 0.5
                trunk = c.mask(lambda a: cv2.rectangle(a, (int(tx - r * 0.08), int(cy)), (int(tx + r * 0.08), int(yb)), 1, -1))
                c.paint(trunk, _flat(rng, (90, 70, 50), h, w), VEGETATION)
                c.paint(canopy, _leaves(rng, h, w), VEGETATION)
        elif kind == "pole":
            for qx in on_sidewalk(yb)[:1]:
                ph = rng.uniform(0.5, 0.9) * yb
                thick = int(np.clip(round(2 + 3 * s), 3, 5))
                top = yb - ph
                m = c.mask(lambda a: cv2.rectangle(a, (int(qx), int(top)), (int(qx) + thick - 1, int(yb)), 1, -1))
                c.paint(m, _flat(rng, _GREYS[rng.integers(len(_GREYS))], h, w, 20), POLE)
                pole_tops.append((qx + thick / 2, top))
                if rng.random() < 0.7:  # a sign on the pole
                    sz = max(6, int(6 + 8 * s))
                    sy = top + rng.uniform(0.05, 0.3) * ph
                    shape = rng.integers(3)
                    if shape == 0:
                        m = c.mask(lambda a: cv2.rectangle(a, (int(qx - sz / 2), int(sy)), (int(qx + sz / 2), int(sy + sz)), 1, -1))
                    elif shape == 1:
                        m = c.mask(lambda a: cv2.circle(a, (int(qx), int(sy + sz / 2)), max(2, sz // 2), 1, -1))
                    else:
                        tri = _poly([(qx, sy), (qx - sz / 2, sy + sz), (qx + sz / 2, sy + sz)])
                        m = c.mask(lambda a: cv2.fillPoly(a, [tri], 1))
                    c.paint(m, _flat(rng, _SIGN[rng.integers(len(_SIGN))], h, w, 20, 6), SIGN)

    # Wires: 1-px catenaries between pole tops, or across the sky.
    anchors = sorted(pole_tops)
    spans = list(zip(anchors, anchors[1:]))
    for _ in range(rng.integers(0, 3)):
        y0 = rng.uniform(0.05, 0.6) * horizon
        spans.append(((-5, y0), (w + 5, y0 + rng.uniform(-0.2, 0.2) * horizon)))
    for (xa, ya), (xb, yb) in spans:
        sag = rng.uniform(2, 0.12 * h + 3)
        xs = np.linspace(xa, xb, 64)
        tt = (xs - xa) / max(xb - xa, 1e-3)
        ys = ya + (yb - ya) * tt + sag * 4 * tt * (1 - tt)
        pts = _poly(np.stack([xs, ys], 1))[None]
        m = c.mask(lambda a: cv2.polylines(a, pts, False, 1, 1))
        c.paint(m, _flat(rng, (35, 35, 40), h, w, 8), WIRE)

    # Ignore regions: an ego-vehicle hood, or an unlabeled blob with random texture.
    u = rng.random()
    if u < 0.3:
        hood_y = h * rng.uniform(0.86, 0.94)
        hood = _poly([(0, h), (0, hood_y + 0.04 * h), (w / 2, hood_y), (w, hood_y + 0.04 * h), (w, h)])
        m = c.mask(lambda a: cv2.fillPoly(a, [hood], 1))
        c.paint(m, _flat(rng, (25, 25, 30), h, w, 10, 3), IGNORE)
    elif u < 0.6:
        r = rng.uniform(0.05, 0.12) * min(h, w)
        cxy = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
        m = c.mask(lambda a: cv2.ellipse(a, cxy, (int(r), int(r * rng.uniform(0.5, 1.5))), float(rng.uniform(0, 180)), 0, 360, 1, -1))
        c.paint(m, _asphalt(rng, h, w) if rng.random() < 0.5 else _leaves(rng, h, w), IGNORE)

    # Camera: exposure, colour cast, sensor noise, slight blur.
    img = c.img * rng.uniform(0.7, 1.25) + rng.normal(0, 8, 3)
    img = img + rng.normal(0, rng.uniform(3, 10), img.shape)
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (3, 3), 0.6)
    return np.clip(img, 0, 255).astype(np.uint8), c.label


# ----------------------------------------------------------------------------- files
def demo_split_dirs(root: str, split: str) -> Tuple[str, str]:
    """(image folder, label folder) of one split of a demo dataset rooted at ``root``."""
    return os.path.join(root, "images", split), os.path.join(root, "labels", split)


def _manifest(spec: DemoSpec) -> dict:
    return {"generator_version": GENERATOR_VERSION, "classes": DEMO_CLASSES, **asdict(spec)}


def _write_split(root: str, split: str, count: int, spec: DemoSpec, split_id: int) -> None:
    img_dir, lbl_dir = demo_split_dirs(root, split)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(lbl_dir, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng([spec.seed, split_id, i])
        img, label = generate_scene(rng, spec.height, spec.width)
        name = f"{split}_{i:05d}.png"
        cv2.imwrite(os.path.join(img_dir, name), img[:, :, ::-1])
        cv2.imwrite(os.path.join(lbl_dir, name), label)


@contextlib.contextmanager
def _lock(path: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # processes launched together generate only once
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_demo_dataset(name: str, root: str = None) -> str:
    """Generate demo dataset ``name`` (a key of DEMO_SPECS) under ``root`` unless it is there.

    Returns the dataset folder. Generation writes to a temporary folder that is renamed
    into place at the end, so an interrupted run never leaves a half-written dataset.
    """
    spec = DEMO_SPECS[name]
    base = root or datasets_root()
    folder = os.path.join(base, name)
    manifest_path = os.path.join(folder, "manifest.json")
    want = _manifest(spec)

    def ready() -> bool:
        try:
            with open(manifest_path) as f:
                return json.load(f) == want
        except (OSError, ValueError):
            return False

    if ready():
        return folder
    with _lock(os.path.join(base, f".{name}.lock")):
        if ready():
            return folder
        import logging

        logging.getLogger(__name__).info(
            "Generating the demo dataset '%s' (%d train + %d val images, %dx%d) in %s ...",
            name, spec.num_train, spec.num_val, spec.height, spec.width, folder,
        )
        tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=base)
        try:
            _write_split(tmp, "train", spec.num_train, spec, 0)
            _write_split(tmp, "val", spec.num_val, spec, 1)
            with open(os.path.join(tmp, "manifest.json"), "w") as f:
                json.dump(want, f, indent=1)
            if os.path.exists(folder):
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def load_demo(name: str, split: str) -> List[dict]:
    """Dataset dicts of one split of the demo dataset ``name``, generated first when missing."""
    folder = ensure_demo_dataset(name)
    image_dir, label_dir = demo_split_dirs(folder, split)
    help_ = (f"The demo dataset is generated under $DETECTRON2_DATASETS/{name}/ "
             f"(now {os.path.abspath(folder)}); delete that folder to regenerate it.")
    dicts = load_sem_seg_folder(image_dir, label_dir, dataset_name=f"{name}_{split}", layout_help=help_)
    verify_sem_seg_dicts(dicts, dataset_name=f"{name}_{split}", num_classes=len(DEMO_CLASSES), fix_help=help_)
    return dicts


def is_demo_dataset(name: str) -> bool:
    """Whether ``name`` is one of the demo's splits (or a split derived from one, e.g. HS3's)."""
    return any(name == base or name.startswith(base + "_") for base in DEMO_SPECS)


def register_demo(root: str) -> None:
    """``segdistill_demo_{train,val}`` and ``segdistill_demo_mini_{train,val}`` over ``root``
    (names registered already are kept)."""
    for name in DEMO_SPECS:
        for split in ("train", "val"):
            image_dir, label_dir = demo_split_dirs(os.path.join(root, name), split)
            register_sem_seg(
                f"{name}_{split}", lambda n=name, s=split: load_demo(n, s), keep=keep_registered,
                stuff_classes=list(DEMO_CLASSES),
                stuff_colors=[list(c) for c in DEMO_COLORS],
                image_root=image_dir,
                sem_seg_root=label_dir,
            )
