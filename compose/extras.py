"""Optional parts of the install: the studio needs gradio, the benchmark's plots matplotlib.

The engine and the CLI's generate, inspect and demo-world commands run without them, so
an install for batch generation stays small. A command that needs one checks before it
starts work, and says which extra to install.
"""

from __future__ import annotations

from importlib import import_module

EXTRAS = {"gradio": "studio", "matplotlib": "bench"}
"""Module → the ``compose-lora[...]`` extra that installs it."""


class MissingExtra(ImportError):
    """A command needs an optional dependency that is not installed; the message says how to add it."""


def require(module: str, feature: str) -> None:
    """Import ``module``, or raise :class:`MissingExtra` saying which extra installs it;
    ``feature`` names what needs it."""
    try:
        import_module(module)
    except ImportError:
        raise MissingExtra(f"{feature} needs {module}, which is not installed: pip install "
                           f"'compose-lora[{EXTRAS[module]}]' (or: pip install {module})") from None  # fmt: skip
