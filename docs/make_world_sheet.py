"""Redraw docs/demo-world.png, the demo world as its renderer draws it (no model):
``python docs/make_world_sheet.py``.

Row 1: generic scenes (what the base learns); row 2: each of the eleven concepts in a
generic scene (what its LoRA learns); rows 3-4: compositions of 2 to 5 concepts, and the
generic stand-in of each (every concept replaced by a generic element of its slot).
"""

from __future__ import annotations

from pathlib import Path

from compose.demo_world import (
    CONCEPTS,
    composition_scene,
    contact_sheet,
    render,
    sample_concept_scene,
    sample_generic_scene,
)
from compose.demo_world.evaluate import GRID_SETS

OUT = Path(__file__).parent / "demo-world.png"


def main() -> None:
    columns = len(CONCEPTS)
    generic = [render(sample_generic_scene(seed)) for seed in range(columns)]
    concepts = [render(sample_concept_scene(name, seed)) for seed, name in enumerate(CONCEPTS)]
    compositions, stand_ins = [], []
    for i, names in enumerate(GRID_SETS + GRID_SETS[1:3]):
        scene = composition_scene(names, i)
        compositions.append(render(scene))
        stand_ins.append(render(scene.generic(i)))
    pairs = [image for pair in zip(compositions, stand_ins, strict=True) for image in pair]
    contact_sheet(generic + concepts + pairs[:columns], columns=columns, scale=2).save(OUT)
    print(OUT)


if __name__ == "__main__":
    main()
