"""The README and the docs/ pages say what the code does: their Python example runs as
written and makes what it says, every command in them is one the CLI accepts (the LoRA
names it uses are the demo world's, the methods real, the files there), every option the
CLI synopsis names exists, every page is linked from a README that fits in 200 lines, and
every link leads somewhere."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

from compose.cli import DEFAULT_MODEL, _check_names, _parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [README, *PAGES]
PROGRAMS = ("compose", ".venv/bin/compose", "python -m compose", ".venv/bin/python -m compose")


def blocks(language: str, documents: list[Path] = DOCUMENTS) -> list[tuple[Path, str]]:
    """Every fenced ``language`` block of ``documents``, with the file it is in."""
    pattern = re.compile(rf"```{language}\n(.*?)```", re.S)
    return [(doc, block) for doc in documents for block in pattern.findall(doc.read_text(encoding="utf-8"))]


def commands() -> list[tuple[Path, str]]:
    """Every ``compose`` command of the bash blocks, its continued lines joined as the shell
    joins them (a backslash before a newline is removed, inside a word too), and every
    whole one in the text's code spans (five words or more, no ``...`` left to fill in:
    ``compose bench`` alone names the command, it is not one; ``compose bench: ...`` is a
    message the CLI prints)."""
    found = []
    for doc, block in blocks("bash"):
        for line in block.replace("\\\n", "").splitlines():
            for command in line.split("&&"):
                if command.strip().startswith(PROGRAMS):
                    found.append((doc, command.strip()))
    for doc in DOCUMENTS:
        prose = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
        for span in (" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose)):
            words = span.split()
            whole = len(words) >= 5 and not words[1].endswith(":") and "..." not in span and "…" not in span
            if whole and span.startswith(tuple(f"{program} " for program in PROGRAMS)):
                found.append((doc, span))
    return found


def parsed(command: str) -> argparse.Namespace:
    """The CLI's reading of ``command``, or the test fails with the CLI's own message."""
    words = shlex.split(command, comments=True)
    start = 1 if words[0].endswith("compose") else 3
    try:
        return _parser().parse_args(words[start:])
    except SystemExit:
        pytest.fail(f"the CLI refuses: {command}")


def test_the_demo_world_python_example_runs_as_written(tmp_path, monkeypatch):
    """It draws the demo world's example (the quick start's) on its seed and the next."""
    from compose.demo_world.evaluate import EXAMPLE_METHOD, EXAMPLE_PROMPT, EXAMPLE_SEED, EXAMPLE_SET

    example = next(b for _, b in blocks("python") if 'Composer.load("demo-world")' in b)
    assert EXAMPLE_PROMPT in example and f"seed=[{EXAMPLE_SEED}, {EXAMPLE_SEED + 1}]" in example
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "docs/python-api.md", "exec"), namespace)
    assert len(namespace["images"]) == 2 and namespace["images"][0].size == (64, 64)
    with Image.open(tmp_path / "first.png") as image:
        text = image.text["parameters"]
    assert all(f"<lora:{name}:0.8>" in text for name in EXAMPLE_SET) and f"Composition method: {EXAMPLE_METHOD}" in text


def test_every_python_example_is_python():
    examples = blocks("python")
    assert len(examples) >= 4
    for doc, block in examples:
        compile(block, str(doc), "exec")


def test_every_command_is_one_the_cli_accepts():
    """Parsed by the CLI's own parser; a ``generate`` command's LoRA names and prompt tags
    checked as the CLI checks them before loading, a benchmark's methods built, and every
    file of the repository a command names there."""
    from compose.evaluation.bench import method_spec

    found = commands()
    assert {doc.name for doc, _ in found} >= {"README.md", "results.md", "benchmark.md", "studio.md"}
    assert any("two_characters.json --methods" in command for _, command in found), "a code span's command"
    for _, command in found:
        args = parsed(command)
        if args.command == "generate":
            _check_names(args, args.model or DEFAULT_MODEL, args.prompt)
        if args.command == "bench" and args.sets:
            for spec in args.methods.split(","):
                method_spec(spec)
        for word in shlex.split(command, comments=True):
            if word.startswith("assets/"):
                assert (ROOT / word).exists(), f"{command}: no {word}"


def test_the_quick_start_is_the_first_image_on_the_demo_world():
    """The README's one ``generate`` command draws the demo world's example (its set, its
    prompt, method and seed), which the world's tests check shows every concept."""
    from compose.demo_world.evaluate import EXAMPLE_METHOD, EXAMPLE_PROMPT, EXAMPLE_SEED, EXAMPLE_SET

    generate = [c for doc, c in commands() if doc == README and " generate " in c]
    assert len(generate) == 1
    args = parsed(generate[0])
    assert args.model is None and args.out.endswith(".png")
    assert (args.prompt, args.lora, args.method, args.seed) == (EXAMPLE_PROMPT, [(name, 1.0) for name in EXAMPLE_SET],
                                                                EXAMPLE_METHOD, [EXAMPLE_SEED])  # fmt: skip


def test_the_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    tests = [b.strip() for _, b in blocks("bash", [README]) if "pytest" in b]
    assert tests == [".venv/bin/python -m pytest -q"] and tests[0] in ci


def test_every_option_of_the_cli_synopsis_exists():
    parser = _parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    known = {o for sub in subcommands.choices.values() for a in sub._actions for o in a.option_strings}
    synopsis = [b for _, b in blocks("text", [ROOT / "docs" / "cli.md"]) if b.startswith("compose generate")]
    assert len(synopsis) == 1
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", synopsis[0]))
    assert len(named) > 60 and named <= known, sorted(named - known)


def test_the_readme_fits_in_200_lines_and_links_every_page():
    text = README.read_text(encoding="utf-8")
    assert text.count("\n") <= 200
    assert PAGES
    for page in PAGES:
        assert f"(docs/{page.name})" in text or f"(docs/{page.name}#" in text, f"README.md does not link {page.name}"


def test_every_link_leads_somewhere():
    """Relative links and pictures of the README and the pages name files that exist, and
    their ``#anchors`` headings of those files."""
    for doc in DOCUMENTS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            where = (doc.parent / path).resolve() if path else doc
            assert where.exists(), f"{doc.name}: {target} leads nowhere"
            if anchor and where.suffix == ".md":
                assert anchor in anchors(where), f"{doc.name}: {target}: no such heading"


def anchors(document: Path) -> set[str]:
    """The anchors GitHub gives a markdown file's headings."""
    headings = re.findall(r"^#+ (.*)$", document.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
