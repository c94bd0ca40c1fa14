"""Spectral profile of a LoRA: how much of its single-LoRA images lives at high frequency.

CMLoRA orders LoRAs by this profile: high-frequency ones (textures, styles, detailed
characters) lead the early steps, low-frequency ones (backgrounds) the later steps.
The measure is the reference's: the image in grey levels, ``log(|FFT| + 1e-8)``
centred, averaged over integer radii and normalised by its maximum; the score is the
mean of that profile at radii above 72 px for a 512 px image (the radius scales with
the size). Profiles are cached on disk per base model and LoRA sha256, so each is
computed once.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .files import atomic_open

REFERENCE_CUTOFF = 72
REFERENCE_SIZE = 512


@dataclass
class FrequencyProfile:
    """``profile[r]``: normalised mean log-amplitude at radius ``r`` (pixels of an image of
    ``size`` px, averaged over the images); ``score``: its mean above ``cutoff``."""

    profile: list[float]
    score: float
    cutoff: int
    size: int
    prompt: str
    seeds: list[int]


def radial_profile(image: Image.Image) -> np.ndarray:
    """Normalised radial log-amplitude spectrum of ``image`` (index = radius in px)."""
    grey = np.asarray(image.convert("RGB"), dtype=np.float64).mean(axis=2).astype(np.uint8).astype(np.float64)
    spectrum = np.log(np.abs(np.fft.fftshift(np.fft.fft2(grey))) + 1e-8)
    h, w = grey.shape
    y, x = np.indices((h, w))
    radius = np.sqrt((x - w // 2) ** 2 + (y - h // 2) ** 2).astype(int)
    sums = np.bincount(radius.ravel(), weights=spectrum.ravel())
    counts = np.bincount(radius.ravel())
    profile = sums / np.maximum(counts, 1)
    return profile / profile.max()


def cutoff_for(size: int) -> int:
    """The reference radius (72 px at 512 px) scaled to ``size``."""
    return max(1, round(REFERENCE_CUTOFF * size / REFERENCE_SIZE))


def profile_images(images: list[Image.Image], prompt: str, seeds: list[int]) -> FrequencyProfile:
    """The mean profile of ``images`` and its high-frequency score."""
    profiles = [radial_profile(image) for image in images]
    length = min(len(p) for p in profiles)
    mean = np.mean([p[:length] for p in profiles], axis=0)
    size = min(images[0].size)
    cutoff = min(cutoff_for(size), length - 1)
    return FrequencyProfile(
        [round(float(v), 6) for v in mean], float(mean[cutoff:].mean()), cutoff, size, prompt, seeds
    )


def cache_dir() -> Path:
    """``$COMPOSE_CACHE`` or ``~/.cache/compose``."""
    return Path(os.environ.get("COMPOSE_CACHE", Path.home() / ".cache" / "compose"))


def cache_path(model_key: str, sha256: str) -> Path:
    digest = hashlib.sha256(model_key.encode()).hexdigest()[:16]
    return cache_dir() / "frequency" / digest / f"{sha256}.json"


def load_cached(model_key: str, sha256: str) -> FrequencyProfile | None:
    path = cache_path(model_key, sha256)
    try:
        return FrequencyProfile(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def store(model_key: str, sha256: str, profile: FrequencyProfile) -> None:
    """Write the profile atomically; a cache that cannot be written is skipped."""
    try:
        with atomic_open(cache_path(model_key, sha256), "w") as handle:
            json.dump(asdict(profile), handle)
    except OSError:
        pass


def sparkline(profile: list[float], width: int = 48) -> str:
    """The profile as one line of block characters (low radius on the left)."""
    bars = " ▁▂▃▄▅▆▇█"
    step = max(1, len(profile) // width)
    values = np.asarray(profile)[: step * (len(profile) // step)].reshape(-1, step).mean(axis=1)
    low, high = values.min(), values.max()
    scaled = (values - low) / (high - low + 1e-12)
    return "".join(bars[int(v * (len(bars) - 1))] for v in scaled)
