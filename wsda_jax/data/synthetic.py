"""Procedural two-domain street scenes: the embedded stand-in for GTA5 -> Cityscapes.

`render_example(domain, index, seed=..., height=..., width=...)` draws one street
scene in the 19-class train-id space (sky, buildings, trees, road and sidewalks in
perspective, poles with signs and lights, vehicles, people, riders on bikes). Both
domains draw their layouts from the same distribution; only the appearance
differs:

- 'source' is "rendered": one flat, saturated colour per class, hard edges, no noise.
- 'target' is "photographic": other per-class colours (several near another
  class's source colour), per-instance colour variation (cars, clothes), class
  textures (windows, foliage, asphalt grain), a lighting gradient, a colour cast,
  a slight blur and sensor noise.

So a source-only model that keys on colour transfers badly, while shape, texture
and context still separate the target classes, which is what adaptation can use.
Everything is numpy, deterministic in (domain, index, seed), and takes a few ms
at 128x256.
"""

from __future__ import annotations

import collections.abc

import numpy as np

from wsda_jax import classes

DOMAINS = ("source", "target")

# Train ids, looked up by name in the class table.
_ID = {name: i for i, name in enumerate(classes.CLASS_NAMES)}
ROAD, SIDEWALK, BUILDING, WALL = _ID["road"], _ID["sidewalk"], _ID["building"], _ID["wall"]
FENCE, POLE, LIGHT, SIGN = _ID["fence"], _ID["pole"], _ID["traffic light"], _ID["traffic sign"]
VEGETATION, TERRAIN, SKY, PERSON = _ID["vegetation"], _ID["terrain"], _ID["sky"], _ID["person"]
RIDER, CAR, TRUCK, BUS, TRAIN = _ID["rider"], _ID["car"], _ID["truck"], _ID["bus"], _ID["train"]
MOTORCYCLE, BICYCLE = _ID["motorcycle"], _ID["bicycle"]

# The colour tables below are listed in train-id order (road ... bicycle).
# "Rendered" look: one flat saturated RGB colour per train id.
SOURCE_COLOURS = np.array(
    [
        (110, 100, 125),  # road
        (205, 140, 175),  # sidewalk
        (155, 115, 85),  # building
        (185, 170, 120),  # wall
        (140, 165, 75),  # fence
        (225, 220, 60),  # pole
        (255, 150, 0),  # traffic light
        (240, 40, 40),  # traffic sign
        (40, 170, 50),  # vegetation
        (165, 215, 95),  # terrain
        (70, 150, 240),  # sky
        (230, 40, 140),  # person
        (250, 95, 60),  # rider
        (30, 60, 200),  # car
        (40, 130, 150),  # truck
        (230, 200, 30),  # bus
        (60, 110, 90),  # train
        (120, 40, 200),  # motorcycle
        (130, 20, 60),  # bicycle
    ],
    dtype=np.float32,
)

# "Photographic" look: mean colours, several close to another class's source colour
# (road ~ source road but greyer, building ~ source road, vegetation ~ source fence,
# terrain ~ source wall, sidewalk ~ source building-ish, sky ~ pale grey-blue).
TARGET_COLOURS = np.array(
    [
        (100, 98, 104),  # road: grey asphalt
        (160, 135, 125),  # sidewalk
        (120, 110, 125),  # building: looks like the source road
        (160, 150, 130),  # wall
        (120, 140, 80),  # fence: olive, like source fence/vegetation
        (150, 150, 140),  # pole: grey metal
        (60, 60, 50),  # traffic light: dark housing
        (200, 190, 60),  # traffic sign: yellowish, like the source pole
        (110, 150, 70),  # vegetation: like the source fence
        (175, 165, 110),  # terrain: like the source wall
        (185, 205, 230),  # sky: pale
        (90, 70, 80),  # person: dark clothes (varies per instance)
        (120, 60, 60),  # rider
        (150, 150, 155),  # car (varies a lot per instance)
        (200, 200, 190),  # truck
        (225, 170, 40),  # bus: like the source bus/pole
        (90, 120, 110),  # train
        (70, 50, 110),  # motorcycle
        (60, 40, 60),  # bicycle
    ],
    dtype=np.float32,
)
# Std of the per-instance colour offset, the fine grain and the blotchy texture.
_INSTANCE_STD = np.array(
    [6, 8, 12, 10, 8, 10, 10, 15, 12, 10, 6, 45, 35, 60, 25, 20, 15, 30, 25], np.float32
)
_GRAIN_STD = np.array([10, 8, 6, 8, 6, 4, 4, 4, 18, 12, 2, 6, 6, 4, 4, 4, 4, 6, 6], np.float32)
_BLOTCH_STD = np.array([6, 6, 10, 12, 4, 2, 2, 2, 35, 25, 4, 4, 4, 2, 2, 2, 2, 2, 2], np.float32)


