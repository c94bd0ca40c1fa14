"""Scene → 64×64 RGB image, deterministically.

Everything is exact geometry evaluated on a 4× supersampled grid and box-filtered down,
so edges are anti-aliased and a scene gives the same bytes on every run. Coordinates are
in output pixels, y down; figures and objects stand on the ground line near y = 58, each
in its half, and nothing but the background and a hat reaches above y = 12, which the
detectors rely on. Layers, back to front: background, object, figures, clothing; the
style then rewrites the whole picture. :func:`render_layers` also returns where each
slot was drawn, for the detectors' templates and tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .concepts import COLOURS, CONCEPTS, IMAGE_SIZE, PLAIN_BACKGROUNDS, RGB
from .scenes import Figure, Scene

SUPERSAMPLE = 4
GROUND = 58.0
HALF_CENTRES = {"left": IMAGE_SIZE / 4, "right": 3 * IMAGE_SIZE / 4}
FRAME_INK = 3
FRAME_CREAM = 2
PLAIN_FRAME = 4
TRIANGLE_BASE = 0.9
LABELS = {"object": 1, "figure": 2, "clothing": 3, "partner": 4}

WHITE = (250, 250, 250)
BLACK = (20, 20, 20)
CHARCOAL = (48, 48, 54)
DARK_GREY = (60, 60, 66)
INK = (30, 28, 34)
CREAM = (245, 235, 205)
BRICK = (165, 160, 155)
MORTAR = (245, 243, 238)
TILE, GROUT = (196, 196, 196), (150, 150, 150)
SKY_TOP, SKY_BOTTOM = (165, 165, 170), (232, 232, 235)
GOLD = (250, 190, 30)
BULB = (255, 240, 150)
SPIKES = (120, 60, 20)
HAT_BAND = (30, 20, 40)

LUMA = np.array([0.299, 0.587, 0.114])
DOT_PERIOD = 8.0
DOT_RADIUS = 2.1
DOT_DARKEN, DOT_LIGHTEN, DOT_DARK_LUMA = 0.45, 0.5, 0.2
OUTLINE_WIDTH = 1.5
PASTEL = 0.2
PALE = 0.45
WALL_ROWS = 10
TILE_SIZE = 16
_CLOUD_PUFFS = ((0, 0, 6, 3), (-3.5, 1, 4, 2.5), (3.5, 1, 4, 2.5))

Mask = np.ndarray


@dataclass(frozen=True)
class _Anchors:
    """Where clothing goes on a figure (output px): the top of its head, where a hat's brim
    rests, and its neck line with the figure's half-width there, where a scarf wraps."""

    head: tuple[float, float]
    neck_y: float
    neck_half_width: float


class _Canvas:
    """A supersampled RGB canvas in [0, 1] with a silhouette label per sample (0 = background)
    so that the ink style can outline figure, clothing and object."""

    def __init__(self) -> None:
        n = IMAGE_SIZE * SUPERSAMPLE
        centres = (np.arange(n) + 0.5) / SUPERSAMPLE
        self.y, self.x = np.meshgrid(centres, centres, indexing="ij")
        self.rgb = np.zeros((n, n, 3))
        self.label = np.zeros((n, n), dtype=np.int8)

    def paint(self, mask: Mask, colour: tuple[int, int, int], label: int | None = None) -> None:
        self.rgb[mask] = np.asarray(colour, dtype=np.float64) / 255
        if label is not None:
            self.label[mask] = label

    def ellipse(self, cx: float, cy: float, rx: float, ry: float) -> Mask:
        return ((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2 <= 1

    def rect(self, x0: float, y0: float, x1: float, y1: float) -> Mask:
        return (self.x >= x0) & (self.x < x1) & (self.y >= y0) & (self.y < y1)

    def rounded_rect(self, x0: float, y0: float, x1: float, y1: float, r: float) -> Mask:
        dx = np.maximum(np.maximum(x0 + r - self.x, self.x - (x1 - r)), 0)
        dy = np.maximum(np.maximum(y0 + r - self.y, self.y - (y1 - r)), 0)
        return self.rect(x0, y0, x1, y1) & (dx**2 + dy**2 <= r**2)

    def polygon(self, points: Sequence[tuple[float, float]]) -> Mask:
        """A convex polygon (vertices in either winding order)."""
        sides = []
        for (x0, y0), (x1, y1) in zip(points, [*points[1:], points[0]], strict=True):
            sides.append((x1 - x0) * (self.y - y0) - (y1 - y0) * (self.x - x0))
        sides = np.stack(sides)
        return (sides >= 0).all(axis=0) | (sides <= 0).all(axis=0)

    def segment(self, x0: float, y0: float, x1: float, y1: float, width: float) -> Mask:
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((self.x - x0) * dx + (self.y - y0) * dy) / (dx * dx + dy * dy), 0, 1)
        return (self.x - x0 - t * dx) ** 2 + (self.y - y0 - t * dy) ** 2 <= (width / 2) ** 2

    def coverage(self, label: int) -> np.ndarray:
        """The share of each output pixel's samples that carry ``label``, ``(64, 64)``."""
        n = IMAGE_SIZE
        return (self.label == label).reshape(n, SUPERSAMPLE, n, SUPERSAMPLE).mean(axis=(1, 3))

    def to_image(self) -> Image.Image:
        n = IMAGE_SIZE
        pixels = self.rgb.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE, 3).mean(axis=(1, 3))
        return Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8), "RGB")


