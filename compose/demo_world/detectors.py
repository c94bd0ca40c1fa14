"""Which concepts an image shows, from colour and layout statistics of the procedural world.

No weights: every test follows from how :mod:`.render` draws, and the thresholds sit
between what renders with and without the concept give, clean or degraded (see the
tests). Characters, clothing and objects are found by colour: after a 1 px Gaussian
smoothing (which turns additive noise into a small error), each saturated, not-dark
pixel takes the nearest hue among the world's chromatic colours (generic ones included),
and a concept is present when at least ``MIN_AREA`` pixels take its hue after a 3×3
erosion, which removes the rims where two colours blend into an in-between hue.
Backgrounds and styles are found by their patterns:

- ``dottix``: sharp spectral peaks at the 45° dot screen's frequency;
- ``inkora``: its frame, a cream ring inside a dark outer ring, on every side;
- ``quarn``: mortar rows in phase across the band above the figures, unless that band
  is night sky (whose stars and moon can fake a few rows);
- ``vosh``: a dark blue band above the figures.

:func:`concept_scores` gives each statistic over its threshold (present iff ≥ 1), for
graded use; :func:`degrade` makes the blurred, noisy, compressed copies the thresholds
are checked against.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .concepts import COLOURS, CONCEPTS, IMAGE_SIZE, PLAIN_BACKGROUNDS, RGB
from .render import DOT_PERIOD, FRAME_CREAM, FRAME_INK, LUMA, TRIANGLE_BASE, WALL_ROWS
from .scenes import Scene

SMOOTH_SIGMA = 1.0
MIN_CHROMA = 0.2
MIN_VALUE = 0.3
MIN_AREA = 20
HALFTONE_MIN = 0.0045
FRAME_MIN = 0.15
WALL_MIN = 0.03
SKY_MIN = 0.025
SKY_BAND = (slice(7, 11), slice(7, IMAGE_SIZE - 7))


def concept_scores(image: Image.Image) -> dict[str, float]:
    """Each concept's statistic over its threshold: ≥ 1 means present. Keys: ``CONCEPTS``."""
    raw = _pixels(image)
    rgb = _gaussian(raw, SMOOTH_SIGMA)
    hue, chroma, value = _hue_chroma_value(rgb)
    vivid = (chroma >= MIN_CHROMA) & (value >= MIN_VALUE)
    nearest = np.argmin([_hue_distance(hue, h) for h in _PALETTE_HUES.values()], axis=0)
    scores = {}
    for i, name in enumerate(_PALETTE_HUES):
        if name in CONCEPTS:
            band = vivid & (nearest == i)
            scores[name] = _erode(band).sum() / MIN_AREA
    scores["dottix"] = _halftone(raw @ LUMA) / HALFTONE_MIN
    scores["inkora"] = _frame(raw @ LUMA) / FRAME_MIN
    scores["vosh"] = _sky(rgb) / SKY_MIN
    scores["quarn"] = _wall(raw @ LUMA) / WALL_MIN if scores["vosh"] < 1 else 0.0
    return {name: float(scores[name]) for name in CONCEPTS}


def detect(image: Image.Image) -> dict[str, bool]:
    """Which of the eleven concepts ``image`` shows."""
    return {name: score >= 1 for name, score in concept_scores(image).items()}


def detect_generic(image: Image.Image, scene: Scene) -> dict[str, bool]:
    """Whether a generic scene's image shows what ``scene`` asks: keys ``shape``,
    ``colour``, ``position`` and ``background``, each ``True`` when it matches.

    The background is the plain colour nearest the band above the figure; the figure is
    every pixel more than half as far from it as the farthest. Its position is the side of
    its centroid, its colour the generic colour nearest in hue to its eroded core, and its
    shape the ideal silhouette that overlaps it most.
    """
    if scene.concepts():
        raise ValueError(f"detect_generic checks generic scenes, not one with {scene.concepts()}")
    rgb = _gaussian(_pixels(image), SMOOTH_SIGMA)
    background_rgb = rgb[SKY_BAND].reshape(-1, 3).mean(axis=0)
    background = _nearest(background_rgb, PLAIN_BACKGROUNDS)
    distance = np.linalg.norm(rgb - background_rgb, axis=2)
    figure = distance > max(0.15, np.percentile(distance, 99) / 2)
    found = {"background": background == scene.background}
    if figure.sum() < 20:
        return {"shape": False, "colour": False, "position": False, **found}
    ys, xs = np.nonzero(figure)
    found["position"] = ("left" if xs.mean() < IMAGE_SIZE / 2 else "right") == scene.position
    core = _erode(figure)
    hue = _hue_chroma_value(rgb[core if core.any() else figure].mean(axis=0))[0]
    found["colour"] = min(COLOURS, key=lambda c: _hue_distance(hue, _hue_of(COLOURS[c]))) == scene.colour
    found["shape"] = _shape(figure) == scene.shape
    return {key: bool(found[key]) for key in ("shape", "colour", "position", "background")}


def _shape(figure: np.ndarray) -> str:
    """The generic shape whose ideal silhouette, of the figure's area and centroid, overlaps
    the ``figure`` mask most (intersection over union); a ragged fringe barely counts."""
    ys, xs = np.nonzero(figure)
    area, cx, cy = figure.sum(), xs.mean(), ys.mean()
    y, x = np.indices(figure.shape)
    half = np.sqrt(area) / 2
    height = np.sqrt(2 * area / TRIANGLE_BASE)
    depth = (y - cy + 2 * height / 3) / height
    ideals = {
        "circle": (x - cx) ** 2 + (y - cy) ** 2 <= area / np.pi,
        "square": (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half),
        "triangle": (depth >= 0) & (depth <= 1) & (np.abs(x - cx) <= depth * TRIANGLE_BASE * height / 2),
    }
    return max(ideals, key=lambda shape: (figure & ideals[shape]).sum() / (figure | ideals[shape]).sum())