class _Canvas:
    """Label (H, W) uint8 and instance (H, W) int32 maps that shapes are painted onto."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self.label = np.full((height, width), SKY, np.uint8)
        self.instance = np.zeros((height, width), np.int32)
        self.next_id = 1
        self.rows = np.arange(height, dtype=np.float32)[:, None]
        self.cols = np.arange(width, dtype=np.float32)[None, :]

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def paint(self, mask: np.ndarray, cls: int, iid: int, y0: int = 0, x0: int = 0) -> None:
        """Paints class `cls` and instance `iid` where `mask` (placed at y0, x0) is True."""
        h, w = mask.shape
        self.label[y0 : y0 + h, x0 : x0 + w][mask] = cls
        self.instance[y0 : y0 + h, x0 : x0 + w][mask] = iid

    def rect(self, y0: float, y1: float, x0: float, x1: float, cls: int, iid: int) -> None:
        """Fills rows [y0, y1) and columns [x0, x1), clipped, at least 1 pixel wide."""
        y0, y1 = int(round(y0)), max(int(round(y1)), int(round(y0)) + 1)
        x0, x1 = int(round(x0)), max(int(round(x1)), int(round(x0)) + 1)
        y0, y1 = max(y0, 0), min(y1, self.height)
        x0, x1 = max(x0, 0), min(x1, self.width)
        if y1 > y0 and x1 > x0:
            self.label[y0:y1, x0:x1] = cls
            self.instance[y0:y1, x0:x1] = iid

    def ellipse(self, cy: float, cx: float, ry: float, rx: float, cls: int, iid: int) -> None:
        """Fills the ellipse centred at (cy, cx) with radii (ry, rx), clipped."""
        ry, rx = max(ry, 0.7), max(rx, 0.7)
        y0, y1 = max(int(cy - ry), 0), min(int(cy + ry) + 1, self.height)
        x0, x1 = max(int(cx - rx), 0), min(int(cx + rx) + 1, self.width)
        if y1 <= y0 or x1 <= x0:
            return
        yy = (self.rows[y0:y1] + 0.5 - cy) / ry
        xx = (self.cols[:, x0:x1] + 0.5 - cx) / rx
        self.paint(yy**2 + xx**2 <= 1.0, cls, iid, y0, x0)


def _draw_background(c: _Canvas, rng: np.random.Generator, horizon: float) -> None:
    """Buildings with varying heights, gaps of sky or trees, walls and fences."""
    h, w = c.height, c.width
    x = -rng.uniform(0.0, 0.1) * w
    while x < w:
        seg = rng.uniform(0.08, 0.3) * w
        kind = rng.choice(3, p=(0.65, 0.2, 0.15))  # building, trees, sky gap
        if kind == 0:
            top = rng.uniform(0.03, 0.75) * horizon
            c.rect(top, horizon + 2, x, x + seg, BUILDING, c.new_id())
        elif kind == 1:
            for _ in range(rng.integers(1, 4)):
                r = rng.uniform(0.08, 0.2) * h
                cx = x + rng.uniform(0.0, 1.0) * seg
                c.ellipse(
                    horizon - r * rng.uniform(0.3, 1.0), cx, r, r * 1.2, VEGETATION, c.new_id()
                )
        x += seg
    for _ in range(rng.integers(0, 3)):  # walls / fences in front of the buildings
        cls = WALL if rng.uniform() < 0.5 else FENCE
        x0 = rng.uniform(0.0, 0.8) * w
        height = rng.uniform(0.04, 0.1) * h
        c.rect(horizon - height, horizon + 2, x0, x0 + rng.uniform(0.1, 0.35) * w, cls, c.new_id())
    # At least one tree so vegetation is always present.
    r = rng.uniform(0.08, 0.16) * h
    c.ellipse(horizon - 0.6 * r, rng.uniform(0.05, 0.95) * w, r, 1.3 * r, VEGETATION, c.new_id())


def _draw_ground(
    c: _Canvas, rng: np.random.Generator, horizon: float, vx: float
) -> collections.abc.Callable:
    """Road and sidewalks converging at (horizon, vx); terrain/vegetation beyond them.

    Returns `edges(row) -> (left road edge, right road edge, sidewalk width)` in pixels.
    """
    h, w = c.height, c.width
    half_l, half_r = rng.uniform(0.35, 0.8, size=2) * w
    walk = rng.uniform(0.12, 0.3) * w
    t = np.clip((c.rows - horizon) / (h - horizon), 0.0, None)  # 0 at the horizon, 1 at the bottom
    left, right = vx - t * half_l, vx + t * half_r
    below = c.rows >= horizon
    beyond = [TERRAIN if rng.uniform() < 0.6 else VEGETATION for _ in range(2)]
    c.paint(below & (c.cols < left - t * walk), beyond[0], c.new_id())
    c.paint(below & (c.cols >= right + t * walk), beyond[1], c.new_id())
    c.paint(below & (c.cols >= left - t * walk) & (c.cols < right + t * walk), SIDEWALK, c.new_id())
    c.paint(below & (c.cols >= left) & (c.cols < right), ROAD, c.new_id())

    def edges(y: float) -> tuple[float, float, float]:
        ty = (y - horizon) / (h - horizon)
        return vx - ty * half_l, vx + ty * half_r, ty * walk

    return edges


def _draw_objects(
    c: _Canvas, rng: np.random.Generator, horizon: float, edges: collections.abc.Callable
) -> None:
    """Poles, people, vehicles and riders, painted far to near (by their base row)."""
    h = c.height
    objects = []  # (base row, kind, x) with x in road/sidewalk coordinates chosen below
    for kind, low, high in (("pole", 1, 4), ("person", 1, 4), ("vehicle", 1, 4), ("rider", 0, 3)):
        for _ in range(rng.integers(low, high)):
            base = horizon + rng.uniform(0.15, 1.0) ** 0.7 * (h - horizon)
            objects.append((base, kind))
    objects.sort(key=lambda o: o[0])
    for base, kind in objects:
        left, right, walk = edges(base)
        t = (base - horizon) / (h - horizon)  # perspective scale
        side = rng.uniform() < 0.5
        on_walk = (
            left - rng.uniform(0.2, 0.8) * walk if side else right + rng.uniform(0.2, 0.8) * walk
        )
        on_road = left + rng.uniform(0.1, 0.9) * (right - left)
        if kind == "pole":
            _draw_pole(c, rng, base, on_walk, t)
        elif kind == "person":
            _draw_person(c, rng, base, on_walk, t * h * rng.uniform(0.45, 0.6), PERSON)
        elif kind == "vehicle":
            _draw_vehicle(c, rng, base, on_road, t)
        else:
            _draw_rider(c, rng, base, on_road if rng.uniform() < 0.6 else on_walk, t)


def _draw_pole(c: _Canvas, rng: np.random.Generator, base: float, x: float, t: float) -> None:
    height = t * c.height * rng.uniform(0.7, 1.0)
    width = max(1.0, t * c.width * 0.012)
    top = base - height
    c.rect(top, base, x - width / 2, x + width / 2, POLE, c.new_id())
    size = max(2.0, t * c.height * 0.1)
    if rng.uniform() < 0.5:
        if rng.uniform() < 0.5:
            c.ellipse(top + size / 2, x, size / 2, size / 2, SIGN, c.new_id())
        else:
            c.rect(top, top + size * 0.8, x - size / 2, x + size / 2, SIGN, c.new_id())
    else:
        c.rect(top, top + size * 1.6, x - size * 0.3, x + size * 0.3, LIGHT, c.new_id())


def _draw_person(
    c: _Canvas, rng: np.random.Generator, base: float, x: float, height: float, cls: int
) -> None:
    iid = c.new_id()
    width = height * rng.uniform(0.22, 0.3)
    head = height * 0.13
    c.rect(base - height * 0.5, base, x - width * 0.35, x + width * 0.35, cls, iid)  # legs
    c.rect(base - height + 2 * head, base - height * 0.45, x - width / 2, x + width / 2, cls, iid)
    c.ellipse(base - height + head, x, head, head * 0.85, cls, iid)


def _draw_vehicle(c: _Canvas, rng: np.random.Generator, base: float, x: float, t: float) -> None:
    cls = rng.choice([CAR, TRUCK, BUS, TRAIN], p=(0.7, 0.12, 0.12, 0.06))
    size = {CAR: (0.28, 0.45), TRUCK: (0.5, 0.5), BUS: (0.55, 0.7), TRAIN: (0.55, 1.2)}[cls]
    height = t * c.height * size[0] * rng.uniform(0.85, 1.15)
    width = t * c.width * size[1] * 0.5 * rng.uniform(0.85, 1.15)
    iid = c.new_id()
    if cls == CAR:  # body plus a narrower cabin
        c.rect(base - height * 0.55, base - height * 0.1, x - width / 2, x + width / 2, cls, iid)
        c.rect(base - height, base - height * 0.5, x - width * 0.32, x + width * 0.32, cls, iid)
    else:
        c.rect(base - height, base - height * 0.1, x - width / 2, x + width / 2, cls, iid)
    wheel = max(1.0, height * 0.12)
    for wx in (x - width * 0.32, x + width * 0.32):
        c.ellipse(base - wheel, wx, wheel, wheel, cls, iid)


def _draw_rider(c: _Canvas, rng: np.random.Generator, base: float, x: float, t: float) -> None:
    bike = MOTORCYCLE if rng.uniform() < 0.4 else BICYCLE
    height = t * c.height * 0.5
    length = height * (0.8 if bike == MOTORCYCLE else 0.65)
    wheel = height * (0.17 if bike == MOTORCYCLE else 0.15)
    iid = c.new_id()
    for wx in (x - length / 2 + wheel, x + length / 2 - wheel):
        c.ellipse(base - wheel, wx, wheel, wheel, bike, iid)
    frame_h = wheel * (1.2 if bike == MOTORCYCLE else 0.5)
    c.rect(
        base - 2 * wheel - frame_h * 0.3, base - wheel, x - length / 3, x + length / 3, bike, iid
    )
    _draw_person(c, rng, base - 1.4 * wheel, x, height * 0.85, RIDER)


def render_layout(rng: np.random.Generator, height: int, width: int) -> tuple:
    """Draws one scene layout.

    Returns (label uint8 (H, W) train ids, instance int32 (H, W) region ids).
    """
    c = _Canvas(height, width)
    horizon = rng.uniform(0.38, 0.52) * height
    vx = rng.uniform(0.3, 0.7) * width
    _draw_background(c, rng, horizon)
    edges = _draw_ground(c, rng, horizon, vx)
    _draw_objects(c, rng, horizon, edges)
    return c.label, c.instance


def paint_source(label: np.ndarray) -> np.ndarray:
    """Rendered look: flat per-class colours. uint8 (H, W) -> uint8 (H, W, 3)."""
    return np.take(SOURCE_COLOURS.astype(np.uint8), label.astype(np.intp), axis=0)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Unit-variance-ish noise varying over `cell` pixels (bilinear upsampled grid), (H, W)."""
    gh, gw = height // cell + 2, width // cell + 2
    grid = rng.standard_normal((gh, gw), dtype=np.float32)
    y = np.arange(height, dtype=np.float32) / cell
    x = np.arange(width, dtype=np.float32) / cell
    y0, x0 = y.astype(np.int32), x.astype(np.int32)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
    g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - fx) + g01 * fx) * (1 - fy) + (g10 * (1 - fx) + g11 * fx) * fy


