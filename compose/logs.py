"""Our messages, not our dependencies' chatter.

Loading a pipeline makes diffusers and transformers print progress bars ("Loading
pipeline components...", "Loading weights") and informational warnings that say nothing
to someone composing LoRAs. They are silenced while a model loads unless
``COMPOSE_DEBUG=1``, which also makes the CLI print tracebacks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def debugging() -> bool:
    """``COMPOSE_DEBUG`` is set to something other than ``0`` or empty."""
    return os.environ.get("COMPOSE_DEBUG", "") not in ("", "0")


@contextmanager
def quiet_dependencies() -> Iterator[None]:
    """Inside the block, diffusers and transformers log errors only and show no progress
    bars; their settings are restored after it. A no-op under ``COMPOSE_DEBUG=1``."""
    if debugging():
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [(m, m.get_verbosity(), m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    for module, _, _ in saved:
        module.set_verbosity_error()
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, verbosity, bars in saved:
            module.set_verbosity(verbosity)
            if bars:
                module.enable_progress_bar()
