"""The README's demo-world Python example runs as written, and makes what it says."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_demo_world_python_example_runs_as_written(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    example = next(b for b in blocks if 'Composer.load("demo-world")' in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert len(namespace["images"]) == 2 and namespace["images"][0].size == (64, 64)
    with Image.open(tmp_path / "zorbo.png") as image:
        text = image.text["parameters"]
    assert "<lora:zorbo:0.8>" in text and "<lora:vosh:0.8>" in text and "Composition method: composite" in text