def degrade(image: Image.Image, seed: int, blur: float = 1.0, noise: float = 0.08, quality: int = 40) -> Image.Image:
    """``image`` blurred (Gaussian, ``blur`` px), with additive Gaussian ``noise`` (0-1 units,
    seeded by ``seed``) and saved as JPEG at ``quality``: roughly the damage a small
    generator does, and what the detectors' thresholds are checked against."""
    pixels = _gaussian(_pixels(image), blur) if blur > 0 else _pixels(image)
    pixels = pixels + np.random.default_rng(seed).normal(0, noise, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8), "RGB").save(buffer, "JPEG", quality=quality)
    return Image.open(buffer).convert("RGB")


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


def _hue_chroma_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees, chroma (max - min) and value (max) of RGB in [0, 1], last axis."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360
    return hue, rgb.max(axis=-1) - rgb.min(axis=-1), rgb.max(axis=-1)


def _hue_of(colour: RGB) -> float:
    return float(_hue_chroma_value(np.asarray(colour, dtype=np.float64) / 255)[0])


def _hue_distance(a: np.ndarray | float, b: float) -> np.ndarray | float:
    return np.abs((np.asarray(a) - b + 180) % 360 - 180)


def _erode(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, constant_values=False)
    out = mask.copy()
    for dy in range(3):
        for dx in range(3):
            out &= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def _nearest(rgb: np.ndarray, palette: dict[str, RGB]) -> str:
    return min(palette, key=lambda name: np.linalg.norm(rgb - np.asarray(palette[name]) / 255))


def _halftone(luma: np.ndarray) -> float:
    """Sharpness of the 45° dot screen's spectral peaks, in luma units: in each quarter of
    the inner 48 px (a whole number of periods, so the screen gives one-bin peaks), the
    amplitude at each diagonal screen frequency above the mean of the 5×5 bins around it,
    for the weaker diagonal; then the median quarter. Edges and outlines spread over many
    bins, and what happens to peak in one quarter does not in the others; the screen
    covers them all."""
    inner = luma[8:-8, 8:-8]
    half = inner.shape[0] // 2
    k = round(half / DOT_PERIOD)
    sharpness = []
    for block in (inner[i : i + half, j : j + half] for i in (0, half) for j in (0, half)):
        spectrum = np.abs(np.fft.fft2(block - block.mean())) / block.size
        peaks = [np.roll(spectrum, (2 - v, 2 - k), axis=(0, 1))[:5, :5] for v in (k, -k)]
        sharpness.append(min(p[2, 2] - (p.sum() - p[2, 2]) / 24 for p in peaks))
    return float(np.median(sharpness))


def _frame(luma: np.ndarray) -> float:
    """How much brighter the cream ring is than the ink ring outside it, on the worst side."""
    n, ink, cream = IMAGE_SIZE, FRAME_INK, FRAME_CREAM
    middle = slice(8, n - 8)
    sides = [luma, luma[::-1], luma.T, luma.T[::-1]]
    contrasts = [side[ink : ink + cream, middle].mean() - side[: ink - 1, middle].mean() for side in sides]
    return float(min(contrasts))


def _wall(luma: np.ndarray) -> float:
    """Amplitude of the mortar rows, in luma units, where only the background can be: the
    rows above the figures and objects (a hat aside), cut into six 8 px strips (one dot
    period, so the halftone screen adds the same to every strip row).

    Each strip's mean row profile is fitted (least squares) with a line plus waves at the
    wall's row period and at the halftone screen's (half the dot period), so that neither a
    gradient nor the dots leak into the wall's wave; the score is the median strip's wave
    along the strips' consensus phase, since mortar runs through every strip in phase and a
    hat does not."""
    above = luma[8:22, 8:-8]
    rows = np.arange(above.shape[0], dtype=np.float64)
    basis = [np.ones_like(rows), rows / rows.size]
    for period in (IMAGE_SIZE / WALL_ROWS, DOT_PERIOD / 2):
        basis += [np.cos(2 * np.pi * rows / period), np.sin(2 * np.pi * rows / period)]
    profiles = np.stack([strip.mean(axis=1) for strip in np.split(above, above.shape[1] // 8, axis=1)], axis=1)
    coefficients = np.linalg.lstsq(np.stack(basis, axis=1), profiles, rcond=None)[0]
    waves = coefficients[2] + 1j * coefficients[3]
    phase = np.angle((waves / (np.abs(waves) + 1e-12)).sum())
    return float(np.median((waves * np.exp(-1j * phase)).real))


def _sky(rgb: np.ndarray) -> float:
    """How much bluer than red and green the dark band above the figures is (0 when light)."""
    band = rgb[SKY_BAND].reshape(-1, 3).mean(axis=0)
    return float(band[2] - band[:2].max()) if band @ LUMA < 0.4 else 0.0


# Every chromatic colour of the world, by name: the nearest hue decides which a pixel shows.
_PALETTE_HUES = {
    **{name: _hue_of(rgb) for name, rgb in COLOURS.items()},
    **{c.name: _hue_of(c.colour) for c in CONCEPTS.values() if c.colour is not None},
}
