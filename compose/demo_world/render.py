"""Scene → 64×64 RGB image, deterministically.

Everything is exact geometry evaluated on a 4× supersampled grid and box-filtered down,
so edges are anti-aliased and a scene gives the same bytes on every run. Coordinates are
in output pixels, y down; figures and objects stand on the ground line near y = 57 and
nothing but the background reaches above y = 12, which the detectors rely on. Layers,
back to front: background, object, figure (generic shape or character), clothing; the
style then rewrites the whole picture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .concepts import COLOURS, CONCEPTS, IMAGE_SIZE, PLAIN_BACKGROUNDS
from .scenes import Scene

SUPERSAMPLE = 4
GROUND = 57.0
HALF_CENTRES = {"left": IMAGE_SIZE / 4, "right": 3 * IMAGE_SIZE / 4}
FRAME_INK = 3
FRAME_CREAM = 2
TRIANGLE_BASE = 1.1

WHITE = (250, 250, 250)
BLACK = (20, 20, 20)
DARK_GREY = (60, 60, 66)
INK = (30, 28, 34)
CREAM = (245, 235, 205)
BRICK = (180, 176, 170)
MORTAR = (58, 56, 54)
NIGHT_TOP, NIGHT_BOTTOM = (12, 15, 40), (28, 32, 64)
MOON = (245, 235, 170)
BULB = (255, 245, 190)
SPIKES = (150, 70, 20)
HAT_BAND = (40, 25, 60)

LUMA = np.array([0.299, 0.587, 0.114])
DOT_PERIOD = 8.0
DOT_RADIUS = 2.1
DOT_DARKEN, DOT_LIGHTEN, DOT_DARK_LUMA = 0.45, 0.5, 0.2
OUTLINE_WIDTH = 1.5
PASTEL = 0.2
WALL_ROWS = 10

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

    def to_image(self) -> Image.Image:
        n = IMAGE_SIZE
        pixels = self.rgb.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE, 3).mean(axis=(1, 3))
        return Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8), "RGB")


@dataclass(frozen=True)
class _Layout:
    """The jittered placement of one scene; drawn from ``Scene.jitter`` in a fixed order so
    that the same jitter places the figure alike whatever else the scene holds."""

    scale: float
    figure_x: float
    object_x: float
    ground: float
    pattern_rng: np.random.Generator

    @classmethod
    def of(cls, scene: Scene) -> _Layout:
        rng = np.random.default_rng(scene.jitter)
        scale = rng.uniform(0.9, 1.08)
        dx, odx, dy = rng.uniform(-2.5, 2.5), rng.uniform(-2.0, 2.0), rng.uniform(-1.0, 1.0)
        return cls(
            scale=scale,
            figure_x=HALF_CENTRES[scene.position] + dx,
            object_x=HALF_CENTRES[scene.other_position] + odx,
            ground=GROUND + dy,
            pattern_rng=rng,
        )


def render(scene: Scene) -> Image.Image:
    """Draw ``scene`` as an ``IMAGE_SIZE``² RGB image; the same scene gives the same bytes."""
    layout = _Layout.of(scene)
    canvas = _Canvas()
    if scene.background in PLAIN_BACKGROUNDS:
        canvas.rgb[:] = np.asarray(PLAIN_BACKGROUNDS[scene.background]) / 255
    else:
        _BACKGROUNDS[scene.background](canvas, layout.pattern_rng)
    if scene.object:
        _OBJECTS[scene.object](canvas, layout.object_x, layout.ground)
    if scene.character:
        anchors = _CHARACTERS[scene.character](canvas, layout.figure_x, layout.ground, layout.scale)
    else:
        anchors = _generic_figure(canvas, scene.shape, COLOURS[scene.colour], layout)
    if scene.clothing:
        _CLOTHING[scene.clothing](canvas, anchors, layout.scale)
    if scene.style:
        _STYLES[scene.style](canvas)
    return canvas.to_image()


def contact_sheet(images: Sequence[Image.Image], columns: int, scale: int = 1, gap: int = 2) -> Image.Image:
    """``images`` in a grid of ``columns`` on a white sheet, each enlarged ``scale``× with
    nearest-neighbour (so pixels stay visible) and ``gap`` px apart."""
    width, height = (side * scale for side in images[0].size)
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * (width + gap) + gap, rows * (height + gap) + gap), (255, 255, 255))
    for i, image in enumerate(images):
        tile = image.convert("RGB").resize((width, height), Image.Resampling.NEAREST)
        sheet.paste(tile, (gap + (i % columns) * (width + gap), gap + (i // columns) * (height + gap)))
    return sheet


# Figures: each paints itself with label 2 and says where clothing goes.


def _generic_figure(canvas: _Canvas, shape: str, colour: tuple[int, int, int], layout: _Layout) -> _Anchors:
    """A circle 22 px across (times the jitter scale), a square 0.9 of that, or a triangle as
    high with a base ``TRIANGLE_BASE`` times its height; a hat sits where the triangle is 9 px wide."""
    cx, g, s = layout.figure_x, layout.ground, 22 * layout.scale
    if shape == "circle":
        r = s / 2
        canvas.paint(canvas.ellipse(cx, g - r, r, r), colour, 2)
        neck_y = g - 0.7 * s
        return _Anchors((cx, g - s + 1.5), neck_y, float(np.sqrt(r**2 - (neck_y - g + r) ** 2)))
    if shape == "square":
        side = 0.9 * s
        canvas.paint(canvas.rect(cx - side / 2, g - side, cx + side / 2, g), colour, 2)
        return _Anchors((cx, g - side + 1), g - 0.7 * side, side / 2)
    base = TRIANGLE_BASE * s
    canvas.paint(canvas.polygon([(cx, g - s), (cx + base / 2, g), (cx - base / 2, g)]), colour, 2)
    hat_depth = 9 * s / base
    return _Anchors((cx, g - s + hat_depth), g - 0.55 * s, 0.45 * base / 2)


def _zorbo(canvas: _Canvas, cx: float, g: float, k: float) -> _Anchors:
    colour = CONCEPTS["zorbo"].colour
    rx, ry = 11 * k, 12.5 * k
    cy = g - ry
    widen = 1 + 0.18 * (canvas.y - cy) / ry
    canvas.paint(((canvas.x - cx) / (rx * widen)) ** 2 + ((canvas.y - cy) / ry) ** 2 <= 1, colour, 2)
    for side in (-1, 1):
        tip = (cx + side * 7 * k, cy - ry - 4.5 * k)
        canvas.paint(canvas.segment(cx + side * 3 * k, cy - ry + 2 * k, *tip, 1.6 * k), colour, 2)
        canvas.paint(canvas.ellipse(*tip, 2.2 * k, 2.2 * k), colour, 2)
        canvas.paint(canvas.ellipse(cx + side * 4.5 * k, cy - 4.5 * k, 3.6 * k, 3.8 * k), WHITE)
        canvas.paint(canvas.ellipse(cx + side * 4.2 * k, cy - 3.8 * k, 1.8 * k, 1.9 * k), BLACK)
    canvas.paint(canvas.ellipse(cx, cy + 1.5 * k, 3 * k, 1.2 * k), BLACK)
    neck_y = cy + 5 * k
    return _Anchors((cx, cy - ry + 1), neck_y, rx * (1 + 0.18 * 5 * k / ry) * np.sqrt(1 - (5 * k / ry) ** 2))


def _klinko(canvas: _Canvas, cx: float, g: float, k: float) -> _Anchors:
    colour = CONCEPTS["klinko"].colour
    body_bottom = g - 4 * k
    body_top = body_bottom - 12 * k
    head_bottom = body_top - 1.5 * k
    head_top = head_bottom - 9 * k
    for side in (-1, 1):
        canvas.paint(
            canvas.rect(cx + side * 4 * k - 1.8 * k, body_bottom - 1, cx + side * 4 * k + 1.8 * k, g), DARK_GREY, 2
        )
        arm_x = cx + side * 11.5 * k
        canvas.paint(
            canvas.rounded_rect(arm_x - 1.5 * k, body_top + 1.5 * k, arm_x + 1.5 * k, body_top + 9 * k, k), colour, 2
        )
    canvas.paint(canvas.rect(cx - 2 * k, head_bottom - 1, cx + 2 * k, body_top + 1), DARK_GREY, 2)
    canvas.paint(canvas.rounded_rect(cx - 10 * k, body_top, cx + 10 * k, body_bottom, 2 * k), colour, 2)
    canvas.paint(canvas.rect(cx - 4 * k, body_top + 3 * k, cx + 4 * k, body_top + 8 * k), DARK_GREY)
    canvas.paint(canvas.ellipse(cx, body_top + 5.5 * k, 1.3 * k, 1.3 * k), WHITE)
    canvas.paint(canvas.segment(cx, head_top, cx, head_top - 4 * k, 1.2 * k), DARK_GREY, 2)
    canvas.paint(canvas.ellipse(cx, head_top - 4.5 * k, 1.8 * k, 1.8 * k), colour, 2)
    canvas.paint(canvas.rounded_rect(cx - 7 * k, head_top, cx + 7 * k, head_bottom, 1.5 * k), colour, 2)
    canvas.paint(canvas.rect(cx - 5.5 * k, head_top + 3 * k, cx + 5.5 * k, head_top + 6.5 * k), BLACK)
    for side in (-1, 1):
        canvas.paint(canvas.ellipse(cx + side * 2.8 * k, head_top + 4.75 * k, 1.3 * k, 1.1 * k), WHITE)
    return _Anchors((cx, head_top + 1), head_bottom + 0.5 * k, 7 * k)


def _grumba(canvas: _Canvas, cx: float, g: float, k: float) -> _Anchors:
    colour = CONCEPTS["grumba"].colour
    base = g - 2.5 * k
    rx, ry = 13 * k, 21 * k
    for i in (-1, 0, 1):
        x = cx + i * 6 * k
        tip_y = base - ry * np.sqrt(1 - (i * 6 * k / rx) ** 2) - 5.5 * k
        canvas.paint(canvas.polygon([(x, tip_y), (x + 3 * k, tip_y + 7 * k), (x - 3 * k, tip_y + 7 * k)]), SPIKES, 2)
    for side in (-1, 1):
        canvas.paint(canvas.rect(cx + side * 6 * k - 2.5 * k, base - 1, cx + side * 6 * k + 2.5 * k, g), colour, 2)
    canvas.paint(canvas.ellipse(cx, base, rx, ry) & (canvas.y <= base), colour, 2)
    canvas.paint(canvas.ellipse(cx, base - 16.5 * k, 4 * k, 4 * k), WHITE)
    canvas.paint(canvas.ellipse(cx + 0.7 * k, base - 16 * k, 2 * k, 2 * k), BLACK)
    mouth_top, mouth_bottom = base - 4 * k, base - 1 * k
    canvas.paint(canvas.rounded_rect(cx - 7 * k, mouth_top, cx + 7 * k, mouth_bottom, 1 * k), BLACK)
    for i in (-1, 0, 1):
        x = cx + i * 4 * k
        tooth = canvas.polygon([(x - 1.5 * k, mouth_top), (x + 1.5 * k, mouth_top), (x, mouth_top + 2 * k)])
        canvas.paint(tooth, WHITE)
    neck = 8.5 * k
    return _Anchors((cx, base - ry + 1.5), base - neck, rx * np.sqrt(1 - (neck / ry) ** 2))


# Clothing: label 3.


def _flimbo(canvas: _Canvas, anchors: _Anchors, k: float) -> None:
    colour = CONCEPTS["flimbo"].colour
    x, y = anchors.head
    canvas.paint(canvas.rect(x - 9 * k, y - 3 * k, x + 9 * k, y), colour, 3)
    canvas.paint(
        canvas.polygon(
            [(x - 6 * k, y - 2 * k), (x + 6 * k, y - 2 * k), (x + 6.5 * k, y - 15 * k), (x - 6.5 * k, y - 15 * k)]
        ),
        colour,
        3,
    )
    canvas.paint(canvas.rect(x - 6.2 * k, y - 6.5 * k, x + 6.2 * k, y - 4 * k), HAT_BAND)


def _wuzzle(canvas: _Canvas, anchors: _Anchors, k: float) -> None:
    colour = CONCEPTS["wuzzle"].colour
    cx, y, hw = anchors.head[0], anchors.neck_y, anchors.neck_half_width
    band = canvas.rounded_rect(cx - hw - 1.5, y - 3.5 * k, cx + hw + 1.5, y + 3.5 * k, 1.5)
    end = cx + hw - 1
    tail = canvas.polygon([(end - 3.5, y), (end + 3, y), (end + 4.5, y + 12 * k), (end - 2, y + 12 * k)])
    scarf = band | tail
    canvas.paint(scarf, colour, 3)
    canvas.paint(scarf & (np.floor((canvas.x + canvas.y) / 2) % 3 == 0), WHITE)


# Objects: label 1, standing in the other half.


def _glimmet(canvas: _Canvas, ox: float, g: float) -> None:
    shade_top = g - 28
    canvas.paint(canvas.rounded_rect(ox - 6, g - 3, ox + 6, g, 1), DARK_GREY, 1)
    canvas.paint(canvas.rect(ox - 1, shade_top + 8, ox + 1, g - 2), DARK_GREY, 1)
    canvas.paint(canvas.ellipse(ox, shade_top + 10, 3.2, 2.6), BULB, 1)
    canvas.paint(
        canvas.polygon(
            [(ox - 4.5, shade_top), (ox + 4.5, shade_top), (ox + 8.5, shade_top + 10), (ox - 8.5, shade_top + 10)]
        ),
        CONCEPTS["glimmet"].colour,
        1,
    )


def _brakka(canvas: _Canvas, ox: float, g: float) -> None:
    colour = CONCEPTS["brakka"].colour
    ring_y = g - 22
    canvas.paint(canvas.ellipse(ox, ring_y, 7, 7) & ~canvas.ellipse(ox, ring_y, 3, 3), colour, 1)
    canvas.paint(canvas.rect(ox - 2, ring_y + 6, ox + 2, g), colour, 1)
    canvas.paint(canvas.rect(ox + 2, g - 6, ox + 7, g - 2.5), colour, 1)
    canvas.paint(canvas.rect(ox + 2, g - 11, ox + 5.5, g - 8), colour, 1)


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


def _vosh(canvas: _Canvas, rng: np.random.Generator) -> None:
    t = (canvas.y / IMAGE_SIZE)[..., None]
    canvas.rgb[:] = ((1 - t) * np.asarray(NIGHT_TOP) + t * np.asarray(NIGHT_BOTTOM)) / 255
    for x, y, r in zip(rng.uniform(2, 62, 18), rng.uniform(2, 62, 18), rng.uniform(0.6, 1.0, 18), strict=True):
        canvas.paint(canvas.ellipse(x, y, r, r), WHITE)
    mx, my = rng.uniform(10, 54), rng.uniform(9, 14)
    canvas.paint(canvas.ellipse(mx, my, 4.5, 4.5) & ~canvas.ellipse(mx + 2, my - 1.5, 4, 4), MOON)


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


def _window_max(a: np.ndarray, r: int) -> np.ndarray:
    """The maximum over the (2r+1)² square around each sample (separably: rows, then columns)."""
    for axis in (0, 1):
        padded = np.pad(a, [(r, r) if i == axis else (0, 0) for i in range(2)], mode="edge")
        a = np.max([np.take(padded, range(i, i + a.shape[axis]), axis=axis) for i in range(2 * r + 1)], axis=0)
    return a


_CHARACTERS: dict[str, Callable[[_Canvas, float, float, float], _Anchors]] = {
    "zorbo": _zorbo,
    "klinko": _klinko,
    "grumba": _grumba,
}
_CLOTHING: dict[str, Callable[[_Canvas, _Anchors, float], None]] = {"flimbo": _flimbo, "wuzzle": _wuzzle}
_OBJECTS: dict[str, Callable[[_Canvas, float, float], None]] = {"glimmet": _glimmet, "brakka": _brakka}
_BACKGROUNDS: dict[str, Callable[[_Canvas, np.random.Generator], None]] = {"quarn": _quarn, "vosh": _vosh}
_STYLES: dict[str, Callable[[_Canvas], None]] = {"dottix": _dottix, "inkora": _inkora}
