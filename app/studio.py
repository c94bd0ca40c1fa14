"""The studio's state and actions, independent of the Gradio layout (``ui.py``).

A :class:`Studio` owns one :class:`~compose.Composer`, a LoRA library folder, the
folder of the PNGs it made, and one cancel flag per browser session that the session's
running generation checks after every denoising step (each session also keeps its own
gallery, ``ui.py``). Every action returns plain values (rows, paths, messages), so the
UI, the public API and the tests call the same code.

The studio is shared by everyone who can reach it, so nothing one visitor does may
reach into another's work or the server: Stop ends only the caller's own run; switching
the base model, loading a server folder, and removing or editing a library LoRA (which
every session uses) are *operator actions*, off unless the studio is told otherwise
(``operator``); every change to the model (loading, removing, switching) happens under
the model's lock, so it never lands in the middle of a run; uploads are untrusted
(safetensors only unless pickle is allowed, a size limit, names that stay inside the
library folder, parsed before the lock is taken); a request names no server file (its
regions are boxes; masks are uploaded and saved by the studio itself) and its prompts
are bounded (:class:`~compose.checks.Limits`); and success messages escape the names
they show (:func:`md`), which come from files and PNGs.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from .. import checks
from ..calls import RunOptions, SamplingConfig
from ..checks import Limits, cost_note
from ..composer import Composer, ModelLoadError
from ..evaluation.presence import concept_presence
from ..loading import CATEGORIES, PICKLE_SUFFIXES, LoRAError, load_lora, preview_path, write_sidecar
from ..loop import GenerationCancelled
from ..metadata import generate_kwargs, read_record, record_masks, save_png
from ..methods import METHODS
from ..methods.regional import check_boxes, region_mask
from ..overlay import legend, mask_overlay
from ..prompts import extract_lora_tags
from .display import for_display
from .model_thread import ModelThread

LIBRARY_COLUMNS = ["name", "category", "triggers", "base family", "rank"]
LORA_COLUMNS = ["LoRA", "weight"]
PREVIEWS = ".previews"
CARD_SIDE = 192
CARDS = "cards"
ON_COLOUR, OFF_COLOUR = (22, 163, 74), (170, 170, 170)
"""A card's frame: green when its LoRA is on, grey when off (Gradio marks the picked card in orange)."""
Progress = Callable[[float, str], None]
WARM_UP_STEPS = 2
"""Untimed steps Compare runs of a method not yet run on the model, before timing it."""


def _brought_preview(lora_file: str) -> Image.Image | None:
    """The picture a LoRA file brings beside it (:func:`~compose.loading.preview_path`),
    with its PNG text, or ``None`` where there is none or it is not a readable image."""
    path = preview_path(lora_file)
    if not path.is_file():
        return None
    try:
        with Image.open(path) as image:
            picture = image.convert("RGB")
            picture.info = {k: v for k, v in image.info.items() if isinstance(v, str)}
            return picture
    except (OSError, Image.DecompressionBombError):
        return None


class StudioError(ValueError):
    """A user mistake the studio reports in its status line."""


OPERATOR_ONLY = (
    "{action} is an operator action: it changes the studio for everyone who uses it, so it is off here; "
    "the operator starts the studio with --operator-actions (or serves it on loopback only)"
)
_MARKDOWN = re.compile(r"([\\`*_\[\]!|#~])")


def md(text: object) -> str:
    """``text`` safe inside a Markdown status line: HTML escaped, and the characters that
    make links, images and emphasis backslash-escaped. LoRA names, file names and
    triggers come from uploads and PNGs, and must show as the text they are."""
    return _MARKDOWN.sub(r"\\\1", html.escape(str(text), quote=False))


@dataclass
class Settings:
    """Everything a generation needs, as the Compose tab shows it. ``loras`` pairs are
    ``(name, weight)``, or ``(name, weight, blocks)`` with block weights (from a PNG)."""

    prompt: str
    negative_prompt: str = ""
    loras: list[tuple] | None = None
    insert_triggers: bool = False
    method: str = "merge"
    method_params: dict | None = None
    steps: int = 25
    guidance_scale: float = 7.5
    width: int | None = None
    height: int | None = None
    seed: int = 0
    scheduler: str = "dpm++2m"
    lora_scale: float = 0.8


def _settings_of(kwargs: dict) -> Settings:
    """The :class:`Settings` of :meth:`Composer.generate` keywords (from a PNG): the fields
    of their ``sampling`` as the tab's own, defaults where it is absent."""
    sampling = kwargs.get("sampling") or SamplingConfig()
    rest = {key: value for key, value in kwargs.items() if key != "sampling"}
    return Settings(**rest, steps=sampling.steps, guidance_scale=sampling.guidance_scale, width=sampling.width,
                    height=sampling.height, scheduler=sampling.scheduler)  # fmt: skip


