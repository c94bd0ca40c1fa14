"""X/Y plots (compose.xy): A1111's axis syntax, cells equal to lone generations, the labelled
grid, weight axes, and the grid PNG's settings read back."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from compose import Composer, RunOptions, SamplingConfig
from compose.files import OutputError
from compose.metadata import PARAMETERS_KEY, RecordError
from compose.tiny import tiny_pipeline, write_random_loras
from compose.xy import GAP, MIN_TILE, XY_KEY, Axis, parse_axis, read_xy, xy_plot

SIZE = 32
STEPS = 2
CHARACTER, STYLE, BACKGROUND = "random-character", "random-style", "random-background"


@pytest.fixture(scope="module")
def composer(tmp_path_factory) -> Composer:
    pipeline = tiny_pipeline("sd1")
    composer = Composer(pipeline)
    for path in write_random_loras(pipeline, tmp_path_factory.mktemp("loras")):
        composer.load_lora(path)
    return composer


def settings(**overrides) -> dict:
    return {"prompt": "zq creature, zq style", "loras": {CHARACTER: 1.0, STYLE: 0.5}, "seed": 0,
            "sampling": SamplingConfig(steps=STEPS, width=SIZE, height=SIZE), **overrides}  # fmt: skip


def record(image: Image.Image) -> dict:
    return json.loads(image.info["compose"])


@pytest.mark.parametrize(
    ("kind", "text", "values"),
    [
        ("seed", "1, 2, 3", (1, 2, 3)),
        ("steps", "1-5", (1, 2, 3, 4, 5)),
        ("steps", "5-1", (5, 4, 3, 2, 1)),
        ("seed", "1-3, 10", (1, 2, 3, 10)),
        ("seed", "0-10 (+5)", (0, 5, 10)),
        ("seed", "1-10 [4]", (1, 4, 7, 10)),
        (f"weight:{STYLE}", "0-1 (+0.25)", (0.0, 0.25, 0.5, 0.75, 1.0)),
        (f"weight:{STYLE}", "1-0 (-0.5)", (1.0, 0.5, 0.0)),
        (f"weight:{STYLE}", "-1--0.5 (+0.25)", (-1.0, -0.75, -0.5)),
        ("guidance", "0-1 [5]", (0.0, 0.25, 0.5, 0.75, 1.0)),
        ("guidance", "3, 7.5", (3.0, 7.5)),
        ("lora_scale", "0.2-0.4 (+0.1)", (0.2, 0.3, 0.4)),
        ("method", "merge, composite", ("merge", "composite")),
    ],
)
def test_parse_axis_reads_a1111_syntax(composer, kind, text, values):
    axis = parse_axis(kind, text, composer)
    assert axis == Axis(kind, values)
    assert axis.values == values
    assert all(type(a) is type(b) for a, b in zip(axis.values, values, strict=True))


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("size", "1, 2", "unknown X/Y axis 'size': choose one of method, weight:<LoRA name>, seed"),
        ("weight", "1", "unknown X/Y axis 'weight'"),
        ("seed", " , ", "seed axis: no values given"),
        ("seed", "1.5", "seed axis: '1.5' is not a whole number"),
        ("steps", "1-2.5", "steps axis: '2.5' is not a whole number"),
        ("guidance", "abc", "guidance axis: 'abc' is not a number"),
        ("seed", "-1", r"seed axis: seed must be an integer in \[0, 2\*\*64\), got -1"),
        ("steps", "0, 1", "steps axis: steps must be at least 1, got 0"),
        ("steps", "100000", "steps axis: 100000 steps is over this model's limit of 1000"),
        ("guidance", "500", "guidance axis: guidance must be between 0 and 100, got 500"),
        (f"weight:{STYLE}", "0-1 (+0)", r"weight:random-style axis: '0-1 \(\+0\)': a step of 0 never goes"),
        (f"weight:{STYLE}", "0-1 (-0.5)", "a step of -0.5 never goes from 0 to 1"),
        ("guidance", "0-1 [0]", "asks for 0 values"),
        ("method", "merge, blend", "method axis: unknown method 'blend': choose one of merge, switch, composite"),
        ("method", "1-3", "method axis: unknown method '1-3'"),
        ("weight:nobody", "1", "weight:nobody axis: no LoRA named 'nobody' is loaded"),
        ("seed", "1-17", "seed axis: 17 values is more than the 16 an axis may have .and a plot at most 64 cells"),
        ("seed", "0-1000000", "seed axis: 1000001 values is more than the 16"),
        ("guidance", "0-1 [20]", "guidance axis: 20 values is more than the 16"),
        ("seed", "1-10, 11-20", "seed axis: 20 values is more than the 16"),
    ],
)
def test_parse_axis_errors_name_the_axis_and_value(composer, kind, text, message):
    with pytest.raises(ValueError, match=message):
        parse_axis(kind, text, composer)


def test_plot_limits_are_checked_before_any_cell_runs(composer):
    x, y = Axis("seed", tuple(range(16))), Axis("steps", (1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="at most 64 cells; these axes make 16 x 5 = 80"):
        xy_plot(composer, settings(), x, y)
    with pytest.raises(ValueError, match="the X and Y axes both vary seed"):
        xy_plot(composer, settings(), Axis("seed", (1,)), Axis("seed", (2,)))
    with pytest.raises(ValueError, match="give one prompt and one seed"):
        xy_plot(composer, settings(seed=[1, 2]), Axis("steps", (1,)))
    with pytest.raises(ValueError, match="takes no callback"):
        xy_plot(composer, settings(run=RunOptions(callback=print)), Axis("steps", (1,)))
    with pytest.raises(ValueError, match="method_params belong to one method"):
        xy_plot(composer, settings(method_params={"switch_every": 2}), Axis("method", ("merge", "switch")))
    with pytest.raises(ValueError, match="sets 'random-style' with a <lora:...> tag"):
        xy_plot(composer, settings(prompt="a cat <lora:random-style:1>"), Axis(f"weight:{STYLE}", (1.0,)))
    with pytest.raises(ValueError, match="no LoRA named 'nobody'"):
        xy_plot(composer, settings(), Axis("weight:nobody", (1.0,)))


def test_a_2x3_plot_is_its_lone_generations_in_a_labelled_grid(composer):
    seen = []
    x, y = Axis("method", ("merge", "composite")), Axis("seed", (1, 2, 3))
    plot = xy_plot(composer, settings(), x, y, callback=lambda done, total, image: seen.append((done, total, image)))
    assert [(done, total) for done, total, _ in seen] == [(i, 6) for i in range(1, 7)]
    assert [image for _, _, image in seen] == [image for row in plot.cells for image in row]
    assert [len(row) for row in plot.cells] == [2, 2, 2] and np.array(plot.seconds).shape == (3, 2)
    assert all(seconds > 0 for row in plot.seconds for seconds in row)

    tile = MIN_TILE  # 32 px cells enlarged 4x
    sheet_w, sheet_h = GAP + 2 * (tile + GAP), GAP + 3 * (tile + GAP)
    left, top = plot.grid.width - sheet_w, plot.grid.height - sheet_h
    assert 20 < left < 200 and 20 < top < 100, (left, top)
    grid = np.asarray(plot.grid)
    assert (grid[:top, left:] < 128).any(), "the x labels are drawn over the columns"
    assert (grid[top:, :left] < 128).any(), "the y labels are drawn left of the rows"
    assert (grid[:top, :left] < 128).any(), "the axis names are drawn in the corner"

    for j, seed in enumerate(y.values):
        for i, method in enumerate(x.values):
            cell = plot.cells[j][i]
            alone = composer.generate(**{**settings(), "method": method, "seed": seed})[0]
            assert np.array_equal(np.asarray(cell), np.asarray(alone)), (method, seed)
            assert record(cell)["method"]["name"] == method and record(cell)["seed"] == seed
            x0, y0 = left + GAP + i * (tile + GAP), top + GAP + j * (tile + GAP)
            shown = plot.grid.crop((x0, y0, x0 + tile, y0 + tile))
            assert np.array_equal(np.asarray(shown), np.asarray(cell.resize((tile, tile), Image.Resampling.NEAREST)))


def test_a_weight_axis_changes_only_that_loras_weight(composer):
    x, y = Axis(f"weight:{STYLE}", (0.0, 0.5, 1.0)), Axis(f"weight:{BACKGROUND}", (0.25,))
    plot = xy_plot(composer, settings(), x, y)
    records = plot.records()[0]
    assert [[(e["name"], e["weight"]) for e in r["loras"]] for r in records] == [
        [(CHARACTER, 1.0), (STYLE, w), (BACKGROUND, 0.25)] for w in (0.0, 0.5, 1.0)
    ]

    def rest(r: dict) -> dict:
        return {k: v for k, v in r.items() if k != "loras"}

    assert all(rest(r) == rest(records[0]) for r in records)
    assert plot.settings["loras"] == [(CHARACTER, 1.0), (STYLE, 0.5)]


def test_save_and_read_xy_round_trip(composer, tmp_path):
    plot = xy_plot(composer, settings(), Axis("steps", (1, 2)), Axis("guidance", (1.0, 7.5)))
    path = plot.save(tmp_path / "grid.png")
    assert read_xy(path) == json.loads(json.dumps(plot.as_json()))
    with Image.open(path) as saved:
        assert saved.text[PARAMETERS_KEY] == plot.cells[0][0].info[PARAMETERS_KEY]
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(plot.grid))
    data = read_xy(path)
    assert data["settings"]["sampling"] == {"steps": STEPS, "guidance_scale": 7.5, "width": SIZE, "height": SIZE,
                                            "scheduler": "dpm++2m"}  # fmt: skip
    assert data["x"] == {"kind": "steps", "values": [1, 2]} and data["y"]["values"] == [1.0, 7.5]
    assert [[cell["steps"], cell["guidance_scale"]] for row in data["cells"] for cell in row] == [
        [1, 1.0], [2, 1.0], [1, 7.5], [2, 7.5]
    ]  # fmt: skip

    with pytest.raises(OutputError, match="give a name ending in .png"):
        plot.save(tmp_path / "grid.jpg")
    plot.cells[0][0].save(tmp_path / "cell.png")
    with pytest.raises(RecordError, match="no 'compose_xy' metadata"):
        read_xy(tmp_path / "cell.png")
    forged = json.loads(json.dumps(plot.as_json()))
    forged["cells"][1][0]["steps"] = 10**9
    info = PngImagePlugin.PngInfo()
    info.add_text(XY_KEY, json.dumps(forged))
    plot.grid.save(tmp_path / "forged.png", pnginfo=info)
    with pytest.raises(RecordError, match=r"cell \(0, 1\).*'steps' must be at most 10000"):
        read_xy(tmp_path / "forged.png")


def test_a_plot_without_y_is_one_row(composer):
    plot = xy_plot(composer, settings(), Axis("method", ("merge", "switch", "composite")))
    assert len(plot.cells) == 1 and len(plot.cells[0]) == 3 and plot.y is None
    assert plot.grid.width > 3 * MIN_TILE and plot.grid.height > MIN_TILE
