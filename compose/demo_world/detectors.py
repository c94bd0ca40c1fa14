"""Detectors of the demo world: which concepts an image shows, and whether each slot is right.

Every element is looked for only where its slot puts it, and by its shape as much as by
its colour, so that a blob of the right hue fails:

1. the *style* is read from the whole picture (dottix's dot screen by its spectral peaks,
   inkora's cream-lined frame, framed's dark border, pale's lifted floor) and undone, so
   that the other slots are read as if unstyled;
2. in each half, the pixels of each candidate colour (a hue within ±25° of a figure
   colour or of a concept's signature colour, as soft memberships) are fitted, by
   intersection over union, with templates of every figure kind drawn by :mod:`.render`
   itself at seven scales, two blurs and every place the layout's jitter reaches; a
   figure's dark parts (eyes, visor) count too;
3. on the best figure, each clothing item's templates are fitted where that item sits;
   in a half without a figure, each object's templates;
4. the *background* is read from the band above the figures (rows 0-11): its brightness,
   vosh's gold moon and stars, the brick rows' and the tiles' periodic waves.

A concept is present when its score is at least 1: its overlap over the slot's
threshold, capped by its hue's closeness (1 at 25° off). :func:`concept_details` gives the
parts of each score. Readings are cached per image, so checking one image against several
scenes costs one reading (about 0.1 s for a 64×64 picture on one core).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, cached_property, lru_cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from .concepts import (
    CLOTHING_KINDS,
    COLOURS,
    CONCEPTS,
    FIGURE_KINDS,
    IMAGE_SIZE,
    OBJECT_KINDS,
    POSITIONS,
    RGB,
)
from .render import (
    _CLOTHING,
    _FIGURES,
    _OBJECTS,
    CHARCOAL,
    DOT_DARK_LUMA,
    DOT_DARKEN,
    DOT_LIGHTEN,
    DOT_PERIOD,
    DOT_RADIUS,
    FRAME_CREAM,
    FRAME_INK,
    GOLD,
    GROUND,
    HALF_CENTRES,
    LUMA,
    PALE,
    PASTEL,
    PLAIN_FRAME,
    SUPERSAMPLE,
    TILE_SIZE,
    WALL_ROWS,
    WHITE,
    _Canvas,
)
from .scenes import Figure, Scene

# Pixel classes, soft (a membership 0..1 ramping between two values), on the image with
# its style undone and smoothed by SMOOTH_SIGMA px.
SMOOTH_SIGMA = 0.7
DOT_CLEARANCE, DOT_SIGMA = 0.5, 1.0
DOT_BLURS = (0.0, 0.4, 0.8, 1.2, 1.6)
DOT_FULL, DOT_MIXED = 0.75, 0.42
HUE_WINDOW = 40.0
HUE_SPREAD = 14.0
MODE_SPREAD = 5.0
HUE_RAMP = (8.0, 20.0)
CHROMA_RAMP = (0.2, 0.6)
MIN_CANDIDATE_CHROMA = 0.35
MIN_COLOUR_CHROMA = 0.3
DARK_RAMP = 0.075
DARK_MIDDLE = (0.3, 0.58)
GREY_RAMP = (0.25, 0.45)
GOLD_HUE_WINDOW, GOLD_CHROMA, GOLD_LUMA = 25.0, 0.3, 0.45
INK_LUMA = 0.09
INK_CHROMA = 0.1
HUE_TOLERANCE = 25.0
MIN_PIXELS = 40
COLOUR_PEAKS = 2
SHADES = 28.0

# Templates and the layout they are searched over (output px).
SCALES = tuple(float(k) for k in np.linspace(0.85, 1.15, 7))
TEMPLATE_BLURS = (0.0, 1.0)
CANON_X = IMAGE_SIZE / 2
SEARCH_X = 5
SEARCH_Y = (-3, 3)
REFIT = 1
WINDOW_MARGIN = 3
PAD = 24
READINGS_KEPT = 16
HALF_REACH = 22
OBJECT_REACH = 16
FIGURE_TOP = 12

# Presence thresholds, on intersection over union.
MIN_IOU = {"figure": 0.7, "clothing": 0.4, "object": 0.6}

# Styles.
HALFTONE_MIN = 0.006
CREAM_MIN = 0.32
RING_DARK, RING_GREY = 0.3, 0.12
PALE_FLOOR = 0.26
FRAMES = {"framed": PLAIN_FRAME, "inkora": FRAME_INK + FRAME_CREAM}

# Backgrounds, in the band above the figures.
BAND_BOTTOM = 12
BRICK_ROW = IMAGE_SIZE / WALL_ROWS
MIN_BAND_ROW = 8
MIN_BAND_COLUMN = 3
FRAME_MARGIN = 2
MIN_GOLD, MIN_MOON = 24, 6
CLOUD_LUMA, MAX_CLOUDS = 0.93, 8
BRICK_WAVE, MORTAR_LIGHT, COURSES = 0.04, 0.8, 1.5
WHITE_MIN, GRAY_RANGE, SKY_CLOUDS, TILE_WAVE = 0.85, (0.38, 0.58), 0.1, 0.012
LIGHT_PLAIN, PLAIN_SPREAD, WALL_LINES = 0.72, 0.08, 0.1

CHARCOAL_LUMA = float(np.asarray(CHARCOAL) / 255 @ LUMA)
WHITE_LUMA = float(np.asarray(WHITE) / 255 @ LUMA)
CHARACTERS = tuple(n for n, c in CONCEPTS.items() if c.category == "character")
CLOTHING_ITEMS = CLOTHING_KINDS + tuple(n for n, c in CONCEPTS.items() if c.category == "clothing")
OBJECT_ITEMS = OBJECT_KINDS + tuple(n for n, c in CONCEPTS.items() if c.category == "object")
TEMPLATE_COLOUR = COLOURS["red"]


# ---------------------------------------------------------------- pixels


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255


def _gaussian(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the first two axes, edges reflected."""
    radius = max(1, int(np.ceil(3 * sigma)))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):
        padded = np.pad(a, [(radius, radius) if i == axis else (0, 0) for i in range(a.ndim)], mode="reflect")
        a = sum(w * np.take(padded, range(i, i + a.shape[axis]), axis=axis) for i, w in enumerate(kernel))
    return a


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HSV hue (degrees), chroma (max - min) and value (max) of RGB in [0, 1], last axis."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    chroma = value - rgb.min(axis=-1)
    safe = np.where(chroma > 0, chroma, 1)
    sector = np.where(value == r, ((g - b) / safe) % 6, np.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return np.where(chroma > 0, sector * 60, 0.0), chroma, value


def _hue_of(colour: RGB) -> float:
    return float(_hsv(np.asarray(colour, dtype=np.float64) / 255)[0])


def _hue_distance(a: np.ndarray | float, b: float) -> np.ndarray:
    return np.abs((np.asarray(a) - b + 180) % 360 - 180)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """``mask`` grown by ``r`` px (a square structuring element)."""
    padded = np.pad(mask, r)
    out = mask.copy()
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def _erode(mask: np.ndarray, r: int = 1) -> np.ndarray:
    """``mask`` shrunk by ``r`` px (a square structuring element)."""
    return ~_dilate(~mask, r)


def _opened(mask: np.ndarray, r: int = 1) -> np.ndarray:
    """``mask`` without the parts thinner than 2r + 1 px (an opening by a (2r+1)² square)."""
    return _dilate(_erode(mask, r), r) & mask


@dataclass(frozen=True)
class _Features:
    """Per pixel: HSV hue (degrees), chroma and luma."""

    hue: np.ndarray
    chroma: np.ndarray
    luma: np.ndarray

    @classmethod
    def of(cls, rgb: np.ndarray) -> _Features:
        hue, chroma, _ = _hsv(rgb)
        return cls(hue, chroma, rgb @ LUMA)


# ---------------------------------------------------------------- styles


def _border_profiles(a: np.ndarray, depth: int = 8) -> np.ndarray:
    """The mean of ``a`` at each depth from each side, over the side's middle: ``(4, depth)``."""
    middle = slice(8, IMAGE_SIZE - 8)
    return np.stack([side[:depth, middle].mean(axis=1) for side in (a, a[::-1], a.T, a.T[::-1])])


def _halftone(luma: np.ndarray) -> float:
    """Sharpness of the 45° dot screen's spectral peaks, in luma units: in each quarter of
    the inner 48 px (a whole number of periods), the amplitude at each diagonal screen
    frequency above the mean of the 5×5 bins around it, for the weaker diagonal; then the
    median quarter. Edges and outlines spread over many bins; the screen covers all
    quarters."""
    inner = luma[8:-8, 8:-8]
    half = inner.shape[0] // 2
    k = round(half / DOT_PERIOD)
    sharpness = []
    for block in (inner[i : i + half, j : j + half] for i in (0, half) for j in (0, half)):
        spectrum = np.abs(np.fft.fft2(block - block.mean())) / block.size
        peaks = [np.roll(spectrum, (2 - v, 2 - k), axis=(0, 1))[:5, :5] for v in (k, -k)]
        sharpness.append(min(p[2, 2] - (p.sum() - p[2, 2]) / 24 for p in peaks))
    return float(np.median(sharpness))


def _style_scores(raw: np.ndarray) -> dict[str, float]:
    """Each style's statistic over its threshold (≥ 1: that style), in the order they are
    decided: dottix's dot screen; inkora's cream ring, brighter at depth 3 than the ink
    outside it on every side; framed's border, dark and grey on every side; pale's floor,
    the 2nd percentile of the darkest channel inside the border (pale lifts every colour
    above 45% white, and every scene has a saturated figure)."""
    luma = raw @ LUMA
    profiles = _border_profiles(luma)
    ring = profiles[:, :3].mean(axis=1).max()
    ring_chroma = _border_profiles(_hsv(raw)[1])[:, :3].mean(axis=1).max()
    floor = np.percentile(_gaussian(raw, SMOOTH_SIGMA)[8:-8, 8:-8].min(axis=-1), 2)
    return {
        "dottix": _halftone(luma) / HALFTONE_MIN,
        "inkora": float((profiles[:, 3] - profiles[:, :2].mean(axis=1)).min()) / CREAM_MIN,
        "framed": float(1 / max(ring / RING_DARK, ring_chroma / RING_GREY, 1e-6)),
        "pale": float(floor / PALE_FLOOR),
    }


def _style_of(scores: dict[str, float]) -> str | None:
    return next((style for style, score in scores.items() if score >= 1), None)


@cache
def _dot_coverage(clearance: float = 0.0) -> np.ndarray:
    """The share of each pixel within ``clearance`` px of a dottix dot, ``(64, 64)``."""
    n = IMAGE_SIZE * SUPERSAMPLE
    centres = (np.arange(n) + 0.5) / SUPERSAMPLE
    y, x = np.meshgrid(centres, centres, indexing="ij")
    near = np.zeros((n, n), dtype=bool)
    for offset in (0, DOT_PERIOD / 2):
        near |= ((x + offset) % DOT_PERIOD - DOT_PERIOD / 2) ** 2 + (
            (y + offset) % DOT_PERIOD - DOT_PERIOD / 2
        ) ** 2 <= (DOT_RADIUS + clearance) ** 2
    return near.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).mean(axis=(1, 3))