def lora_weights(rows: list[list]) -> list[tuple[str, float]]:
    """``[[name, weight], ...]`` from the Compose table: rows with weight 0 are unused."""
    pairs = []
    for row in rows or []:
        if len(row) < 2 or row[0] in (None, ""):
            continue
        try:
            weight = float(row[1] or 0)
        except (TypeError, ValueError):
            raise StudioError(f"the weight of {row[0]} must be a number, got {row[1]!r}") from None
        if weight:
            pairs.append((str(row[0]), weight))
    return pairs


class Studio:
    """One composer, its LoRA library and the session's results."""

    def __init__(
        self,
        model: str,
        library: Path,
        load: Callable[[str], Composer],
        allow_pickle: bool = False,
        max_upload_mb: float = 1024,
        scorer=None,
        operator: bool | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.load = load
        self.operator = operator
        """Whether visitors may switch the model and load server folders; ``None`` until
        :func:`compose.app.ui.launch` decides it from the address served (off beyond loopback)."""
        self.limits = limits or Limits()
        self.library = Path(library).resolve()
        self.library.mkdir(parents=True, exist_ok=True)
        self.allow_pickle = allow_pickle
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.scorer = scorer
        self.lock = threading.Lock()
        self.model_thread = ModelThread()
        self.cancels: dict[str, threading.Event] = {}
        self.ended: dict[str, threading.Event] = {}
        """Per browser session, set as its run ends (for a Stop that waits for it)."""
        self.reached: dict[str, str] = {}
        """Per browser session, how far its run has got ("step k of n"), for Stop's answer."""
        self.warmed: set[str] = set()
        """The methods run at least once on this model: their first call paid the warm-up."""
        self.made = 0
        self.outputs = Path(tempfile.mkdtemp(prefix="compose-studio-"))
        self.model = model
        self.composer = self._load_model(model)
        self.regions: dict[str, dict[str, list[float] | str]] = {}
        self.region_prompts: dict[str, dict[str, str]] = {}
        """Per browser session, each LoRA's region for the regional method (a box or a mask file)."""
        self.region_views: dict[Path, tuple[Path, str]] = {}
        """Per image that confined LoRAs to regions: the picture of them and its legend."""
        self.previews = self.library / PREVIEWS
        self.load_trusted_folder(self.library)

    # -- library ---------------------------------------------------------------------

    def library_rows(self) -> list[list]:
        """The Library table (:data:`LIBRARY_COLUMNS`); the high-frequency score is not a
        column, as it costs a model run per LoRA: *Frequency profile* measures it."""
        return [[lora.name, lora.category or "", ", ".join(lora.triggers), base_family(lora), lora.rank]
                for lora in self.composer.loras.values()]  # fmt: skip

    def compose_rows(self, previous: list[list] | None = None, defaults: dict[str, float] | None = None) -> list[list]:
        """The Compose table: every library LoRA with its weight (kept from ``previous``,
        else from ``defaults``, else 0). The LoRAs that are on come first, so the weights
        that act are in view above the fold, in ``previous``'s order (it is Switch's order,
        and may be a PNG's; a LoRA switched on joins the end); the others follow, in
        ``previous``'s order, then library order."""
        weights = {**(defaults or {}), **{row[0]: row[1] for row in previous or [] if row}}
        kept = [row[0] for row in previous or [] if row and row[0] in self.composer.loras]
        rows = [[name, weights.get(name, 0.0)] for name in dict.fromkeys([*kept, *self.composer.loras])]
        return sorted(rows, key=lambda row: as_weight(row[1]) == 0)

    def preview(self, name: str) -> Path:
        """A picture of what LoRA ``name`` draws alone: the one its file brings
        (``name.preview.png`` beside it, as A1111 and ComfyUI look for), else one drawn
        here (its triggers as the prompt, weight 1, seed 0, 20 steps, native size); made
        once and kept by the file's sha256 in the library's ``.previews`` folder, so a
        renamed or re-uploaded copy reuses it."""
        lora = self._lora(name)
        path = self.previews / f"{lora.sha256}.png"
        if not path.is_file():
            picture = _brought_preview(lora.path)
            if picture is None:
                with self.lock:
                    prompt = ", ".join(lora.triggers) or name
                    sampling = SamplingConfig(steps=20)
                    picture = self.model_thread.run(self.composer.generate, prompt, [(name, 1.0)], sampling=sampling)[0]
            self.previews.mkdir(parents=True, exist_ok=True)
            save_png(picture, path)
        return path

    def missing_previews(self) -> list[str]:
        """The LoRAs whose preview is not made yet (the first start makes them all)."""
        return [name for name, lora in self.composer.loras.items()
                if not (self.previews / f"{lora.sha256}.png").is_file()]  # fmt: skip

    def card_names(self, query: str = "") -> list[str]:
        """The LoRAs whose name, category or triggers hold ``query`` (case-insensitive), in
        library order: the cards shown for that search."""
        wanted = query.strip().lower()
        return [lora.name for lora in self.composer.loras.values()
                if wanted in " ".join([lora.name, lora.category or "", *lora.triggers]).lower()]  # fmt: skip

    def cards(self, query: str = "", weights: dict[str, object] | None = None) -> list[tuple[Path, str]]:
        """The cards of :meth:`card_names` as ``(picture, caption)``: the preview framed
        green when the LoRA is on in ``weights`` (name -> the table's weight), greyed when
        off, and the caption ``● on 0.8 · name · category`` or ``○ off · name · category``,
        so which LoRAs a run will use shows at a glance (a card is too narrow for the
        triggers: the search finds them, the library tab shows them)."""
        out = []
        for name in self.card_names(query):
            category = self.composer.loras[name].category
            label = f"{name} · {category}" if category else name
            weight = as_weight((weights or {}).get(name))
            caption = f"● on {weight:g} · {label}" if weight else f"○ off · {label}"
            out.append((self._card_picture(name, bool(weight)), caption))
        return out

    def _card_picture(self, name: str, on: bool) -> Path:
        """The preview of ``name`` at card size, framed for its state; made once per state."""
        lora = self._lora(name)
        path = self.outputs / CARDS / f"{lora.sha256}-{'on' if on else 'off'}.png"
        if not path.is_file():
            with Image.open(for_display(self.preview(name), CARD_SIDE)) as preview:
                picture = _framed(preview.convert("RGB"), on)
            path.parent.mkdir(parents=True, exist_ok=True)
            picture.save(path)
        return path

    def _operator(self, action: str) -> None:
        if not self.operator:
            raise StudioError(OPERATOR_ONLY.format(action=action))

    def load_folder(self, folder: str | Path) -> str:
        """A visitor's request to load every LoRA file of a server folder: an operator
        action (otherwise any visitor could read any folder, and learn which exist)."""
        self._operator("loading a server folder")
        return self.load_trusted_folder(folder)

    def load_trusted_folder(self, folder: str | Path) -> str:
        """Load every LoRA file of ``folder`` (the library, the operator's choice); files
        that fail are reported, the rest load. Files are parsed outside the model's lock
        and added under it, so a run in progress never sees its layers change."""
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise StudioError(f"{folder}: no such folder")
        suffixes = (".safetensors", *(PICKLE_SUFFIXES if self.allow_pickle else ()))
        loaded, failed = [], []
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes):
            if path.stem in self.composer.loras:
                continue
            try:
                lora = self._read(path, path.stem)
                with self.lock:
                    loaded.append(self.model_thread.run(self.composer.add_lora, lora).name)
            except (LoRAError, ValueError) as error:
                failed.append(str(error))
        names = ", ".join(md(name) for name in loaded)
        message = f"loaded {len(loaded)} LoRA(s) from {md(folder)}" + (f": {names}" if loaded else "")
        return message + "".join(f"\n- not loaded: {md(f)}" for f in failed)

    def _read(self, path: Path, name: str):
        """Parse a LoRA file for this model without touching the model (no lock needed)."""
        return self.model_thread.run(load_lora, path, name=name, allow_pickle=self.allow_pickle,
                                     unet_config=dict(self.composer.pipeline.unet.config),
                                     limits=self.limits)  # fmt: skip

    def add_upload(self, upload: str | Path) -> str:
        """Copy an uploaded file into the library and load it; on failure nothing changes."""
        source = Path(upload)
        name = source.name
        if not name or "/" in name or "\\" in name or name.startswith(".") or ".." in name:
            raise StudioError(f"{name!r}: not an acceptable file name")
        suffix = source.suffix.lower()
        if suffix != ".safetensors" and not (self.allow_pickle and suffix in PICKLE_SUFFIXES):
            raise StudioError(f"{name}: only .safetensors LoRA files are accepted (pickle files can run code)")
        size = source.stat().st_size
        if size > self.max_upload_bytes:
            raise StudioError(f"{name}: {size / 2**20:.0f} MB is over the {self.max_upload_bytes / 2**20:.0f} MB limit")
        target = (self.library / name).resolve()
        if target.parent != self.library:
            raise StudioError(f"{name}: would be written outside the library folder")
        if target.stem in self.composer.loras or target.exists():
            raise StudioError(f"{name}: a LoRA of that name is already in the library")
        try:
            lora = self._read(source, target.stem)
        except LoRAError as error:
            raise StudioError(f"{name}: {error.reason}") from None
        with self.lock:
            try:
                self.model_thread.run(self.composer.add_lora, lora)
            except LoRAError as error:
                raise StudioError(f"{name}: {error.reason}") from None
            shutil.copyfile(source, target)
        return f"added {md(lora.name)} ({lora.family}, rank {lora.rank}, {len(lora.targets)} modules)"

    def edit(self, name: str, category: str, triggers: str, clear: bool = False) -> str:
        """Set a LoRA's category and triggers, and write them to its sidecar: an operator
        action, as every session's runs read them (trigger insertion, K-LoRA's roles, the
        cards) and the sidecar is a file on the server. A blank save over a LoRA that has
        either is refused unless ``clear``: an editor that opened blank once wiped them."""
        self._operator("editing a LoRA's category and triggers")
        lora = self._lora(name)
        if category and category not in CATEGORIES:
            raise StudioError(f"category must be one of {', '.join(CATEGORIES)}")
        phrases = [t.strip() for t in triggers.split(",") if t.strip()]
        if not (category or phrases or clear) and (lora.category or lora.triggers):
            words = ", ".join(lora.triggers) or "none"
            raise StudioError(f"not saved: a blank category and triggers would erase {name}'s (category "
                              f"{lora.category or 'none'}, triggers {words}); edit them, or confirm the erasure (the "
                              "Library's “erase both” box, the API's clear=True)")  # fmt: skip
        with self.lock:
            file = self.library / f"{name}.safetensors"
            if file.exists():  # merged into <name>.json: A1111's fields there are kept
                try:
                    write_sidecar(file, category or None, phrases)
                except (ValueError, OSError) as error:  # an unreadable sidecar, an unwritable folder
                    raise StudioError(f"{name}: the sidecar cannot be updated ({error})") from None
            lora.category, lora.triggers = category or None, phrases
        words = ", ".join(md(t) for t in lora.triggers) or "none"
        return f"{md(name)}: category {lora.category or 'none'}, triggers {words} (for every session)"

    def remove(self, name: str) -> str:
        """Unload a LoRA from the studio: an operator action, as the library is one for
        every session (another visitor's next run would fail on the missing name)."""
        self._operator("removing a LoRA from the library")
        self._lora(name)
        with self.lock:
            self.composer.unload_lora(name)
        return (f"removed {md(name)} for every session (its file stays in {md(self.library)} and loads again "
                "when the studio restarts or switches the model)")  # fmt: skip

    def frequency(self, name: str) -> str:
        self._lora(name)
        with self.lock:
            profile = self.model_thread.run(self.composer.frequency_profile, name)
        return (f"{md(name)}: high-frequency score {profile.score:.4f} (radius >= {profile.cutoff} px of "
                f"{profile.size})")  # fmt: skip

    def _lora(self, name: str):
        if name not in self.composer.loras:
            raise StudioError(f"no LoRA named {name!r} in the library")
        return self.composer.loras[name]

    # -- regions ---------------------------------------------------------------------

    def set_region(self, name: str, box: str = "", painting: dict | None = None, session: str = "",
                   prompt: str = "") -> str:  # fmt: skip
        """Confine LoRA ``name`` to a region for the ``regional`` method, in browser session
        ``session`` only: the strokes of ``painting`` (a Gradio image-editor value of RGBA
        arrays; painted = inside), else ``box`` ``"x0, y0, x1, y1"`` in fractions of the image.
        A ``prompt`` is the region's own text (it attends to it instead of the prompt)."""
        self._lora(name)
        mask = _painted_mask(painting)
        regions = self.regions.setdefault(session, {})
        if mask is not None:
            path = self.outputs / f"region-{uuid.uuid4().hex[:12]}-{_safe(name)}.png"
            Image.fromarray(mask).save(path)
            regions[name] = str(path)
        elif box.strip():
            try:
                values = [float(v) for v in box.replace(" ", "").split(",")]
                region_mask(values, 8, 8)
            except ValueError as error:
                raise StudioError(f"region of {name}: {error}") from None
            regions[name] = values
        else:
            raise StudioError(f"paint a region for {name} or give a box x0, y0, x1, y1")
        prompts = self.region_prompts.setdefault(session, {})
        if prompt.strip():
            prompts[name] = prompt.strip()
        else:
            prompts.pop(name, None)
        return self.describe_regions(session)

    def clear_regions(self, session: str = "") -> str:
        self.regions.pop(session, None)
        self.region_prompts.pop(session, None)
        return self.describe_regions(session)

    def describe_regions(self, session: str = "") -> str:
        regions = self.regions.get(session)
        if not regions:
            return "no regions: with the regional method every LoRA covers the whole image"
        prompts = self.region_prompts.get(session, {})
        parts = [f"{md(n)}: " + ("painted mask" if isinstance(r, str) else f"box {r}")
                 + (f" · prompt “{md(prompts[n])}”" if n in prompts else "") for n, r in regions.items()]  # fmt: skip
        return "regions · " + "; ".join(parts)

    # -- model -----------------------------------------------------------------------

    def _load_model(self, model: str) -> Composer:
        composer = self.load(model)
        composer.limits = self.limits
        return composer

    def load_model(self, model: str) -> str:
        """Switch the base model and reload the library's files into it: an operator
        action, under the model's lock (a run in progress finishes on the old model)."""
        self._operator("switching the base model")
        with self.lock:
            try:
                composer = self.model_thread.run(self._load_model, model)
            except (ModelLoadError, OSError, ValueError) as error:
                raise StudioError(str(error)) from None
            previous, self.composer, self.model = self.composer, composer, model
            self.warmed = set()  # a new model warms up again
        message = self.load_trusted_folder(self.library)
        del previous
        return f"base model {md(model)} ({md(self.composer.family)}); {message}"

    # -- generation ------------------------------------------------------------------

    def _prompt(self, settings: Settings) -> str:
        if not settings.insert_triggers:
            return settings.prompt
        words = [t for name, *_ in settings.loras or [] for t in self._lora(name).triggers]
        missing = [w for w in words if w not in settings.prompt]
        return ", ".join([settings.prompt, *missing]) if missing else settings.prompt

    def _generate_kwargs(self, settings: Settings) -> dict:
        """The :meth:`Composer.generate` keywords of ``settings``, the prompt with its triggers."""
        sampling = SamplingConfig(steps=settings.steps, guidance_scale=settings.guidance_scale, width=settings.width,
                                  height=settings.height, scheduler=settings.scheduler)  # fmt: skip
        return {"prompt": self._prompt(settings), "loras": settings.loras, "method": settings.method,
                "method_params": settings.method_params, "negative_prompt": settings.negative_prompt,
                "seed": settings.seed, "lora_scale": settings.lora_scale, "sampling": sampling}  # fmt: skip

    def stop(self, session: str = "", wait: float = 0.0) -> str:
        """Ask the run of browser session ``session`` to end after its current step, and say
        which step it had reached (the run's "cancelled after step k" then tells how long
        Stop took, in steps); the runs of other sessions go on. With ``wait`` (seconds), a
        run that ends within it gets ``""``: it says how it ended itself, and a page that
        shows both answers in one place must not let a late "stopping" overwrite that."""
        event, ended = self.cancels.get(session), self.ended.get(session)
        if event is None:
            return "nothing of yours is running"
        event.set()
        reached = self.reached.get(session)
        if wait and ended is not None and ended.wait(wait):
            return ""
        return "stopping after the current step" + (f" ({reached})" if reached else "")

    @contextmanager
    def _run(self, session: str) -> Iterator[threading.Event]:
        """A run of browser session ``session``: its cancel event for :meth:`stop` while it
        lasts, forgotten on the way out (unless a newer run of the session replaced it)."""
        cancel = self.cancels[session] = threading.Event()
        ended = self.ended[session] = threading.Event()
        try:
            yield cancel
        finally:
            if self.cancels.get(session) is cancel:
                del self.cancels[session], self.ended[session]
                self.reached.pop(session, None)
            ended.set()

    def generate(self, settings: Settings, progress: Progress | None = None,
                 session: str = "") -> tuple[Path, dict, float]:  # fmt: skip
        """One image: ``(png path, record, seconds)``; the PNG carries the full record.
        ``session`` is the browser session whose Stop may end it (:meth:`stop`). The
        seconds of a method's first run on this model include its warm-up
        (:meth:`warmed_up`: Compare warms each method up before timing it)."""
        with self._run(session) as cancel:
            return self._generate(settings, progress, session, cancel)

    def _generate(self, settings: Settings, progress: Progress | None, session: str, cancel: threading.Event,
                  keep: bool = True) -> tuple[Path | None, dict | None, float]:  # fmt: skip
        """:meth:`generate` under the caller's ``cancel`` flag (Compare holds one over all its
        methods, so a Stop between two methods is not lost); ``keep=False`` saves nothing
        (a warm-up): ``(None, None, seconds)``."""
        if settings.method not in METHODS:
            raise StudioError(f"unknown method {settings.method!r}")
        settings = self._visitor_settings(settings)
        note = self._cost_note(settings)
        if cancel.is_set():
            raise GenerationCancelled("stopped before the run began")

        def step(i: int, n: int, _latents) -> bool:
            self.reached[session] = f"step {i + 1} of {n}"
            if progress is not None:
                progress((i + 1) / n, f"{settings.method}: step {i + 1} of {n}" + (f" ({note})" if note else ""))
            return not cancel.is_set()

        kwargs = self._generate_kwargs(settings)
        prompt = kwargs.pop("prompt")
        if settings.method == "regional" and not settings.method_params:
            used = {name for name, *_ in settings.loras or []}
            regions = self.regions.get(session, {})
            kwargs["method_params"] = {"regions": {n: r for n, r in regions.items() if n in used}}
            prompts = {n: p for n, p in self.region_prompts.get(session, {}).items() if n in used}
            if prompts:
                kwargs["method_params"]["prompts"] = prompts
        with self.lock:
            start = time.perf_counter()
            options = RunOptions(callback=step, return_masks=True)
            images, masks = self.model_thread.run(self.composer.generate, prompt, run=options, **kwargs)
            seconds = time.perf_counter() - start
            self.warmed.add(settings.method)
            if not keep:
                return None, None, seconds
            self.made += 1
            image = images[0]
            path = save_png(image, self.outputs / f"{self.made:05d}-{settings.method}-{settings.seed}.png")
            if masks[0]:
                self._keep_regions(path, image, masks[0])
        return path, json.loads(image.info["compose"]), seconds

    def warmed_up(self, method: str) -> bool:
        """Whether ``method`` has run on this model: a first run also pays a warm-up (memory
        allocation, lazily built kernels and caches, a method's one-time preparation such as
        CMLoRA's frequency profiles), so its seconds are not one image's cost."""
        return method in self.warmed

    def _visitor_settings(self, settings: Settings) -> Settings:
        """``settings`` as a visitor may give them, checked before the model's lock is
        taken: regions only as boxes (:func:`~compose.methods.regional.check_boxes`; a mask
        is uploaded with :meth:`set_region`, never named by a server path), and prompts
        within :attr:`limits` by their length alone (the composer counts their chunks
        before any model work)."""
        for what, text in (("the prompt", settings.prompt), ("the negative prompt", settings.negative_prompt)):
            if not isinstance(text, str):
                raise StudioError(f"{what} must be text, got {type(text).__name__}")
            checks.prompt_length(self.limits, what, text)
        params = settings.method_params
        if not isinstance(params, dict) or "regions" not in params:
            return settings
        try:
            boxes = check_boxes(params["regions"])
        except ValueError as error:
            raise StudioError(f"method_params: {error}") from None
        return replace(settings, method_params={**params, "regions": boxes or None})

    def _keep_regions(self, path: Path, image: Image.Image, masks: dict[str, Image.Image]) -> None:
        view = path.with_name(f"{path.stem}-regions.png")
        mask_overlay(image, masks, size=max(256, *image.size)).save(view)
        keys = [f'<span style="color:rgb{colour}">■</span> {html.escape(text)}' for text, colour in legend(masks)]
        self.region_views[path] = (view, " · ".join(keys))

    def regions_of(self, path: Path) -> tuple[Path, str] | None:
        """Where the image at ``path`` confined each LoRA (``routed``, ``regional``): the
        picture (:func:`~compose.overlay.mask_overlay`, at least 256 px) and its colour
        legend (HTML), or ``None`` for a method that acts everywhere."""
        return self.region_views.get(Path(path))

    def _cost_note(self, settings: Settings) -> str | None:
        return self.cost_note(settings.width, settings.height, settings.steps)

    def cost_note(self, width: int | None, height: int | None, steps: int) -> str | None:
        """A warning for a request (px, px, steps) that costs many ordinary images, shown
        beside the size sliders as they move and with the progress; ``None`` when cheap."""
        native = self.composer.shape.native
        width, height = width or native, height or native
        if not all(isinstance(v, int | float) and v > 0 for v in (width, height, steps)):
            return None
        return cost_note(int(width), int(height), native, int(steps))

    def clipscore(self, path: Path, record: dict) -> float | None:
        """The image's CLIPScore, ``100·max(cos, 0)`` against its LoRAs' triggers, as the
        bench scores; ``None`` without a CLIP model or a LoRA (:meth:`judge` says more)."""
        return self.judge(path, record, presence=False)["clipscore"]

    def judge(self, path: Path, record: dict, presence: bool = True) -> dict:
        """What can be said of how an image shows its LoRAs: ``{"clipscore": 100·max(cos, 0),
        "cosine": cos (a CLIPScore of 0 hides how far below a match the image is), "text":
        what CLIP compared the image with (the LoRAs' trigger words, as the bench does, else
        the prompt), "presence": the demo world's concept detectors}``; each ``None`` where it
        cannot be computed (no CLIP model, no LoRA, not demo-world concepts)."""
        from ..evaluation.clipscore import composition_text

        names = [lora["name"] for lora in record["loras"]]
        with Image.open(path) as image:
            picture = image.convert("RGB")
        out = {"clipscore": None, "cosine": None, "text": None,
               "presence": concept_presence(picture, names) if presence else None}  # fmt: skip
        if self.scorer is None or not names:
            return out
        text = composition_text([t for lora in record["loras"] for t in lora["triggers"]]) or record["prompt"]
        cosine = float(self.model_thread.run(self.scorer.cosine, [picture], [text])[0])
        return {**out, "clipscore": 100 * max(cosine, 0.0), "cosine": cosine, "text": text}

    def compare(self, settings: Settings, progress: Progress | None = None, session: str = "") -> Iterator[dict]:
        """The same settings with every method, one result as each finishes (so a page can
        show it at once): path, method, seconds, CLIPScore, and on the demo world the
        concepts present (:meth:`judge`). ``session``: as for :meth:`generate`; one Stop
        ends the whole comparison, whenever it comes.

        Every method is timed alike, warm: a method not yet run on this model first runs
        :data:`WARM_UP_STEPS` untimed steps (its first call's warm-up once made Switch look
        26 times slower here than in Compose), and ``warm_up`` gives those seconds (``None``
        when the method was warm already)."""
        with self._run(session) as cancel:
            for k, method in enumerate(METHODS):
                params = settings.method_params if method == settings.method else None
                one = Settings(**{**vars(settings), "method": method, "method_params": params})
                yield self._compare_one(one, _part(progress, k), session, cancel)

    def _compare_one(self, settings: Settings, progress: Progress | None, session: str,
                     cancel: threading.Event) -> dict:  # fmt: skip
        """One method of :meth:`compare`: warmed up if it is not yet, then timed and judged."""
        warm_up = None
        if not self.warmed_up(settings.method):
            warm = replace(settings, steps=min(settings.steps, WARM_UP_STEPS))
            _, _, warm_up = self._generate(warm, _warming(progress), session, cancel, keep=False)
        path, record, seconds = self._generate(settings, progress, session, cancel)
        judged = self.judge(path, record)
        scores = {key: judged[key] for key in ("clipscore", "cosine", "presence")}
        return {"method": settings.method, "path": path, "seconds": seconds, "warm_up": warm_up, **scores}

    def xy_plot(self, settings: Settings, x_kind: str, x_values: str, y_kind: str | None = None, y_values: str = "",
                progress: Callable[[int, int], None] | None = None,
                session: str = "") -> tuple[Path, float]:  # fmt: skip
        """An X/Y plot (:mod:`compose.xy`) of ``settings`` with one or two axes varied: the
        grid PNG (every cell's settings inside) and the seconds it took. A method axis runs
        each method with its defaults, so the Compose tab's method parameters are dropped.
        ``progress(cells done, cells)`` is called before the first cell and after each;
        :meth:`stop` of ``session`` ends the plot within one step
        (:class:`~compose.loop.GenerationCancelled`, naming the cell and step reached)."""
        from ..xy import parse_axis, xy_plot

        try:
            x = parse_axis(x_kind, x_values, self.composer)
            y = parse_axis(y_kind, y_values, self.composer) if y_kind else None
        except ValueError as error:
            raise StudioError(str(error)) from None
        kwargs = self._generate_kwargs(self._visitor_settings(settings))
        if "method" in (x.kind, y and y.kind):
            kwargs.pop("method_params")
        total = len(x.values) * (len(y.values) if y else 1)
        cells = [0]
        start = time.perf_counter()
        with self._run(session) as cancel, self.lock:

            def cell(done: int, total: int, _image=None) -> None:
                cells[0] = done
                if progress is not None:
                    progress(done, total)
                if cancel.is_set() and done < total:
                    raise GenerationCancelled(f"stopped after {done} of {total} cells")

            cell(0, total)
            try:
                plot = self.model_thread.run(xy_plot, self.composer, kwargs, x, y, cell,
                                             lambda *_: not cancel.is_set())  # fmt: skip
            except GenerationCancelled as stopped:
                if not str(stopped).startswith("cancelled"):  # between cells: it names them already
                    raise
                raise GenerationCancelled(f"stopped in cell {cells[0] + 1} of {total}, {stopped}") from None
            self.made += 1
            path = plot.save(self.outputs / f"{self.made:05d}-xy.png")
        return path, time.perf_counter() - start

    def png_info(self, png: str | Path) -> dict:
        """What a PNG says of how it was made: ``{"source": "compose" | "a1111",
        "settings": the Settings fields, "parameters": A1111's text}``."""
        settings = self.settings_from_png(png)
        with Image.open(png) as image:
            text = image.info.get("parameters", "")
            source = "compose" if "compose" in image.info else "a1111"
        return {"source": source, "settings": vars(settings), "parameters": text}

    def png_info_text(self, png: str | Path) -> str:
        """:meth:`png_info` as lines of Markdown, every value escaped."""
        info = self.png_info(png)
        s = info["settings"]
        loras = ", ".join(f"{md(n)} {w}" for n, w, *_ in s["loras"] or []) or "none besides the prompt's tags"
        lines = [f"**{md(Path(png).name)}**, made by {'compose' if info['source'] == 'compose' else 'AUTOMATIC1111'}",
                 f"- prompt: {md(s['prompt'])}", f"- negative prompt: {md(s['negative_prompt']) or 'none'}",
                 f"- method: {md(s['method'])} {md(s['method_params'] or '')}", f"- LoRAs: {loras}",
                 f"- {s['steps']} steps, guidance {s['guidance_scale']}, seed {s['seed']}, "
                 f"{s['width'] or 'native'} x {s['height'] or 'native'} px, {md(s['scheduler'])}"]  # fmt: skip
        return "\n".join(lines)

    def settings_from_png(self, png: str | Path) -> Settings:
        """The settings stored in a PNG: compose's own record, or else AUTOMATIC1111's
        ``parameters`` text (:mod:`compose.a1111`). Its LoRAs must be in the library.

        ``<lora:...>`` tags stay in the prompt (they carry schedules and block weights);
        the other LoRAs come back as table weights."""
        try:
            with Image.open(png) as image:
                ours, text = "compose" in image.info, image.info.get("parameters")
            if not ours and text:
                return self._settings_from_a1111(png, text)
            record = read_record(png)
        except (OSError, ValueError) as error:
            name = Path(png).name  # the server's temporary path is no business of the page
            raise StudioError(f"{name}: {str(error).replace(str(png), name)}") from None
        outside = [m for m in record_masks(record) if Path(m).resolve().parent != self.outputs.resolve()]
        if outside:
            raise StudioError(f"{Path(png).name}: its regional method names the mask file {outside[0]!r}, which this "
                              "studio did not paint; paint the regions again")  # fmt: skip
        kwargs = generate_kwargs(record)
        tagged = {use.name for use in extract_lora_tags(record["prompt"])[1]}
        by_hash = {lora.sha256: lora.name for lora in self.composer.loras.values()}
        loras = []
        for entry in record["loras"]:
            same = self.composer.loras.get(entry["name"])  # two names may hold the same bytes: the name decides
            name = entry["name"] if same and same.sha256 == entry["sha256"] else by_hash.get(entry["sha256"])
            if name is None:
                raise StudioError(f"the image uses LoRA {entry['name']} ({entry['file']}); add it to the library first")
            if entry["name"] not in tagged:
                blocks = entry.get("blocks")
                loras.append((name, entry["weight"]) if blocks is None else (name, entry["weight"], blocks))
        kwargs.update(prompt=record["prompt"], loras=loras)
        return _settings_of(kwargs)

    def _settings_from_a1111(self, png: str | Path, text: str) -> Settings:
        from ..a1111 import settings_from_parameters

        kwargs = settings_from_parameters(text)
        missing = [name for name in kwargs.pop("loras") if name not in self.composer.loras]
        if missing:
            raise StudioError(f"{Path(png).name}: its prompt uses LoRA {missing[0]}, which is not in the library; "
                              "add it first")  # fmt: skip
        return _settings_of(kwargs)


