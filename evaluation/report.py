"""Benchmark results people can read: tables, win rates, plots and image grids.

Everything is derived from the per-item records alone, so ``compose grid`` and a
rerun rebuild it at any time. Intervals are 95%: Wilson score intervals for rates (the
all-concepts-present metric, a yes or no per image) and Student-t intervals for means
(:mod:`compose.evaluation.stats`); tables show ``mean [low, high]``. Win rates compare
each method with Merge on the same set and seed (a tie counts half).
"""

from __future__ import annotations

import csv
import json
import statistics
import textwrap
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw

from ..metadata import read_record, save_png
from .stats import t_interval, wilson_interval

METRICS = {  # record field -> (label, higher is better)
    "clipscore": ("CLIPScore", True),
    "concepts_present": ("concepts present", True),
    "all_present": ("all concepts present", True),
    "sides_present": ("placed concepts on their sides", True),
    "seconds": ("seconds / image", False),
}
BASELINE = "merge"
COST_REFERENCE = "composite"


RATES = {"all_present", "sides_present"}
"""Metrics that are a yes (1) or no (0) per image: their intervals are Wilson's."""


def interval(values: list[float], metric: str) -> tuple[float, float, float]:
    """``(mean, low, high)``: the 95% interval of ``metric`` over ``values``."""
    mean = statistics.fmean(values)
    if metric in RATES:
        return (mean, *wilson_interval(round(sum(values)), len(values)))
    return t_interval(values)


def shown(values: list[float], metric: str) -> str:
    """``0.583 [0.412, 0.736]``."""
    return "{:.3f} [{:.3f}, {:.3f}]".format(*interval(values, metric))


def metrics_of(records: list[dict]) -> list[str]:
    return [m for m in METRICS if any(m in r for r in records)]


def by_method_and_n(records: list[dict], metric: str) -> dict[tuple[str, int], list[float]]:
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in records:
        if metric in r:
            groups[r["method"], r["n"]].append(float(r[metric]))
    return groups


def win_rates(records: list[dict], metric: str, baseline: str = BASELINE) -> dict[str, tuple[float, int]]:
    """Per method: the share of (set, seed) pairs where it beats ``baseline``, and the pair count."""
    higher = METRICS[metric][1]
    base = {(r["set"], r["seed"]): r[metric] for r in records if r["method"] == baseline and metric in r}
    wins: dict[str, list[float]] = defaultdict(list)
    for r in records:
        other = base.get((r["set"], r["seed"]))
        if r["method"] == baseline or other is None or metric not in r:
            continue
        diff = (r[metric] - other) * (1 if higher else -1)
        wins[r["method"]].append(1.0 if diff > 0 else 0.5 if diff == 0 else 0.0)
    return {m: (sum(w) / len(w), len(w)) for m, w in wins.items()}


def markdown_tables(records: list[dict], methods: list[str]) -> str:
    """One table per metric: rows = methods, columns = N, cells = mean ± interval."""
    ns = sorted({r["n"] for r in records})
    parts = []
    for metric in metrics_of(records):
        label, higher = METRICS[metric]
        groups = by_method_and_n(records, metric)
        lines = [
            f"### {label} ({'higher' if higher else 'lower'} is better)",
            "",
            "| method | " + " | ".join(f"N={n}" for n in ns) + " | all |",
            "|---" * (len(ns) + 2) + "|",
        ]
        for method in methods:
            cells = []
            for n in ns:
                values = groups.get((method, n))
                cells.append("" if not values else shown(values, metric))
            every = [v for (m, _), vs in groups.items() if m == method for v in vs]
            cells.append("" if not every else shown(every, metric))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
        if metric != "seconds" and BASELINE in methods:
            rates = win_rates(records, metric)
            if rates:
                rows = [f"| {m} | {rates[m][0]:.1%} | {rates[m][1]} |" for m in methods if m in rates]
                parts.append(
                    f"Win rate against {BASELINE} on {label}:\n\n| method | wins | pairs |\n|---|---|---|\n"
                    + "\n".join(rows)
                )
    return "\n\n".join(parts) + "\n"