def _undot(raw: np.ndarray) -> np.ndarray:
    """``raw`` without the dottix screen: each pixel divided by what its dots did to it, as
    blurred as the picture is (the blur among ``DOT_BLURS`` that leaves the least screen),
    darkening where the surroundings are light and lightening where dark, as
    :mod:`.render` draws them; the surroundings come from the pixels clear of dots."""
    weights = (1 - _dot_coverage(DOT_CLEARANCE))[..., None]
    around = _gaussian(raw * weights, DOT_SIGMA) / np.maximum(_gaussian(weights, DOT_SIGMA), 1e-3) @ LUMA
    # A full dot lighter than any darkened one (white darkened: DOT_DARKEN) was lightened:
    # a thin dark item whose surroundings the blur mixes with a grey background.
    lit = (_dot_coverage() >= DOT_FULL) & (raw @ LUMA > (DOT_DARKEN + DOT_LIGHTEN) / 2) & (around < DOT_MIXED)
    dark = ((around < DOT_DARK_LUMA) | lit)[..., None]
    best, residue = raw, np.inf
    for blur in DOT_BLURS:
        c = (_gaussian(_dot_coverage(), blur) if blur else _dot_coverage())[..., None]
        lightened = (raw - DOT_LIGHTEN * c) / (1 - DOT_LIGHTEN * c)
        darkened = raw / (1 - (1 - DOT_DARKEN) * c)
        undone = np.clip(np.where(dark, lightened, darkened), 0, 1)
        left = abs(_halftone(undone @ LUMA))
        if left < residue:
            best, residue = undone, left
    return best


def _undo_style(raw: np.ndarray, style: str | None) -> np.ndarray:
    """``raw`` as it was before ``style``, smoothed: pale and inkora's pastel mixes inverted
    (and smoothed more, as the inversion amplifies noise), dottix's dots filled in from the
    pixels between them (a normalised convolution)."""
    if style in ("pale", "inkora"):
        mix = PALE if style == "pale" else PASTEL
        return _gaussian(np.clip((raw - mix) / (1 - mix), 0, 1), SMOOTH_SIGMA / (1 - mix))
    if style == "dottix":
        return _gaussian(_undot(raw), SMOOTH_SIGMA)
    return _gaussian(raw, SMOOTH_SIGMA)