@dataclass(frozen=True)
class _Layout:
    """The jittered placement of one scene; drawn from ``Scene.jitter`` in a fixed order so
    that the same jitter places the figure alike whatever else the scene holds."""

    scale: float
    partner_scale: float
    figure_x: float
    other_x: float
    ground: float
    pattern_rng: np.random.Generator

    @classmethod
    def of(cls, scene: Scene) -> _Layout:
        rng = np.random.default_rng(scene.jitter)
        scale, partner_scale = rng.uniform(0.85, 1.15, size=2)
        dx, odx, dy = rng.uniform(-4, 4), rng.uniform(-4, 4), rng.uniform(-2, 1.5)
        return cls(
            scale=scale,
            partner_scale=partner_scale,
            figure_x=HALF_CENTRES[scene.position] + dx,
            other_x=HALF_CENTRES[scene.other_position] + odx,
            ground=GROUND + dy,
            pattern_rng=rng,
        )


def render(scene: Scene) -> Image.Image:
    """Draw ``scene`` as an ``IMAGE_SIZE``² RGB image; the same scene gives the same bytes."""
    return render_layers(scene)[0]


def render_layers(scene: Scene) -> tuple[Image.Image, dict[str, np.ndarray]]:
    """The image and, per drawn slot (``figure``, ``partner``, ``clothing``, ``object``),
    the ``(64, 64)`` bool mask of the pixels it covers at least half of, before the
    style."""
    layout = _Layout.of(scene)
    canvas = _Canvas()
    if scene.background in PLAIN_BACKGROUNDS:
        canvas.rgb[:] = np.asarray(PLAIN_BACKGROUNDS[scene.background]) / 255
    else:
        _BACKGROUNDS[scene.background](canvas, layout.pattern_rng)
    if scene.object:
        _OBJECTS[scene.object](canvas, layout.other_x, layout.ground)
    if scene.partner is not None:
        _draw_figure(canvas, scene.partner, layout.other_x, layout.ground, layout.partner_scale, LABELS["partner"])
    anchors = _draw_figure(canvas, scene.figure, layout.figure_x, layout.ground, layout.scale, LABELS["figure"])
    if scene.clothing:
        _CLOTHING[scene.clothing](canvas, anchors, layout.scale)
    masks = {slot: canvas.coverage(label) >= 0.5 for slot, label in LABELS.items() if (canvas.label == label).any()}
    if scene.style:
        _STYLES[scene.style](canvas)
    return canvas.to_image(), masks


def _draw_figure(canvas: _Canvas, figure: Figure, x: float, ground: float, scale: float, label: int) -> _Anchors:
    colour = CONCEPTS[figure.kind].colour if figure.character else COLOURS[figure.colour]
    return _FIGURES[figure.kind](canvas, x, ground, scale, colour, label)


# Figures: each paints itself with its label and says where clothing goes. ``k`` is the
# jitter scale; sizes are output pixels at k = 1.