def concept_table(records: list[dict], methods: list[str]) -> str:
    """Which concepts each method loses: per method and concept, the share of the images
    asking for it that show it (Wilson 95%), from the records' ``loras`` and ``missing``;
    empty where the records have no presence."""
    shown_in = [r for r in records if "missing" in r and "loras" in r]
    concepts = list(dict.fromkeys(name for r in shown_in for name in r["loras"]))
    if not concepts:
        return ""
    lines = ["| method | " + " | ".join(concepts) + " |", "|---" * (len(concepts) + 1) + "|"]
    for method in methods:
        mine = [r for r in shown_in if r["method"] == method]
        cells = []
        for name in concepts:
            hits = [float(name not in r["missing"]) for r in mine if name in r["loras"]]
            cells.append(shown(hits, "all_present") if hits else "")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ranking(records: list[dict], methods: list[str]) -> str:
    """The methods ranked by all-concepts-present rate, then CLIPScore (where the records
    have no presence, by CLIPScore alone), with each one's median time per image relative
    to Composite's at every N (medians, so a first call's warm-up does not count): a
    markdown table."""
    ns = sorted({r["n"] for r in records})
    keys = [m for m in ("all_present", "sides_present", "concepts_present", "clipscore") if m in metrics_of(records)]
    groups = {metric: by_method_and_n(records, metric) for metric in [*keys, "seconds"]}

    def overall(metric: str, method: str) -> list[float]:
        return [v for (m, _), vs in groups[metric].items() if m == method for v in vs]

    scored = [m for m in methods if overall(keys[0], m)]
    scored.sort(key=lambda m: [-statistics.fmean(overall(k, m)) for k in keys])
    reference = {n: groups["seconds"].get((COST_REFERENCE, n)) for n in ns}
    cost_columns = [n for n in ns if reference[n]]
    header = [
        "rank",
        "method",
        *(METRICS[k][0] for k in keys),
        *(f"time ÷ {COST_REFERENCE} N={n}" for n in cost_columns),
    ]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for rank, method in enumerate(scored, 1):
        cells = [str(rank), method]
        cells += [shown(overall(k, method), k) for k in keys]
        for n in cost_columns:
            seconds = groups["seconds"].get((method, n))
            ratio = statistics.median(seconds) / statistics.median(reference[n]) if seconds else None
            cells.append("" if ratio is None else f"{ratio:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], methods: list[str], folder: Path) -> list[Path]:
    """A score-against-N plot per quality metric and a time-per-image bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in metrics_of(records):
        label, _ = METRICS[metric]
        groups = by_method_and_n(records, metric)
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        if metric == "seconds":
            spans = [interval([v for (m, _), vs in groups.items() if m == method for v in vs], metric)
                     for method in methods]  # fmt: skip
            errors = [[m - lo for m, lo, _ in spans], [hi - m for m, _, hi in spans]]
            ax.bar(methods, [m for m, _, _ in spans], yerr=errors, capsize=4, color="#4c72b0")
            ax.set_ylabel(label)
            ax.set_title("time per image by method")
        else:
            for method in methods:
                points = sorted((n, *interval(vs, metric)) for (m, n), vs in groups.items() if m == method)
                if points:
                    ns, means, lows, highs = zip(*points, strict=True)
                    errors = [[m - lo for m, lo in zip(means, lows, strict=True)],
                              [hi - m for m, hi in zip(means, highs, strict=True)]]  # fmt: skip
                    ax.errorbar(ns, means, yerr=errors, marker="o", capsize=3, label=method)
            ax.set_xlabel("number of LoRAs (N)")
            ax.set_ylabel(label)
            ax.set_title(f"{label} against N")
            ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / f"{metric}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


GRID_TILE = 192
"""Side of a grid cell in pixels: small models' images are enlarged (nearest neighbour)
to it, so that what each method drew can be judged."""


def grid(out: Path, records: list[dict], methods: list[str]) -> Image.Image:
    """One set's images: its prompt on top, a column per method (named), a row per seed,
    each image enlarged to :data:`GRID_TILE` with its scores under it (CLIPScore, the
    share of concepts present and whether all are) and, for a method that confined its
    LoRAs to regions, those regions in the tile's top-right corner."""
    seeds = sorted({r["seed"] for r in records})
    cells = {(r["seed"], r["method"]): r for r in records}
    tile, line = GRID_TILE, 13
    try:
        prompt = read_record(out / records[0]["image"]).get("prompt", records[0]["set"])
    except (OSError, ValueError):
        prompt = records[0]["set"]
    header = textwrap.wrap(f"{records[0]['set']}: {prompt}", width=max(40, tile * len(methods) // 6))
    top, caption = line * (len(header) + 1) + 4, 2 * line + 4
    sheet = Image.new("RGB", (tile * len(methods), top + (tile + caption) * len(seeds)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, text in enumerate(header):
        draw.text((4, 2 + i * line), text, fill="black")
    for col, method in enumerate(methods):
        draw.text((col * tile + 4, top - line - 2), method, fill="black")
        for row, seed in enumerate(seeds):
            record = cells.get((seed, method))
            if record is None:
                continue
            y = top + row * (tile + caption)
            with Image.open(out / record["image"]) as image:
                sheet.paste(image.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST), (col * tile, y))
            if "regions" in record and (out / record["regions"]).is_file():
                with Image.open(out / record["regions"]) as regions:
                    inset = regions.convert("RGB").resize((tile // 3, tile // 3), Image.Resampling.NEAREST)
                sheet.paste(
                    Image.new("RGB", (inset.width + 2, inset.height + 2), "white"),
                    (col * tile + tile - inset.width - 2, y),
                )
                sheet.paste(inset, (col * tile + tile - inset.width - 1, y + 1))
            draw.text((col * tile + 4, y + tile + 2), _scores(record), fill="black")
    return sheet


def _scores(record: dict) -> str:
    """``seed 0  CLIP 41.2`` over ``2/3 present  ✗`` (what fits under a tile)."""
    first = f"seed {record['seed']}" + (f"  CLIP {record['clipscore']:.1f}" if "clipscore" in record else "")
    if "concepts_present" not in record:
        return first
    found = round(record["concepts_present"] * record["n"])
    return f"{first}\n{found}/{record['n']} present  {'all' if record.get('all_present') else 'not all'}"


def write_grids(out: Path, records: list[dict], methods: list[str]) -> list[Path]:
    by_set: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_set[r["set"]].append(r)
    return [save_png(grid(out, rs, methods), out / "grids" / f"{set_id}.png") for set_id, rs in sorted(by_set.items())]


def write_report(out: Path, records: list[dict], methods: list[str]) -> dict[str, Path]:
    """``results.jsonl``, ``results.csv``, ``summary.md``, ``plots/`` and ``grids/``."""
    if not records:
        return {}
    columns = sorted({k for r in records for k in r})
    (out / "results.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: " ".join(v) if isinstance(v, list) else v for k, v in r.items()} for r in records)
    summary = out / "summary.md"
    summary.write_text(
        f"# Benchmark: {len(records)} images\n\n## Ranking\n\n{ranking(records, methods)}\n"
        f"## By number of LoRAs\n\n{markdown_tables(records, methods)}"
        + (f"\n## Each concept present\n\n{table}" if (table := concept_table(records, methods)) else "")
    )
    plot(records, methods, out / "plots")
    write_grids(out, records, methods)
    return {"summary": summary, "jsonl": out / "results.jsonl", "csv": out / "results.csv"}