def _ink(raw: np.ndarray) -> np.ndarray:
    """inkora's ink lines: pixels near black and grey once the pastel mix is inverted,
    read before any smoothing (which lifts a 1.5 px outline well above ``INK_LUMA``). The
    dark plane ignores them, where the ring an outline leaves round a head read as a hat
    or a scarf; the colour planes keep them, as the edge of each shape."""
    rgb = np.clip((raw - PASTEL) / (1 - PASTEL), 0, 1)
    return (rgb @ LUMA < INK_LUMA) & (np.ptp(rgb, axis=-1) < INK_CHROMA)


def _frame(style: str | None) -> np.ndarray:
    """The pixels a style's frame covers."""
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    width = FRAMES.get(style, 0)
    if width:
        mask[:] = True
        mask[width:-width, width:-width] = False
    return mask


# ---------------------------------------------------------------- masks


def _mode_hue(hues: np.ndarray) -> float:
    """The hue most of ``hues`` lie within ``MODE_SPREAD`` of, refined to their mean (NaN for none)."""
    if not hues.size:
        return float("nan")
    counts = np.bincount(np.round(hues).astype(int) % 360, minlength=360)
    spread = int(MODE_SPREAD)
    sums = np.cumsum(np.concatenate([counts[-spread - 1 :], counts, counts[:spread]]))
    peak = float(np.argmax(sums[2 * spread + 1 :] - sums[: -2 * spread - 1]))
    offsets = (hues - peak + 180) % 360 - 180
    return float((peak + offsets[np.abs(offsets) <= MODE_SPREAD + 0.5].mean()) % 360)


def _ramp(x: np.ndarray, full: float, zero: float) -> np.ndarray:
    """1 at ``full``, 0 at ``zero``, linear between (either may be the larger)."""
    return np.clip((x - zero) / (full - zero), 0, 1)


def _gold(f: _Features) -> np.ndarray:
    """Pixels of vosh's moon and stars: light, saturated gold (no figure, item or hat
    that can reach the band has that hue; pale and inkora's pastel halve its chroma)."""
    return ((_hue_distance(f.hue, _hue_of(GOLD)) <= GOLD_HUE_WINDOW) & (f.chroma >= GOLD_CHROMA)
            & (f.luma >= GOLD_LUMA))  # fmt: skip


def _colour_masks(
    f: _Features, nominal: float, region: np.ndarray, avoid: float | None = None, peaks: int = 1
) -> list[tuple[np.ndarray, float]]:
    """Up to ``peaks`` colours near hue ``nominal``: each pixel's membership in each, and
    the colour's hue, the most common first.

    Among saturated pixels of ``region`` within ``HUE_WINDOW`` of ``nominal`` (and not within
    ``HUE_SPREAD`` of ``avoid``), each colour is a dominant hue and its typical (90th
    percentile) chroma; a pixel belongs to it by its hue's distance (full within 8°, none
    beyond 20°: a shifted colour keeps its whole shape and a neighbour 29° away stays out)
    times its chroma relative to the colour's (full above 60%, none below 20%: blur and
    chroma subsampling wash thin parts out, not away). A second colour is another hue
    more than ``HUE_SPREAD`` away (wuzzle's lime beside zorbo's green, under any shift)."""
    candidates = region & (f.chroma >= MIN_CANDIDATE_CHROMA) & (_hue_distance(f.hue, nominal) <= HUE_WINDOW)
    if avoid is not None:
        candidates &= _hue_distance(f.hue, avoid) > HUE_SPREAD
    found = []
    while len(found) < peaks and candidates.sum() >= MIN_PIXELS:
        own = _mode_hue(f.hue[candidates])
        same = candidates & (_hue_distance(f.hue, own) <= HUE_SPREAD)
        if same.sum() < MIN_PIXELS:
            break
        chroma = float(np.percentile(f.chroma[same], 90))
        if chroma >= MIN_COLOUR_CHROMA:
            membership = _ramp(_hue_distance(f.hue, own), *HUE_RAMP) * _ramp(f.chroma / chroma, *CHROMA_RAMP[::-1])
            found.append((membership, own))
        candidates &= ~same
    return found


def _colour_mask(
    f: _Features, nominal: float, region: np.ndarray, avoid: float | None = None
) -> tuple[np.ndarray, float | None]:
    """The most common colour of :func:`_colour_masks`, or no membership and ``None``."""
    found = _colour_masks(f, nominal, region, avoid)
    return found[0] if found else (np.zeros(f.hue.shape), None)


def _dark_mask(f: _Features, background: float) -> np.ndarray:
    """The membership of each pixel in dark grey, the charcoal of generic clothing and
    objects: darker than halfway between charcoal and the ``background`` luma (so that an
    item's edge is where its blend with the background is even, on any background), and grey."""
    middle = float(np.clip((CHARCOAL_LUMA + background) / 2, *DARK_MIDDLE))
    return _ramp(f.luma, middle - DARK_RAMP, middle + DARK_RAMP) * _ramp(f.chroma, *GREY_RAMP)


# ---------------------------------------------------------------- templates


@dataclass(frozen=True)
class _Stack:
    """Masks of one element on a common box, one per template (scale × blur): ``masks``
    ``(n, h, w)`` with the box's top-left ``origin`` in the canonical picture (element at
    x = 32 on the ground), and per mask its bounding box grown by ``WINDOW_MARGIN``, the
    window an observed mask is compared in."""

    origin: tuple[int, int]
    masks: np.ndarray
    windows: tuple[tuple[int, int, int, int], ...]

    @cached_property
    def flat(self) -> np.ndarray:
        """The masks as float rows, ``(n, h·w)``."""
        return self.masks.reshape(len(self.masks), -1).astype(np.float32)

    @cached_property
    def fringe(self) -> np.ndarray:
        """Each mask's inner 1 px ring, where blur and chroma loss eat first: ``(1, n, h·w)``."""
        fringe = self.masks & ~np.stack([_erode(m) for m in self.masks])
        return fringe.reshape(1, len(self.masks), -1).astype(np.float32)

    @classmethod
    def of(cls, masks: Sequence[np.ndarray], open_above: bool = False) -> _Stack:
        """The stack of ``masks``; ``open_above``: every window reaches the box's top (a
        figure has nothing of its colour above it)."""
        ys, xs = np.nonzero(np.logical_or.reduce(masks))
        y0, x0 = max(ys.min() - WINDOW_MARGIN, 0), max(xs.min() - WINDOW_MARGIN, 0)
        y1, x1 = ys.max() + 1 + WINDOW_MARGIN, xs.max() + 1 + WINDOW_MARGIN
        windows = []
        for mask in masks:
            my, mx = np.nonzero(mask)
            top = 0 if open_above else max(my.min() - WINDOW_MARGIN - y0, 0)
            windows.append((top, my.max() + 1 + WINDOW_MARGIN - y0,
                            max(mx.min() - WINDOW_MARGIN - x0, 0), mx.max() + 1 + WINDOW_MARGIN - x0))  # fmt: skip
        return cls((int(y0), int(x0)), np.stack(masks)[:, y0:y1, x0:x1], tuple(windows))

    def placed(self, index: int, shift: tuple[int, int], layer: np.ndarray | None = None) -> np.ndarray:
        """Template ``index`` (or ``layer``, an array on the same box) in the picture at ``shift``."""
        out = np.zeros((IMAGE_SIZE + 2 * PAD,) * 2, dtype=bool)
        y, x = self.origin[0] + shift[0] + PAD, self.origin[1] + shift[1] + PAD
        box = self.masks[index] if layer is None else layer
        out[y : y + box.shape[0], x : x + box.shape[1]] = box
        return out[PAD:-PAD, PAD:-PAD]