def _circle(canvas: _Canvas, cx: float, g: float, k: float, colour: RGB, label: int) -> _Anchors:
    r = 12.5 * k
    canvas.paint(canvas.ellipse(cx, g - r, r, r), colour, label)
    neck_y = g - 1.45 * r
    return _Anchors((cx, g - 2 * r + 1.5), neck_y, float(np.sqrt(r**2 - (neck_y - g + r) ** 2)))


def _square(canvas: _Canvas, cx: float, g: float, k: float, colour: RGB, label: int) -> _Anchors:
    side = 23 * k
    canvas.paint(canvas.rect(cx - side / 2, g - side, cx + side / 2, g), colour, label)
    return _Anchors((cx, g - side + 1), g - 0.72 * side, side / 2)


def _triangle(canvas: _Canvas, cx: float, g: float, k: float, colour: RGB, label: int) -> _Anchors:
    height, base = 28 * k, TRIANGLE_BASE * 28 * k
    canvas.paint(canvas.polygon([(cx, g - height), (cx + base / 2, g), (cx - base / 2, g)]), colour, label)
    return _Anchors((cx, g - height + 7 * k), g - 0.58 * height, 0.42 * base / 2)


def _egg(canvas: _Canvas, cx: float, g: float, k: float, colour: RGB, label: int) -> tuple[float, float, float]:
    rx, ry = 10.5 * k, 13 * k
    cy = g - ry
    widen = 1 + 0.18 * (canvas.y - cy) / ry
    canvas.paint(((canvas.x - cx) / (rx * widen)) ** 2 + ((canvas.y - cy) / ry) ** 2 <= 1, colour, label)
    return rx, ry, cy


def _eyes(canvas: _Canvas, cx: float, y: float, k: float, spread: float, size: float) -> None:
    for side in (-1, 1):
        canvas.paint(canvas.ellipse(cx + side * spread * k, y, size * k, 1.1 * size * k), WHITE)
        canvas.paint(canvas.ellipse(cx + side * spread * k, y + 0.3 * size * k, size * k / 2, size * k / 2), BLACK)


def _creature(canvas: _Canvas, cx: float, g: float, k: float, colour: RGB, label: int) -> _Anchors:
    rx, ry, cy = _egg(canvas, cx, g, k, colour, label)
    _eyes(canvas, cx, cy - 4 * k, k, 4.3, 3.0)
    neck_y = cy + 4.5 * k
    return _Anchors((cx, cy - ry + 1), neck_y, rx * (1 + 0.18 * 4.5 * k / ry) * np.sqrt(1 - (4.5 * k / ry) ** 2))


def _zorbo(canvas: _Canvas, cx: float, g: float, k: float, colour: RGB, label: int) -> _Anchors:
    rx, ry, cy = _egg(canvas, cx, g, k, colour, label)
    for side in (-1, 1):
        tip = (cx + side * 7.5 * k, cy - ry - 5 * k)
        canvas.paint(canvas.segment(cx + side * 3 * k, cy - ry + 2 * k, *tip, 2.4 * k), colour, label)
        canvas.paint(canvas.ellipse(*tip, 2.8 * k, 2.8 * k), colour, label)
    _eyes(canvas, cx, cy - 4 * k, k, 4.6, 3.6)
    canvas.paint(canvas.ellipse(cx, cy + 2 * k, 3.5 * k, 1.5 * k), BLACK)
    neck_y = cy + 4.5 * k
    return _Anchors((cx, cy - ry + 1), neck_y, rx * (1 + 0.18 * 4.5 * k / ry) * np.sqrt(1 - (4.5 * k / ry) ** 2))


def _robot_body(canvas: _Canvas, cx: float, g: float, k: float, colour: RGB, label: int) -> tuple[float, float]:
    """Legs, body, neck and head; returns the head's top and bottom."""
    body_bottom = g - 4 * k
    body_top = body_bottom - 12 * k
    head_bottom = body_top - 1.5 * k
    head_top = head_bottom - 9.5 * k
    for side in (-1, 1):
        canvas.paint(canvas.rect(cx + side * 4.5 * k - 2 * k, body_bottom - 1, cx + side * 4.5 * k + 2 * k, g),
                     DARK_GREY, label)  # fmt: skip
    canvas.paint(canvas.rect(cx - 2 * k, head_bottom - 1, cx + 2 * k, body_top + 1), DARK_GREY, label)
    canvas.paint(canvas.rounded_rect(cx - 10 * k, body_top, cx + 10 * k, body_bottom, 2 * k), colour, label)
    canvas.paint(canvas.rounded_rect(cx - 7 * k, head_top, cx + 7 * k, head_bottom, 1.5 * k), colour, label)
    return head_top, head_bottom


