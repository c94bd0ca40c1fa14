"""Contact sheets: many small pictures on one, for grids people look at (the X/Y plot,
the demo world's grid and its labelling sheets)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image


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