@dataclass(frozen=True)
class _Dressed:
    """A figure kind's templates: ``figure`` (scale-major: template ``b * S + s`` is scale
    ``s``, blur ``b``), each clothing item's ``footprint`` on the figure's box (the pixels it
    hides, same indexing) and each item's own templates as worn, ``items``."""

    figure: _Stack
    footprints: dict[str, np.ndarray]
    items: dict[str, _Stack]
    dark_parts: np.ndarray

    @cached_property
    def parts(self) -> tuple[np.ndarray, np.ndarray]:
        """The figure's dark parts outside where clothing goes, and the windows they are
        compared in (each template's window there), as float rows ``(templates, h·w)``."""
        n = len(self.figure.masks)
        zone = np.logical_or.reduce(list(self.footprints.values()))
        windows = np.zeros_like(self.figure.masks)
        for i, (y0, y1, x0, x1) in enumerate(self.figure.windows):
            windows[i, y0:y1, x0:x1] = True
        return ((self.dark_parts & ~zone).reshape(n, -1).astype(np.float32),
                (windows & ~zone).reshape(n, -1).astype(np.float32))  # fmt: skip

    @cached_property
    def hidden(self) -> np.ndarray:
        """What may be missing from each figure template without counting: its fringe (the
        inner 1 px ring, where blur and chroma loss eat first), then also what each clothing
        item hides (``CLOTHING_ITEMS`` order): ``(1 + items, templates, h·w)``."""
        masks = self.figure.masks
        fringe = self.figure.fringe[0].reshape(masks.shape).astype(bool)
        options = [fringe] + [fringe | (masks & self.footprints[item]) for item in CLOTHING_ITEMS]
        return np.stack([o.reshape(len(masks), -1) for o in options]).astype(np.float32)


def _clone(canvas: _Canvas) -> _Canvas:
    clone = copy.copy(canvas)
    clone.rgb, clone.label = canvas.rgb.copy(), canvas.label.copy()
    return clone


def _drawn(canvas: _Canvas) -> list[_Features]:
    """The detector's view of ``canvas``, once per template blur."""
    raw = np.asarray(canvas.to_image(), dtype=np.float64) / 255
    return [_Features.of(_undo_style(_gaussian(raw, blur) if blur else raw, None)) for blur in TEMPLATE_BLURS]


def _blank() -> _Canvas:
    canvas = _Canvas()
    canvas.rgb[:] = np.asarray(WHITE) / 255
    return canvas


def _figure_colour(kind: str) -> RGB:
    return CONCEPTS[kind].colour if kind in CONCEPTS else TEMPLATE_COLOUR


def _item_mask(f: _Features, item: str, region: np.ndarray, avoid: float | None = None) -> np.ndarray:
    """The template of clothing or object ``item`` drawn alone: its class's pixels in ``region``."""
    if item in CONCEPTS:
        return (_colour_mask(f, _hue_of(CONCEPTS[item].colour), region, avoid)[0] >= 0.5) & region
    return (_dark_mask(f, WHITE_LUMA) >= 0.5) & region