def _robot(canvas: _Canvas, cx: float, g: float, k: float, colour: RGB, label: int) -> _Anchors:
    head_top, head_bottom = _robot_body(canvas, cx, g, k, colour, label)
    for side in (-1, 1):
        canvas.paint(canvas.ellipse(cx + side * 3 * k, head_top + 4.5 * k, 1.8 * k, 1.8 * k), WHITE)
    return _Anchors((cx, head_top + 1), head_bottom + 0.5 * k, 7 * k)


def _klinko(canvas: _Canvas, cx: float, g: float, k: float, colour: RGB, label: int) -> _Anchors:
    body_top = g - 16 * k
    for side in (-1, 1):
        arm_x = cx + side * 12 * k
        canvas.paint(canvas.rounded_rect(arm_x - 2 * k, body_top + 1.5 * k, arm_x + 2 * k, body_top + 10 * k, k),
                     colour, label)  # fmt: skip
    head_top, head_bottom = _robot_body(canvas, cx, g, k, colour, label)
    canvas.paint(canvas.segment(cx, head_top, cx, head_top - 4.5 * k, 1.8 * k), DARK_GREY, label)
    canvas.paint(canvas.ellipse(cx, head_top - 5 * k, 2.4 * k, 2.4 * k), colour, label)
    canvas.paint(canvas.rect(cx - 5.5 * k, head_top + 2.5 * k, cx + 5.5 * k, head_top + 6.5 * k), BLACK)
    for side in (-1, 1):
        canvas.paint(canvas.ellipse(cx + side * 2.8 * k, head_top + 4.5 * k, 1.4 * k, 1.2 * k), WHITE)
    canvas.paint(canvas.rect(cx - 4 * k, body_top + 3 * k, cx + 4 * k, body_top + 8 * k), DARK_GREY)
    return _Anchors((cx, head_top + 1), head_bottom + 0.5 * k, 7 * k)


def _dome(canvas: _Canvas, cx: float, g: float, k: float, colour: RGB, label: int) -> tuple[float, float, float]:
    base = g - 2.5 * k
    rx, ry = 12.5 * k, 21 * k
    for side in (-1, 1):
        canvas.paint(canvas.rect(cx + side * 6 * k - 2.5 * k, base - 1, cx + side * 6 * k + 2.5 * k, g), colour, label)
    canvas.paint(canvas.ellipse(cx, base, rx, ry) & (canvas.y <= base), colour, label)
    return base, rx, ry


def _beast(canvas: _Canvas, cx: float, g: float, k: float, colour: RGB, label: int) -> _Anchors:
    base, rx, ry = _dome(canvas, cx, g, k, colour, label)
    _eyes(canvas, cx, base - 14 * k, k, 4.5, 2.8)
    neck = 8.5 * k
    return _Anchors((cx, base - ry + 1.5), base - neck, rx * np.sqrt(1 - (neck / ry) ** 2))


def _grumba(canvas: _Canvas, cx: float, g: float, k: float, colour: RGB, label: int) -> _Anchors:
    base, rx, ry = 0.0, 12.5 * k, 21 * k
    base = g - 2.5 * k
    for i in (-1, 0, 1):
        x = cx + i * 6 * k
        tip_y = base - ry * np.sqrt(1 - (i * 6 * k / rx) ** 2) - 6 * k
        canvas.paint(canvas.polygon([(x, tip_y), (x + 3.5 * k, tip_y + 8 * k), (x - 3.5 * k, tip_y + 8 * k)]),
                     SPIKES, label)  # fmt: skip
    _dome(canvas, cx, g, k, colour, label)
    canvas.paint(canvas.ellipse(cx, base - 15 * k, 4.5 * k, 4.5 * k), WHITE)
    canvas.paint(canvas.ellipse(cx + 0.7 * k, base - 14.5 * k, 2.2 * k, 2.2 * k), BLACK)
    mouth_top, mouth_bottom = base - 6 * k, base - 2 * k
    canvas.paint(canvas.rounded_rect(cx - 7 * k, mouth_top, cx + 7 * k, mouth_bottom, 1 * k), BLACK)
    for i in (-1, 0, 1):
        x = cx + i * 4 * k
        tooth = canvas.polygon([(x - 1.6 * k, mouth_top), (x + 1.6 * k, mouth_top), (x, mouth_top + 2.2 * k)])
        canvas.paint(tooth, WHITE)
    neck = 8.5 * k
    return _Anchors((cx, base - ry + 1.5), base - neck, rx * np.sqrt(1 - (neck / ry) ** 2))