def _part(progress: Progress | None, k: int) -> Progress | None:
    """Method ``k``'s share of Compare's one bar; the text says which method, and its step."""
    if progress is None:
        return None
    return lambda fraction, text: progress((k + fraction) / len(METHODS), f"method {k + 1} of {len(METHODS)}, {text}")


def _warming(progress: Progress | None) -> Progress | None:
    """``progress`` with its text marked as a warm-up (so a user knows why the bar rewinds)."""
    return None if progress is None else (lambda fraction, text: progress(0.0, f"warming up, {text}"))


def base_family(lora) -> str:
    """The base family a LoRA is for, as the Library shows it: found from its shapes
    (:func:`~compose.loading.detect_family`), or where the shapes are of no known family
    (the demo world's), what its metadata declares (``modelspec.architecture``, else
    kohya's ``ss_base_model_version``), marked as declared."""
    if not lora.family.startswith("unknown"):
        return lora.family
    declared = lora.metadata.get("modelspec.architecture", "").removesuffix("/lora")
    declared = declared or lora.metadata.get("ss_base_model_version", "")
    return f"{declared} (its metadata)" if declared else lora.family


def as_weight(value: object) -> float:
    """A table weight as a number; anything else (empty, text, NaN) is 0: off."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return number if number == number else 0.0


def _framed(picture: Image.Image, on: bool) -> Image.Image:
    """A card's picture in its frame: a thick green one when on; greyed, thin grey when off."""
    from PIL import ImageDraw, ImageOps

    if not on:
        picture = Image.blend(ImageOps.grayscale(picture).convert("RGB"), Image.new("RGB", picture.size, "white"), 0.35)
    border = max(4, picture.width // 24) if on else max(2, picture.width // 96)
    ImageDraw.Draw(picture).rectangle((0, 0, picture.width - 1, picture.height - 1), outline=ON_COLOUR if on else
                                      OFF_COLOUR, width=border)  # fmt: skip
    return picture


def _safe(name: str) -> str:
    """``name`` as a file-name part: letters, digits, ``-`` and ``_`` only."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64]


def _painted_mask(painting: dict | None):
    """``uint8`` mask (255 = painted) from an image-editor value, or ``None`` if nothing is painted."""
    import numpy as np

    layers = [np.asarray(layer) for layer in (painting or {}).get("layers") or [] if layer is not None]
    strokes = [layer[..., 3] > 0 for layer in layers if layer.ndim == 3 and layer.shape[-1] == 4]
    if not strokes or not np.any(strokes):
        return None
    return (np.any(strokes, axis=0) * 255).astype(np.uint8)