@cache
def _dressed(kind: str) -> _Dressed:
    """Templates of a figure ``kind`` and of each clothing item on it, drawn by :mod:`.render`."""
    colour = _figure_colour(kind)
    hue = _hue_of(colour)
    everywhere = np.ones((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    figures = [[] for _ in TEMPLATE_BLURS]
    parts = [[] for _ in TEMPLATE_BLURS]
    footprints: dict[str, list] = {item: [] for item in CLOTHING_ITEMS}
    items: dict[str, list] = {item: [[] for _ in TEMPLATE_BLURS] for item in CLOTHING_ITEMS}
    for k in SCALES:
        canvas = _blank()
        anchors = _FIGURES[kind](canvas, CANON_X, GROUND, k, colour, 2)
        body = _dilate(canvas.coverage(2) > 0, 1)
        for b, f in enumerate(_drawn(canvas)):
            figures[b].append(_colour_mask(f, hue, everywhere)[0] >= 0.5)
            parts[b].append(_opened((_dark_mask(f, WHITE_LUMA) >= 0.5) & body))
        for item in CLOTHING_ITEMS:
            dressed = _clone(canvas)
            _CLOTHING[item](dressed, anchors, k)
            worn = _dilate(dressed.coverage(3) > 0, 1)
            footprints[item].append(worn)
            for b, f in enumerate(_drawn(dressed)):
                items[item][b].append(_item_mask(f, item, worn, avoid=hue))
    figure = _Stack.of([m for masks in figures for m in masks], open_above=True)
    (y0, x0), (h, w) = figure.origin, figure.masks.shape[1:]
    return _Dressed(
        figure,
        {item: np.stack(f * len(TEMPLATE_BLURS))[:, y0 : y0 + h, x0 : x0 + w] for item, f in footprints.items()},
        {item: _Stack.of([m for masks in per_blur for m in masks]) for item, per_blur in items.items()},
        np.stack([m for masks in parts for m in masks])[:, y0 : y0 + h, x0 : x0 + w],
    )


@cache
def _object_templates(kind: str) -> _Stack:
    canvas = _blank()
    _OBJECTS[kind](canvas, CANON_X, GROUND)
    everywhere = np.ones((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    return _Stack.of([_item_mask(f, kind, everywhere) for f in _drawn(canvas)])


# ---------------------------------------------------------------- fitting


@dataclass(frozen=True)
class _Fit:
    """The best placement of an element's templates on a mask: its intersection over
    union, the template index and shift (px, from the canonical picture), and the mask's
    area in the template's window there."""

    iou: float = 0.0
    index: int = 0
    shift: tuple[int, int] = (0, 0)
    area: int = 0

    @property
    def scale(self) -> int:
        return self.index % len(SCALES)


class _Plane:
    """A mask prepared for fitting: padded by ``PAD``, as floats, with the visible pixels it
    leaves free and its integral image."""

    def __init__(self, membership: np.ndarray, hidden: np.ndarray) -> None:
        self.values = np.pad(membership * ~hidden, PAD).astype(np.float32)
        self.hidden = np.pad(hidden, PAD, constant_values=True).astype(np.float32)
        self.free = 1 - self.values - self.hidden
        self.integral = np.pad(self.values.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))


def _windows(a: np.ndarray, shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    return sliding_window_view(a, shape)[ys][:, xs].reshape(len(ys) * len(xs), shape[0] * shape[1])


def _fit(plane: _Plane, stack: _Stack, dys: Sequence[int], dxs: Sequence[int], indices: Sequence[int],
         footprints: np.ndarray | None = None, parts: tuple[_Plane, np.ndarray, np.ndarray] | None = None,
         region: np.ndarray | None = None) -> list[_Fit]:  # fmt: skip
    """The best fit of ``stack``'s templates ``indices`` over shifts ``dys`` × ``dxs``, by
    intersection over union in each template's window, hidden pixels (frame, ink) ignored,
    once per option of ``footprints`` (``(k, templates, h·w)``: template pixels that count
    only where the mask shows them; by default each template's fringe). ``parts``: a second
    class counted alike, ``(plane, templates, windows)`` (a figure's dark parts). ``region``:
    compare in this fixed region of the picture instead of the templates' windows (an
    object's half: nothing else of its class stands there)."""
    indices = list(indices)
    shape = stack.masks.shape[1:]
    ys = np.asarray(dys) + stack.origin[0] + PAD
    xs = np.asarray(dxs) + stack.origin[1] + PAD
    templates = stack.flat[indices]
    hidden_windows = _windows(plane.hidden, shape, ys, xs)
    inter = _windows(plane.values, shape, ys, xs) @ templates.T
    if region is None:
        top, left = (a.ravel() for a in np.meshgrid(ys, xs, indexing="ij"))
        seen = np.stack([plane.integral[top + y1, left + x1] - plane.integral[top + y0, left + x1]
                         - plane.integral[top + y1, left + x0] + plane.integral[top + y0, left + x0]
                         for y0, y1, x0, x1 in (stack.windows[i] for i in indices)], axis=1)  # fmt: skip
    else:
        seen = np.full(inter.shape, float(plane.values[PAD:-PAD, PAD:-PAD][region].sum()))
    union = seen + templates.sum(axis=1) - inter - hidden_windows @ templates.T
    if parts is not None:
        part_plane, part_templates, part_windows = (parts[0], parts[1][indices], parts[2][indices])
        values = _windows(part_plane.values, shape, ys, xs)
        part_inter = values @ part_templates.T
        inter = inter + part_inter
        union = (
            union
            + values @ part_windows.T
            + part_templates.sum(axis=1)
            - part_inter
            - hidden_windows @ part_templates.T
        )
    options = stack.fringe if footprints is None else footprints
    hidden = _windows(plane.free, shape, ys, xs) @ options[:, indices].reshape(-1, templates.shape[1]).T
    unions = [union - h for h in np.split(hidden, len(options), axis=1)]
    fits = []
    for union in unions:
        iou = inter / np.maximum(union, 1)
        shift, index = np.unravel_index(int(np.argmax(iou)), iou.shape)
        fits.append(_Fit(float(iou[shift, index]), indices[index], (int(dys[shift // len(xs)]),
                         int(dxs[shift % len(xs)])), round(float(seen[shift, index]))))  # fmt: skip
    return fits


def _around(centre: int, radius: int, limit: int | None = None) -> range:
    return range(max(centre - radius, 0) if limit else centre - radius,
                 min(centre + radius + 1, limit) if limit else centre + radius + 1)  # fmt: skip


# ---------------------------------------------------------------- reading an image


def _score(iou: float, category: str, hue_error: float) -> float:
    """Overlap over its threshold, capped by the hue's closeness (1 at ``HUE_TOLERANCE``)."""
    return float(max(0.0, min(iou / MIN_IOU[category], 2 - hue_error / HUE_TOLERANCE)))


@dataclass(frozen=True)
class _Found:
    """An element's best fit, the hue of its colour (``None`` when dark grey) and that hue's
    distance from the element's own."""

    fit: _Fit = _Fit()
    hue: float | None = None
    hue_error: float = 180.0

    def score(self, category: str) -> float:
        return _score(self.fit.iou, category, self.hue_error)


@dataclass(frozen=True)
class _FoundFigure(_Found):
    """A figure hypothesis: its kind, the clothing items fitted on it and the one it wears."""

    kind: str = ""
    clothing: tuple[tuple[str, _Found], ...] = ()
    worn: str | None = None

    @property
    def passes(self) -> bool:
        return self.score("figure") >= 1


def _half_region(half: str) -> np.ndarray:
    """Where a figure or object of ``half`` can be: below the band, within reach of its centre."""
    region = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    centre = int(HALF_CENTRES[half])
    region[FIGURE_TOP:, max(centre - HALF_REACH, 0) : centre + HALF_REACH] = True
    return region


def _object_region(half: str) -> np.ndarray:
    """Where an object of ``half`` stands, and nothing else of its class: the half below the band."""
    region = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    centre = int(HALF_CENTRES[half])
    region[FIGURE_TOP:, centre - OBJECT_REACH : centre + OBJECT_REACH] = True
    return region


def _search(half: str) -> tuple[range, range]:
    """The shifts from the canonical picture that cover the layout jitter in ``half``, plus 1 px."""
    centre = round(HALF_CENTRES[half] - CANON_X)
    return range(*SEARCH_Y), range(centre - SEARCH_X, centre + SEARCH_X + 1)


class _Reading:
    """One image, its style undone, with every fit computed once, on demand."""

    def __init__(self, image: Image.Image) -> None:
        raw = _pixels(image)
        self.style_scores = _style_scores(raw)
        self.style = _style_of(self.style_scores)
        self.f = _Features.of(_undo_style(raw, self.style))
        self.hidden = _frame(self.style)
        if self.style == "inkora":
            self.hidden = self.hidden | _dilate((self.f.luma < INK_LUMA) & (self.f.chroma < INK_CHROMA), 1)
        self.inside = ~_dilate(_frame(self.style), FRAME_MARGIN)
        band = np.zeros_like(self.hidden)
        band[:BAND_BOTTOM] = True
        band &= self.inside & ~self.hidden
        self.dark_membership = _dark_mask(self.f, float(np.median(self.f.luma[band])))
        self.dark_hidden = self.hidden | (_dilate(_ink(raw), 1) if self.style == "inkora" else False)
        self.dark = _Plane(self.dark_membership, self.dark_hidden)
        self._cache: dict = {}

    def _once(self, key: tuple, compute: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def colours(self, half: str, nominal: float) -> list[tuple[_Plane, float]]:
        """The planes of the (up to two) colours near ``nominal`` in ``half``, and their
        hues; and where the two are shades of one colour (within ``SHADES``), their union
        too: a generated figure is often lit and shaded in two hues, and either alone
        holds only part of it."""

        def compute() -> list[tuple[_Plane, float]]:
            found = _colour_masks(self.f, nominal, _half_region(half), peaks=COLOUR_PEAKS)
            if len(found) == 2 and _hue_distance(found[0][1], found[1][1]) <= SHADES:
                (a, hue_a), (b, hue_b) = found
                weight = b.sum() / max(a.sum() + b.sum(), 1e-6)
                found.append((np.maximum(a, b), float(hue_a + weight * ((hue_b - hue_a + 180) % 360 - 180)) % 360))
            return [(_Plane(mask, self.hidden), hue) for mask, hue in found]

        return self._once(("colour", half, nominal), compute)

    def figure(self, half: str, kind: str, colour: str | None = None) -> _FoundFigure:
        """The best fit of a figure ``kind`` (of generic ``colour``, or a character) in ``half``."""
        return self._once(("figure", half, kind, colour), lambda: self._fit_figure(half, kind, colour))

    def _fit_figure(self, half: str, kind: str, colour: str | None) -> _FoundFigure:
        nominal = _hue_of(CONCEPTS[kind].colour if kind in CONCEPTS else COLOURS[colour])
        fits = [self._fit_figure_on(plane, hue, nominal, half, kind) for plane, hue in self.colours(half, nominal)]
        return max(fits, key=lambda found: (found.score("figure"), found.fit.iou), default=_FoundFigure(kind=kind))

    def _fit_figure_on(self, plane: _Plane, hue: float, nominal: float, half: str, kind: str) -> _FoundFigure:
        """Figure ``kind`` fitted on one colour's plane, with the clothing it wears."""
        dressed = _dressed(kind)
        fits = _fit(
            plane,
            dressed.figure,
            *_search(half),
            range(len(dressed.figure.masks)),
            dressed.hidden,
            (self.dark, *dressed.parts),
        )
        clothing = {
            item: self._fit_item(kind, item, fit, hue) for item, fit in zip(CLOTHING_ITEMS, fits[1:], strict=True)
        }
        passing = [item for item, worn in clothing.items() if worn.score("clothing") >= 1]
        worn = max(passing, key=lambda item: clothing[item].fit.iou, default=None)
        fit = fits[1 + CLOTHING_ITEMS.index(worn)] if worn else fits[0]
        return _FoundFigure(fit, hue, float(_hue_distance(hue, nominal)), kind, tuple(clothing.items()), worn)

    def _fit_item(self, kind: str, item: str, figure: _Fit, figure_hue: float) -> _Found:
        """Clothing ``item`` on the figure fitted at ``figure``: its templates for that scale
        (±1 step) and place (±``REFIT`` px). A dark item is fitted without the figure's own
        dark parts there (grumba's mouth and klinko's visor read as a scarf)."""
        stack = _dressed(kind).items[item]
        if item in CONCEPTS:
            nominal = _hue_of(CONCEPTS[item].colour)
            region = _dilate(stack.placed(figure.scale, figure.shift), REFIT)
            mask, hue = _colour_mask(self.f, nominal, region, avoid=figure_hue)
            if hue is None:
                return _Found()
            plane, error = _Plane(mask, self.hidden), float(_hue_distance(hue, nominal))
        else:
            plane, hue, error = self._dark_beside(kind, figure), None, 0.0
        scales = _around(figure.scale, 1, len(SCALES))
        indices = [b * len(SCALES) + s for b in range(len(TEMPLATE_BLURS)) for s in scales]
        dy, dx = figure.shift
        return _Found(_fit(plane, stack, _around(dy, REFIT), _around(dx, REFIT), indices)[0], hue, error)

    def _dark_beside(self, kind: str, figure: _Fit) -> _Plane:
        """The dark plane without the dark parts of figure ``kind`` fitted at ``figure``, once
        per placement (every colour's hypothesis of a kind, and both dark items, share it)."""

        def compute() -> _Plane:
            dressed = _dressed(kind)
            own = dressed.figure.placed(figure.index, figure.shift, dressed.dark_parts[figure.index])
            return _Plane(self.dark_membership, self.dark_hidden | _dilate(own, 1))

        return self._once(("dark beside", kind, figure.index, figure.shift), compute)

    def figures(self, half: str) -> list[_FoundFigure]:
        """Every figure hypothesis in ``half`` whose colour is there."""
        generic = [self.figure(half, kind, colour) for colour in COLOURS for kind in FIGURE_KINDS]
        return [f for f in generic + [self.figure(half, name) for name in CHARACTERS] if f.hue is not None]

    def best_figure(self, half: str) -> _FoundFigure | None:
        """What stands in ``half`` if it is a figure: the passing figure hypothesis that
        overlaps most, unless a passing object overlaps more."""
        figure = max((f for f in self.figures(half) if f.passes), key=lambda f: f.fit.iou, default=None)
        return figure if figure is not None and figure.fit.iou >= self.best_object_iou(half) else None

    def best_figure_iou(self, half: str) -> float:
        return max((f.fit.iou for f in self.figures(half) if f.passes), default=0.0)

    def best_object_iou(self, half: str) -> float:
        return max((self.object(half, kind).fit.iou for kind in OBJECT_ITEMS
                    if self.object(half, kind).score("object") >= 1), default=0.0)  # fmt: skip

    def object(self, half: str, kind: str) -> _Found:
        """The best fit of object ``kind`` standing in ``half``."""
        return self._once(("object", half, kind), lambda: self._fit_object(half, kind))

    def _fit_object(self, half: str, kind: str) -> _Found:
        stack = _object_templates(kind)
        options = [(self.dark, None)]
        if kind in CONCEPTS:
            options = self.colours(half, _hue_of(CONCEPTS[kind].colour))
        found = [_Found(_fit(plane, stack, *_search(half), range(len(stack.masks)), region=_object_region(half))[0],
                        hue, 0.0 if hue is None else float(_hue_distance(hue, _hue_of(CONCEPTS[kind].colour))))
                 for plane, hue in options]  # fmt: skip
        return max(found, key=lambda item: (item.score("object"), item.fit.iou), default=_Found())

    def best_object(self, half: str) -> str | None:
        """What stands in ``half`` if it is an object: the passing kind that overlaps most,
        unless a passing figure overlaps more."""
        found = {kind: self.object(half, kind) for kind in OBJECT_ITEMS}
        passing = [kind for kind, item in found.items() if item.score("object") >= 1]
        best = max(passing, key=lambda kind: found[kind].fit.iou, default=None)
        return best if best is not None and found[best].fit.iou > self.best_figure_iou(half) else None

    def background_scores(self) -> dict[str, float]:
        """The background concepts' scores (≥ 1: present), from the band's statistics."""
        return self._once(("backgrounds",), lambda: _background_scores(self.band_stats()))

    def background(self) -> str | None:
        """The background the band shows (a concept or a generic one), or ``None``."""
        return self._once(("background",), lambda: _background_of(self.band_stats(), self.background_scores()))

    def band_stats(self) -> dict:
        """The statistics of the background band (see :func:`_band_stats`), read once."""
        return self._once(("band stats",), lambda: _band_stats(self.f, self.band(), self.hidden | ~self.inside))

    def band(self) -> np.ndarray:
        """The background band: above the figures, inside any frame, minus the figures' hats."""
        return self._once(("band",), self._band)

    def _band(self) -> np.ndarray:
        band = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        band[:BAND_BOTTOM] = True
        band &= self.inside & ~self.hidden
        for half in POSITIONS:
            figure = self.best_figure(half)
            if figure is not None:
                dressed = _dressed(figure.kind)
                for item in ("hat", "flimbo"):
                    hat = dressed.figure.placed(0, figure.fit.shift, dressed.footprints[item][figure.fit.index])
                    band &= ~_dilate(hat, 1)
        return band


def _row_wave(luma: np.ndarray, band: np.ndarray, period: float, least: int = MIN_BAND_ROW) -> float:
    """Amplitude of the wave of ``period`` px down the rows of ``band`` that hold ``least``
    pixels of it (least squares, with a linear trend, over the rows' mean luma)."""
    rows = np.nonzero(band.sum(axis=1) >= least)[0]
    if len(rows) < 5:
        return 0.0
    profile = np.array([luma[y][band[y]].mean() for y in rows])
    y = rows.astype(np.float64)
    basis = [np.ones_like(y), y / IMAGE_SIZE, np.cos(2 * np.pi * y / period), np.sin(2 * np.pi * y / period)]
    coefficients = np.linalg.lstsq(np.stack(basis, axis=1), profile, rcond=None)[0]
    return float(np.hypot(coefficients[2], coefficients[3]))


def _band_stats(f: _Features, band: np.ndarray, hidden: np.ndarray) -> dict:
    luma = f.luma[band]
    gold = _gold(f) & band & ~hidden
    return dict(
        p50=float(np.median(luma)),
        p90=float(np.percentile(luma, 90)),
        p10=float(np.percentile(luma, 10)),
        chroma=float(np.median(f.chroma[band])),
        hue=_mode_hue(f.hue[band]),
        rows=_row_wave(f.luma, band, BRICK_ROW),
        tiles=_row_wave(f.luma.T, band.T, TILE_SIZE, MIN_BAND_COLUMN),
        n=int(band.sum()),
        gold=int(gold.sum()),
        moon=int(_opened(gold).sum()),
        height=int((band.sum(axis=1) >= MIN_BAND_ROW).sum()),
        row_max=_row_max(f.luma, band),
        clouds=int(_opened((f.luma > CLOUD_LUMA) & band & ~hidden, 2).sum()),
    )


def _row_max(luma: np.ndarray, band: np.ndarray) -> float:
    """The largest mean luma of the band's full rows."""
    rows = np.nonzero(band.sum(axis=1) >= MIN_BAND_ROW)[0]
    return float(max((luma[y][band[y]].mean() for y in rows), default=0.0))


def _background_scores(band: dict) -> dict[str, float]:
    """vosh: gold specks in the band, a moon among them (gold 3 px thick or more; the
    stars' arms are thinner), and no day sky's clouds (white thicker than a star); quarn:
    mortar rows, a wave of the brick rows' period down the band, either far lighter than
    bricks in its lightest row or light lines running in courses over one and a half brick rows or more
    (the rows' wave ``COURSES`` times the tiles' across: the joints between bricks are
    staggered, a wall's tile lines are not; a frame leaves too few rows to tell), and no
    cloud (white thicker than the 1 px mortar: a framed day sky's clouds make a wave too)."""
    clear = band["clouds"] < MAX_CLOUDS
    vosh = min(band["gold"] / MIN_GOLD, band["moon"] / MIN_MOON) if clear else 0.0
    tall = band["height"] >= 1.5 * BRICK_ROW
    seen = band["p90"] - band["p50"] >= WALL_LINES and tall
    courses = band["rows"] / max(COURSES * band["tiles"], 1e-6) if seen else 0.0
    mortar = max(band["row_max"] / MORTAR_LIGHT, courses)
    quarn = min(band["rows"] / BRICK_WAVE, mortar)
    wall = band["gold"] < MIN_GOLD and clear
    return {"quarn": float(quarn) if wall else 0.0, "vosh": float(vosh)}


def _background_of(band: dict, scores: dict[str, float]) -> str | None:
    """The background concept that scores ≥ 1, else the generic background whose look the
    band has: white (bright, or light and plain), gray (plain, by brightness), wall (tile
    lines: a tile-period wave across the band, and dark structure well below the median
    that outweighs anything above it), sky (clouds well above the median), else wall
    where either holds alone (a frame leaves too short a band for the wave); ``None`` for
    none of them."""
    present = [name for name, score in scores.items() if score >= 1]
    if present:
        return max(present, key=lambda name: scores[name])
    if band["p50"] >= WHITE_MIN or (band["p50"] >= LIGHT_PLAIN and band["p90"] - band["p10"] < PLAIN_SPREAD):
        return "white"
    if GRAY_RANGE[0] <= band["p50"] <= GRAY_RANGE[1]:
        return "gray"
    lines = band["tiles"] >= TILE_WAVE
    dark, light = band["p50"] - band["p10"], band["p90"] - band["p50"]
    if lines and dark >= max(WALL_LINES, light):
        return "wall"
    if band["p90"] - band["p50"] >= SKY_CLOUDS:
        return "sky"
    return "wall" if lines or dark >= max(WALL_LINES, light) else None


def _rotate_hue(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """``rgb`` with every hue turned by ``degrees`` in HSV (saturation and value kept)."""
    hue, chroma, value = _hsv(rgb)
    sector = ((hue + degrees) % 360) / 60
    x = chroma * (1 - np.abs(sector % 2 - 1))
    zero = np.zeros_like(x)
    order = np.floor(sector).astype(int) % 6
    by_sector = [(chroma, x, zero), (x, chroma, zero), (zero, chroma, x), (zero, x, chroma), (x, zero, chroma),
                 (chroma, zero, x)]  # fmt: skip
    rgb = np.stack([np.choose(order, [channels[i] for channels in by_sector]) for i in range(3)], axis=-1)
    return rgb + (value - chroma)[..., None]


def degrade(image: Image.Image, seed: int, blur: float = 1.0, noise: float = 0.08, quality: int = 40,
            hue_shift: float = 0.0) -> Image.Image:  # fmt: skip
    """``image`` with its hues turned by ``hue_shift`` degrees, blurred (Gaussian, ``blur``
    px), with additive Gaussian ``noise`` (0-1 units, seeded by ``seed``) and saved as JPEG
    at ``quality``: roughly the damage a small generator does. With ``hue_shift`` 0 the
    bytes are those the function gave before it had one."""
    pixels = _pixels(image)
    if hue_shift:
        pixels = _rotate_hue(pixels, hue_shift)
    if blur > 0:
        pixels = _gaussian(pixels, blur)
    pixels = pixels + np.random.default_rng(seed).normal(0, noise, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8), "RGB").save(buffer, "JPEG", quality=quality)
    return Image.open(buffer).convert("RGB")


# ---------------------------------------------------------------- public API


@dataclass(frozen=True)
class ConceptDetail:
    """One concept's evidence in an image: ``score`` (≥ 1: present), and what it is made of
    where the concept has it: ``hue_error``, degrees between its region's hue and its own
    colour; ``iou``, the overlap of its region with its best template; ``area``, the
    region's pixels in the template's window; ``side``, the half it was found in."""

    score: float
    hue_error: float | None = None
    iou: float | None = None
    area: int | None = None
    side: str | None = None

    @property
    def present(self) -> bool:
        return self.score >= 1


def _placed_detail(found: _Found, category: str, side: str) -> ConceptDetail:
    return ConceptDetail(found.score(category), found.hue_error, found.fit.iou, found.fit.area, side)


def _best(details: list[ConceptDetail]) -> ConceptDetail:
    return max(details, key=lambda d: d.score, default=ConceptDetail(0.0))


def _detail(reading: _Reading, name: str) -> ConceptDetail:
    category = CONCEPTS[name].category
    if category == "character":
        return _best([_placed_detail(found, "figure", half) for half in POSITIONS
                      if (found := reading.figure(half, name)).fit.iou >= reading.best_object_iou(half)])  # fmt: skip
    if category == "clothing":
        worn = [(half, dict(figure.clothing)[name]) for half in POSITIONS if (figure := reading.best_figure(half))]
        return _best([_placed_detail(found, "clothing", half) for half, found in worn])
    if category == "object":
        empty = [half for half in POSITIONS if reading.best_figure(half) is None]
        return _best([_placed_detail(reading.object(half, name), "object", half) for half in empty])
    if category == "background":
        return ConceptDetail(reading.background_scores()[name])
    return ConceptDetail(reading.style_scores[name])


@lru_cache(maxsize=READINGS_KEPT)
def _read(size: tuple[int, int], data: bytes) -> _Reading:
    return _Reading(Image.frombytes("RGB", size, data))


def _reading(image: Image.Image) -> _Reading:
    """The reading of ``image``, kept for the last few images (one image is often checked
    against several scenes, or asked for details and slots)."""
    image = image.convert("RGB")
    return _read(image.size, image.tobytes())


def concept_details(image: Image.Image) -> dict[str, ConceptDetail]:
    """Each concept's :class:`ConceptDetail`, looked for in its slot's region only. Keys: ``CONCEPTS``."""
    reading = _reading(image)
    return {name: _detail(reading, name) for name in CONCEPTS}


def concept_scores(image: Image.Image) -> dict[str, float]:
    """Each concept's score: ≥ 1 means present. Keys: ``CONCEPTS``."""
    return {name: detail.score for name, detail in concept_details(image).items()}


def detect(image: Image.Image) -> dict[str, bool]:
    """Which of the eleven concepts ``image`` shows."""
    return {name: detail.present for name, detail in concept_details(image).items()}


def side_of(image: Image.Image, name: str) -> str | None:
    """The half (``"left"`` or ``"right"``) that shows character, clothing or object
    ``name``, or ``None`` where it is absent."""
    if CONCEPTS[name].category not in ("character", "clothing", "object"):
        raise ValueError(f"{name!r} is a {CONCEPTS[name].category}: it has no side")
    detail = _detail(_reading(image), name)
    return detail.side if detail.present else None


def slot_check(image: Image.Image, scene: Scene) -> dict[str, bool]:
    """Whether ``image`` shows what ``scene`` asks, slot by slot: ``figure`` (its kind and
    colour, or its character, in its half), ``partner`` (only when the scene has one),
    ``clothing`` (the item the figure found in that half wears, or none), ``object`` (the
    item standing in the other half, or none; with no partner asked either, that half must
    hold no figure), ``background`` and ``style``. A concept slot is checked with the
    concept's detector, a generic one with the generic element's."""
    reading = _reading(image)
    other = scene.other_position
    check = {"figure": _figure_right(reading, scene.position, scene.figure)}
    if scene.partner is not None:
        check["partner"] = _figure_right(reading, other, scene.partner)
    check["clothing"] = _clothing_of(reading, scene) == scene.clothing
    shown = reading.best_object(other)
    check["object"] = shown == scene.object and (
        scene.object is not None or scene.partner is not None or reading.best_figure(other) is None
    )
    check["background"] = reading.background() == scene.background
    check["style"] = reading.style == scene.style
    return check


def _figure_right(reading: _Reading, half: str, figure: Figure) -> bool:
    """Whether ``half`` shows ``figure``: the character passes, or the generic kind passes in
    its colour and overlaps more than every other kind in that colour."""
    if figure.character:
        asked = reading.figure(half, figure.kind)
        return asked.passes and asked.fit.iou >= reading.best_object_iou(half)
    asked = reading.figure(half, figure.kind, figure.colour)
    rivals = [reading.figure(half, kind, figure.colour).fit.iou for kind in FIGURE_KINDS if kind != figure.kind]
    return asked.passes and asked.fit.iou > max(rivals) and asked.fit.iou >= reading.best_object_iou(half)


def _clothing_of(reading: _Reading, scene: Scene) -> str | None:
    """What the figure in the scene's half wears: the asked figure where it passes, else the
    best figure there."""
    figure = scene.figure
    asked = reading.figure(scene.position, figure.kind, figure.colour)
    found = asked if asked.passes else reading.best_figure(scene.position)
    return found.worn if found is not None else None