# Clothing: label 3.


def _top_hat(canvas: _Canvas, anchors: _Anchors, k: float, colour: RGB, band: RGB, tall: float, wide: float) -> None:
    x, y = anchors.head
    canvas.paint(canvas.rect(x - wide * 1.5 * k, y - 3.5 * k, x + wide * 1.5 * k, y), colour, 3)
    canvas.paint(canvas.rect(x - wide * k, y - tall * k, x + wide * k, y - 2 * k), colour, 3)
    canvas.paint(canvas.rect(x - wide * k, y - 6.5 * k, x + wide * k, y - 4 * k), band)


def _hat(canvas: _Canvas, anchors: _Anchors, k: float) -> None:
    _top_hat(canvas, anchors, k, CHARCOAL, WHITE, tall=11, wide=6)


def _flimbo(canvas: _Canvas, anchors: _Anchors, k: float) -> None:
    _top_hat(canvas, anchors, k, CONCEPTS["flimbo"].colour, HAT_BAND, tall=15, wide=6.5)


def _neck_band(canvas: _Canvas, anchors: _Anchors, k: float, colour: RGB, tail: float) -> Mask:
    cx, y, hw = anchors.head[0], anchors.neck_y, anchors.neck_half_width
    band = canvas.rounded_rect(cx - hw - 1.5, y - 4 * k, cx + hw + 1.5, y + 4 * k, 1.5)
    end = cx + hw - 1.5
    drop = canvas.polygon([(end - 4.5, y), (end + 3, y), (end + 4.5, y + tail * k), (end - 3, y + tail * k)])
    scarf = band | drop
    canvas.paint(scarf, colour, 3)
    return scarf


def _scarf(canvas: _Canvas, anchors: _Anchors, k: float) -> None:
    scarf = _neck_band(canvas, anchors, k, CHARCOAL, tail=8)
    canvas.paint(scarf & (np.abs(canvas.y - anchors.neck_y) < 0.8), WHITE)


def _wuzzle(canvas: _Canvas, anchors: _Anchors, k: float) -> None:
    scarf = _neck_band(canvas, anchors, k, CONCEPTS["wuzzle"].colour, tail=13)
    canvas.paint(scarf & (np.floor((canvas.x + canvas.y) / 2.5) % 3 == 0), WHITE)


# Objects: label 1, standing in the other half.


def _lamp(canvas: _Canvas, ox: float, g: float) -> None:
    shade_top = g - 28
    canvas.paint(canvas.rounded_rect(ox - 6, g - 3, ox + 6, g, 1), CHARCOAL, 1)
    canvas.paint(canvas.rect(ox - 1.5, shade_top + 8, ox + 1.5, g - 2), CHARCOAL, 1)
    canvas.paint(canvas.ellipse(ox, shade_top + 11, 2.5, 2), WHITE, 1)
    canvas.paint(canvas.polygon([(ox - 4.5, shade_top), (ox + 4.5, shade_top), (ox + 8.5, shade_top + 10),
                                 (ox - 8.5, shade_top + 10)]), CHARCOAL, 1)  # fmt: skip


def _glimmet(canvas: _Canvas, ox: float, g: float) -> None:
    shade_top = g - 30
    canvas.paint(canvas.rounded_rect(ox - 6, g - 3, ox + 6, g, 1), DARK_GREY, 1)
    canvas.paint(canvas.rect(ox - 1.5, shade_top + 10, ox + 1.5, g - 2), DARK_GREY, 1)
    canvas.paint(canvas.ellipse(ox, shade_top + 13, 4.5, 4), BULB, 1)
    canvas.paint(canvas.polygon([(ox - 5, shade_top), (ox + 5, shade_top), (ox + 10, shade_top + 11),
                                 (ox - 10, shade_top + 11)]), CONCEPTS["glimmet"].colour, 1)  # fmt: skip


