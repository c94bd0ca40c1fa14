"""The studio's public API: named endpoints with named, typed parameters.

``gradio_client`` calls them by keyword, as a Python function would be called::

    client.predict(prompt="a zorbo creature", loras={"zorbo": 1.0}, method="composite",
                   api_name="/generate")

They run the same :class:`~compose.app.studio.Studio` actions as the page, in the same
queue (``concurrency_id="model"``: one generation at a time), but report a mistake as an
error the caller can catch, where the page shows it beside the control that caused it.
"""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr
import numpy as np
from PIL import Image

from ..loop import GenerationCancelled
from ..schedulers import DEFAULT_SCHEDULER
from .studio import Settings, Studio, StudioError, lora_weights

USER_ERRORS = (StudioError, ValueError, KeyError, GenerationCancelled)


def user_text(error: Exception) -> str:
    """The message of a user's mistake (a ``KeyError`` without its quotes)."""
    return str(error.args[0] if isinstance(error, KeyError) and error.args else error)


def session_of(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or ""


def _weights(loras: dict | None) -> list[tuple[str, float]]:
    return lora_weights([[name, weight] for name, weight in (loras or {}).items()])


def _raising(action: Callable) -> Callable:
    """``action`` with a user's mistake turned into a ``gr.Error`` (its message, no trace)."""

    def call(*args, **kwargs):
        try:
            return action(*args, **kwargs)
        except USER_ERRORS as error:
            raise gr.Error(user_text(error), print_exception=False) from None

    call.__name__, call.__doc__, call.__annotations__ = action.__name__, action.__doc__, action.__annotations__
    call.__wrapped__ = action
    return call


def register_api(studio: Studio) -> None:
    """Declare every endpoint inside the current ``gr.Blocks``."""

    def generate(
        prompt: str,
        loras: dict[str, float] | None = None,
        method: str = "merge",
        negative_prompt: str = "",
        steps: int = 25,
        guidance_scale: float = 7.5,
        width: int | None = None,
        height: int | None = None,
        seed: int = 0,
        scheduler: str = DEFAULT_SCHEDULER,
        method_params: dict | None = None,
        insert_triggers: bool = False,
        request: gr.Request = None,
    ) -> tuple[gr.FileData, dict]:
        """One image: the PNG (its settings inside) and ``{"seconds", "clipscore", "record"}``.
        ``loras`` maps library names to weights; ``method_params`` as ``compose generate``'s,
        but a region is only a box ``[x0, y0, x1, y1]``: a mask is uploaded with ``/set_region``
        (the server opens no file a request names)."""
        settings = Settings(prompt, negative_prompt, _weights(loras), insert_triggers, method, method_params, steps,
                            guidance_scale, width, height, seed, scheduler)  # fmt: skip
        path, record, seconds = studio.generate(settings, session=session_of(request))
        return gr.FileData(path=str(path)), {"seconds": seconds, "clipscore": studio.clipscore(path, record),
                                             "record": record}  # fmt: skip

    def compare(
        prompt: str,
        loras: dict[str, float] | None = None,
        negative_prompt: str = "",
        steps: int = 25,
        guidance_scale: float = 7.5,
        seed: int = 0,
        scheduler: str = DEFAULT_SCHEDULER,
        request: gr.Request = None,
    ) -> tuple[list[gr.FileData], list[dict]]:
        """The same settings with every method: the PNGs, and per method its seconds,
        CLIPScore and (on the demo world) the share of its concepts present."""
        settings = Settings(prompt, negative_prompt, _weights(loras), steps=steps,
                            guidance_scale=guidance_scale, seed=seed, scheduler=scheduler)  # fmt: skip
        rows = list(studio.compare(settings, session=session_of(request)))
        return [gr.FileData(path=str(r["path"])) for r in rows], [{k: v for k, v in r.items() if k != "path"}
                                                                  for r in rows]  # fmt: skip

    def stop(request: gr.Request = None) -> str:
        """End the caller's own run after its current step."""
        return studio.stop(session_of(request))

    def png_info(png: gr.FileData) -> dict:
        """The settings a PNG carries (this studio's record, or AUTOMATIC1111's text)."""
        return studio.png_info(png["path"] if isinstance(png, dict) else png.path)

    def add_lora(file: gr.FileData) -> str:
        """Copy an uploaded LoRA file into the library and load it."""
        return studio.add_upload(file["path"] if isinstance(file, dict) else file.path)

    def set_region(name: str, box: str = "", mask: gr.FileData | None = None, prompt: str = "",
                   request: gr.Request = None) -> str:  # fmt: skip
        """Confine LoRA ``name`` to a box ``"x0, y0, x1, y1"`` (fractions) or to the white
        part of a ``mask`` image, for the caller's regional runs; ``prompt`` is the region's
        own text."""
        painting = None
        if mask is not None:
            with Image.open(mask["path"] if isinstance(mask, dict) else mask.path) as image:
                alpha = np.asarray(image.convert("L"))
            painting = {"layers": [np.dstack([np.zeros((*alpha.shape, 3), np.uint8), alpha])]}
        return studio.set_region(name, box, painting, session_of(request), prompt)

    def clear_regions(request: gr.Request = None) -> str:
        """Drop the caller's regions."""
        return studio.clear_regions(session_of(request))

    def library() -> list[dict]:
        """Every LoRA of the library: name, category, triggers, base family, rank."""
        return [dict(zip(("name", "category", "triggers", "family", "rank"), row[:5], strict=True))
                for row in studio.library_rows()]  # fmt: skip

    gr.api(_raising(stop), api_name="stop", queue=False, concurrency_limit=None)  # never behind the run it stops
    for action in (generate, compare, png_info, add_lora, set_region, clear_regions, library):
        gr.api(_raising(action), api_name=action.__name__, concurrency_id="model")
    for action in (studio.edit, studio.remove, studio.frequency, studio.load_model, studio.load_folder):
        gr.api(_raising(action), api_name=API_NAMES[action.__name__], concurrency_id="model")


API_NAMES = {"edit": "edit_lora", "remove": "remove_lora", "frequency": "frequency_profile",
             "load_model": "load_model", "load_folder": "add_folder"}  # fmt: skip