def _blur(image: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with edge replication, float (H, W, 3)."""
    p = np.pad(image, ((1, 1), (0, 0), (0, 0)), mode="edge")
    image = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    p = np.pad(image, ((0, 0), (1, 1), (0, 0)), mode="edge")
    return (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4


def paint_target(label: np.ndarray, instance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Photographic look: shifted colours, instance variation, textures, light, blur, noise.

    label uint8 (H, W), instance int32 (H, W) -> uint8 (H, W, 3).
    """
    h, w = label.shape
    label = label.astype(np.intp)  # np.take with intp indices is the fast gather
    image = np.take(TARGET_COLOURS, label, axis=0)
    # Per-instance colour: e.g. every car and every person's clothes get their own colour.
    num_ids = int(instance.max()) + 1
    offsets = rng.standard_normal((num_ids, 3), dtype=np.float32)
    offsets = 0.6 * offsets + 0.4 * offsets.mean(axis=1, keepdims=True)  # mostly brightness
    image += np.take(offsets, instance, axis=0) * np.take(_INSTANCE_STD, label)[..., None]
    # Class textures: fine grain, blotches (foliage, terrain), windows, fence bars.
    grain = 3.46 * (rng.random((h, w), dtype=np.float32) - 0.5)  # uniform, unit variance
    blotch = _smooth_noise(rng, h, w, cell=max(2, w // 40))
    image += (grain * np.take(_GRAIN_STD, label) + blotch * np.take(_BLOTCH_STD, label))[..., None]
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    period = max(3, w // 48)
    windows = ((rows // period) % 2 == 1) & ((cols // period) % 2 == 1)
    image[(label == BUILDING) & windows] *= 0.55
    image[(label == FENCE) & (cols % 3 == 0)] *= 0.6
    sky_ramp = np.clip(rows / max(1.0, float(np.argmax((label != SKY).any(axis=1)))), 0, 1)
    image += ((label == SKY) * np.float32(30.0) * sky_ramp.astype(np.float32))[..., None]
    # Lighting: a linear gain field and a colour cast, then optics and sensor.
    gy, gx = rng.uniform(-0.3, 0.3, size=2)
    gain = rng.uniform(0.75, 1.15) + gy * (rows / h - 0.5) + gx * (cols / w - 0.5)
    gain = gain.astype(np.float32)
    cast = rng.uniform(0.88, 1.12, size=3).astype(np.float32)
    image = _blur(image * gain[..., None] * cast)
    image += 10.4 * (rng.random(image.shape, dtype=np.float32) - 0.5)  # uniform, std 3
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def render_example(
    domain: str, index: int, *, seed: int, height: int, width: int
) -> dict[str, np.ndarray]:
    """One scene of `domain` ('source' or 'target'), deterministic in (domain, index, seed).

    Returns {'image': uint8 (H, W, 3), 'label': uint8 (H, W) train ids}. Layouts with
    fewer than 8 classes (rare: heavy occlusion) are redrawn from a derived seed.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain={domain!r}: expected one of {DOMAINS}")
    rng = np.random.default_rng([seed, DOMAINS.index(domain), index])
    label, instance = render_layout(rng, height, width)
    while len(np.unique(label)) < 8:
        label, instance = render_layout(rng, height, width)
    image = paint_source(label) if domain == "source" else paint_target(label, instance, rng)
    return {"image": image, "label": label}