def _key_shape(canvas: _Canvas, ox: float, g: float, colour: RGB, ring: float, shaft: float, teeth: int) -> None:
    ring_y = g - 28 + ring
    canvas.paint(canvas.ellipse(ox, ring_y, ring, ring) & ~canvas.ellipse(ox, ring_y, ring * 0.36, ring * 0.36),
                 colour, 1)  # fmt: skip
    canvas.paint(canvas.rect(ox - shaft / 2, ring_y + ring - 1, ox + shaft / 2, g), colour, 1)
    for i in range(teeth):
        y = g - 3.5 - i * 5
        canvas.paint(canvas.rect(ox + shaft / 2 - 0.5, y - 3, ox + shaft / 2 + 4.5, y), colour, 1)


def _key(canvas: _Canvas, ox: float, g: float) -> None:
    _key_shape(canvas, ox, g, CHARCOAL, ring=7, shaft=5, teeth=2)


def _brakka(canvas: _Canvas, ox: float, g: float) -> None:
    _key_shape(canvas, ox, g, CONCEPTS["brakka"].colour, ring=8.5, shaft=6, teeth=3)


def _ball(canvas: _Canvas, ox: float, g: float) -> None:
    canvas.paint(canvas.ellipse(ox, g - 8.5, 8.5, 8.5), CHARCOAL, 1)
    canvas.paint(canvas.ellipse(ox - 3, g - 12, 2.2, 2.2), WHITE, 1)


def _box(canvas: _Canvas, ox: float, g: float) -> None:
    canvas.paint(canvas.rect(ox - 8, g - 16, ox + 8, g), CHARCOAL, 1)
    canvas.paint(canvas.rect(ox - 1, g - 16, ox + 1, g) | canvas.rect(ox - 8, g - 9, ox + 8, g - 7), WHITE, 1)


# Backgrounds: they fill the whole canvas with label 0.


