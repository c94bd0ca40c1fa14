"""Pictures as the page shows them: small models' images enlarged without blur."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

DISPLAY_SIDE = 512


def for_display(path: str | Path, side: int = DISPLAY_SIDE) -> Path:
    """A copy of the PNG at ``path`` enlarged by a whole factor, nearest-neighbour, so
    that its longer side reaches about ``side`` px: a browser scales a 64 px picture
    smoothly into a smudge, and an artist judges pixels. The copy (``NAME.view.png``
    beside it) is for the eye only; the original, with its settings, stays the download.
    A picture already ``side`` px or more is returned as it is."""
    path = Path(path)
    with Image.open(path) as image:
        factor = side // max(image.size)
        if factor < 2:
            return path
        view = path.with_name(f"{path.stem}.view.png")
        if not view.is_file():
            image.convert("RGB").resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST).save(
                view
            )
    return view