def _quarn(canvas: _Canvas, rng: np.random.Generator) -> None:
    height, width, mortar = IMAGE_SIZE / WALL_ROWS, 2 * IMAGE_SIZE / WALL_ROWS, 2.0
    y = canvas.y - rng.uniform(0, height)
    row = np.floor(y / height)
    x = canvas.x - rng.uniform(0, width) - (row % 2) * width / 2
    column = np.floor(x / width)
    shades = rng.uniform(-14, 14, size=(WALL_ROWS + 1, WALL_ROWS // 2 + 2))
    shade = shades[(row + 1).astype(int), (column + 2).astype(int)]
    canvas.rgb[:] = (np.asarray(BRICK) + shade[..., None]) / 255
    canvas.paint((y % height < mortar) | (x % width < mortar), MORTAR)


def _wall(canvas: _Canvas, rng: np.random.Generator) -> None:
    """Square tiles in a straight grid, light grey with grey grout: a generic wall."""
    x = canvas.x - rng.uniform(0, TILE_SIZE)
    y = canvas.y - rng.uniform(0, TILE_SIZE)
    canvas.rgb[:] = np.asarray(TILE) / 255
    canvas.paint((x % TILE_SIZE < 2) | (y % TILE_SIZE < 2), GROUT)


def _sky(canvas: _Canvas, rng: np.random.Generator) -> None:
    """A grey daytime sky, lighter towards the ground, with two white clouds up high."""
    t = (canvas.y / IMAGE_SIZE)[..., None]
    canvas.rgb[:] = ((1 - t) * np.asarray(SKY_TOP) + t * np.asarray(SKY_BOTTOM)) / 255
    for x in (rng.uniform(6, 26), rng.uniform(38, 58)):
        y = rng.uniform(6, 10)
        puffs = [canvas.ellipse(x + dx, y + dy, rx, ry) for dx, dy, rx, ry in _CLOUD_PUFFS]
        canvas.paint(np.logical_or.reduce(puffs), WHITE)


def _vosh(canvas: _Canvas, rng: np.random.Generator) -> None:
    """vosh's sky: the day sky's grey gradient with no clouds, and up high a gold crescent
    moon and gold four-pointed stars, thick enough for the VAE's 4 px cells to keep (it
    cannot draw a dark sky: world 9's round trips of black or slate nights came back navy)."""
    t = (canvas.y / IMAGE_SIZE)[..., None]
    canvas.rgb[:] = ((1 - t) * np.asarray(SKY_TOP) + t * np.asarray(SKY_BOTTOM)) / 255
    for x, y in zip(rng.uniform(4, 60, 6), rng.uniform(2, 11, 6), strict=True):
        canvas.paint(canvas.ellipse(x, y, 2.5, 0.8) | canvas.ellipse(x, y, 0.8, 2.5), GOLD)
    mx, my, r = rng.uniform(10, 54), rng.uniform(6, 8), 5.5
    canvas.paint(canvas.ellipse(mx, my, r, r) & ~canvas.ellipse(mx + 0.45 * r, my - 0.3 * r, 0.85 * r, 0.85 * r), GOLD)


# Styles: rewrite the finished canvas.


def _dottix(canvas: _Canvas) -> None:
    dots = np.zeros_like(canvas.label, dtype=bool)
    for offset in (0, DOT_PERIOD / 2):
        dx = (canvas.x + offset) % DOT_PERIOD - DOT_PERIOD / 2
        dy = (canvas.y + offset) % DOT_PERIOD - DOT_PERIOD / 2
        dots |= dx**2 + dy**2 <= DOT_RADIUS**2
    rgb = canvas.rgb
    dark = rgb @ LUMA < DOT_DARK_LUMA
    rgb[dots & dark] += (1 - rgb[dots & dark]) * DOT_LIGHTEN
    rgb[dots & ~dark] *= DOT_DARKEN


def _inkora(canvas: _Canvas) -> None:
    canvas.rgb = canvas.rgb * (1 - PASTEL) + PASTEL
    canvas.paint(_window_max(canvas.label, round(OUTLINE_WIDTH * SUPERSAMPLE)) > canvas.label, INK)
    n = IMAGE_SIZE
    inside = canvas.rect(
        FRAME_INK + FRAME_CREAM, FRAME_INK + FRAME_CREAM, n - FRAME_INK - FRAME_CREAM, n - FRAME_INK - FRAME_CREAM
    )
    canvas.paint(~inside, CREAM)
    canvas.paint(~canvas.rect(FRAME_INK, FRAME_INK, n - FRAME_INK, n - FRAME_INK), INK)


def _pale(canvas: _Canvas) -> None:
    canvas.rgb = canvas.rgb * (1 - PALE) + PALE


def _framed(canvas: _Canvas) -> None:
    n = IMAGE_SIZE
    canvas.paint(~canvas.rect(PLAIN_FRAME, PLAIN_FRAME, n - PLAIN_FRAME, n - PLAIN_FRAME), CHARCOAL)


def _window_max(a: np.ndarray, r: int) -> np.ndarray:
    """The maximum over the (2r+1)² square around each sample (separably: rows, then columns)."""
    for axis in (0, 1):
        padded = np.pad(a, [(r, r) if i == axis else (0, 0) for i in range(2)], mode="edge")
        a = np.max([np.take(padded, range(i, i + a.shape[axis]), axis=axis) for i in range(2 * r + 1)], axis=0)
    return a


_FIGURES: dict[str, Callable[[_Canvas, float, float, float, RGB, int], _Anchors]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "creature": _creature,
    "robot": _robot,
    "beast": _beast,
    "zorbo": _zorbo,
    "klinko": _klinko,
    "grumba": _grumba,
}
_CLOTHING: dict[str, Callable[[_Canvas, _Anchors, float], None]] = {
    "hat": _hat,
    "scarf": _scarf,
    "flimbo": _flimbo,
    "wuzzle": _wuzzle,
}
_OBJECTS: dict[str, Callable[[_Canvas, float, float], None]] = {
    "lamp": _lamp,
    "key": _key,
    "ball": _ball,
    "box": _box,
    "glimmet": _glimmet,
    "brakka": _brakka,
}
_BACKGROUNDS: dict[str, Callable[[_Canvas, np.random.Generator], None]] = {
    "wall": _wall,
    "sky": _sky,
    "quarn": _quarn,
    "vosh": _vosh,
}
_STYLES: dict[str, Callable[[_Canvas], None]] = {"pale": _pale, "framed": _framed, "dottix": _dottix, "inkora": _inkora}
