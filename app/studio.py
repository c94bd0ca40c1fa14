"""The studio's state and actions, independent of the Gradio layout (``ui.py``).

A :class:`Studio` owns one :class:`~compose.Composer`, a LoRA library folder, the
folder of the PNGs it made, and one cancel flag per browser session that the session's
running generation checks after every denoising step (each session also keeps its own
gallery, ``ui.py``). Every action returns plain values (rows, paths, messages), so the
UI, the public API and the tests call the same code.

The studio is shared by everyone who can reach it, so nothing one visitor does may
reach into another's work or the server: Stop ends only the caller's own run; switching
the base model and loading a server folder are *operator actions*, off unless the
studio is told otherwise (``operator``); every change to the model (loading, removing,
switching) happens under the model's lock, so it never lands in the middle of a run;
uploads are untrusted (safetensors only unless pickle is allowed, a size limit, names
that stay inside the library folder, parsed before the lock is taken); and success
messages escape the names they show (:func:`md`), which come from files and PNGs.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..checks import Limits, cost_note
from ..composer import Composer, ModelLoadError, generate_kwargs
from ..evaluation.presence import concept_presence
from ..loading import CATEGORIES, PICKLE_SUFFIXES, LoRAError, load_lora, write_sidecar
from ..metadata import read_record, record_masks, save_png
from ..methods import METHODS
from ..methods.regional import region_mask
from ..prompts import extract_lora_tags

LIBRARY_COLUMNS = ["name", "category", "triggers", "base family", "rank", "high-frequency score"]
LORA_COLUMNS = ["LoRA", "weight"]
Progress = Callable[[float, str], None]


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
        self.cancels: dict[str, threading.Event] = {}
        self.made = 0
        self.outputs = Path(tempfile.mkdtemp(prefix="compose-studio-"))
        self.model = model
        self.composer = self._load_model(model)
        self.regions: dict[str, list[float] | str] = {}
        self.load_trusted_folder(self.library)

    # -- library ---------------------------------------------------------------------

    def library_rows(self) -> list[list]:
        rows = []
        for lora in self.composer.loras.values():
            freq = next((v.score for k, v in lora.derived.items() if k[0] == "frequency"), None)
            rows.append([lora.name, lora.category or "", ", ".join(lora.triggers), lora.family, lora.rank,
                         "" if freq is None else round(freq, 4)])  # fmt: skip
        return rows

    def compose_rows(self, previous: list[list] | None = None) -> list[list]:
        """The Compose table: every library LoRA with its weight (kept from ``previous``)."""
        weights = {row[0]: row[1] for row in previous or [] if row}
        return [[name, weights.get(name, 0.0)] for name in self.composer.loras]

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
                    loaded.append(self.composer.add_lora(lora).name)
            except (LoRAError, ValueError) as error:
                failed.append(str(error))
        names = ", ".join(md(name) for name in loaded)
        message = f"loaded {len(loaded)} LoRA(s) from {md(folder)}" + (f": {names}" if loaded else "")
        return message + "".join(f"\n- not loaded: {md(f)}" for f in failed)

    def _read(self, path: Path, name: str):
        """Parse a LoRA file for this model without touching the model (no lock needed)."""
        return load_lora(path, name=name, allow_pickle=self.allow_pickle,
                         unet_config=dict(self.composer.pipeline.unet.config), limits=self.limits)  # fmt: skip

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
                self.composer.add_lora(lora)
            except LoRAError as error:
                raise StudioError(f"{name}: {error.reason}") from None
            shutil.copyfile(source, target)
        return f"added {md(lora.name)} ({lora.family}, rank {lora.rank}, {len(lora.targets)} modules)"

    def edit(self, name: str, category: str, triggers: str) -> str:
        lora = self._lora(name)
        if category and category not in CATEGORIES:
            raise StudioError(f"category must be one of {', '.join(CATEGORIES)}")
        phrases = [t.strip() for t in triggers.split(",") if t.strip()]
        with self.lock:
            file = self.library / f"{name}.safetensors"
            if file.exists():  # merged into <name>.json: A1111's fields there are kept
                try:
                    write_sidecar(file, category or None, phrases)
                except (ValueError, OSError) as error:  # an unreadable sidecar, an unwritable folder
                    raise StudioError(f"{name}: the sidecar cannot be updated ({error})") from None
            lora.category, lora.triggers = category or None, phrases
        words = ", ".join(md(t) for t in lora.triggers) or "none"
        return f"{md(name)}: category {lora.category or 'none'}, triggers {words}"

    def remove(self, name: str) -> str:
        self._lora(name)
        with self.lock:
            self.composer.unload_lora(name)
        return f"removed {md(name)} from this session (its file stays in {md(self.library)})"

    def frequency(self, name: str) -> str:
        self._lora(name)
        with self.lock:
            profile = self.composer.frequency_profile(name)
        return (f"{md(name)}: high-frequency score {profile.score:.4f} (radius >= {profile.cutoff} px of "
                f"{profile.size})")  # fmt: skip

    def _lora(self, name: str):
        if name not in self.composer.loras:
            raise StudioError(f"no LoRA named {name!r} in the library")
        return self.composer.loras[name]

    # -- regions ---------------------------------------------------------------------

    def set_region(self, name: str, box: str = "", painting: dict | None = None) -> str:
        """Confine LoRA ``name`` to a region for the ``regional`` method: the strokes of
        ``painting`` (a Gradio image-editor value of RGBA arrays; painted = inside),
        else ``box`` ``"x0, y0, x1, y1"`` in fractions of the image."""
        self._lora(name)
        mask = _painted_mask(painting)
        if mask is not None:
            path = self.outputs / f"region-{name}.png"
            Image.fromarray(mask).save(path)
            self.regions[name] = str(path)
        elif box.strip():
            try:
                values = [float(v) for v in box.replace(" ", "").split(",")]
                region_mask(values, 8, 8)
            except ValueError as error:
                raise StudioError(f"region of {name}: {error}") from None
            self.regions[name] = values
        else:
            raise StudioError(f"paint a region for {name} or give a box x0, y0, x1, y1")
        return self.describe_regions()

    def clear_regions(self) -> str:
        self.regions.clear()
        return self.describe_regions()

    def describe_regions(self) -> str:
        if not self.regions:
            return "no regions: with the regional method every LoRA covers the whole image"
        parts = [f"{md(n)}: " + ("painted mask" if isinstance(r, str) else f"box {r}") for n, r in self.regions.items()]
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
                composer = self._load_model(model)
            except (ModelLoadError, OSError, ValueError) as error:
                raise StudioError(str(error)) from None
            previous, self.composer, self.model = self.composer, composer, model
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

    def stop(self, session: str = "") -> str:
        """Ask the run of browser session ``session`` to end after its current step; the
        runs of other sessions go on."""
        event = self.cancels.get(session)
        if event is None:
            return "nothing of yours is running"
        event.set()
        return "stopping after the current step"

    def generate(self, settings: Settings, progress: Progress | None = None,
                 session: str = "") -> tuple[Path, dict, float]:  # fmt: skip
        """One image: ``(png path, record, seconds)``; the PNG carries the full record.
        ``session`` is the browser session whose Stop may end it (:meth:`stop`)."""
        if settings.method not in METHODS:
            raise StudioError(f"unknown method {settings.method!r}")
        cancel = self.cancels[session] = threading.Event()
        note = self._cost_note(settings)

        def step(i: int, n: int, _latents) -> bool:
            if progress is not None:
                progress((i + 1) / n, f"{settings.method}: step {i + 1} of {n}" + (f" ({note})" if note else ""))
            return not cancel.is_set()

        kwargs = {k: v for k, v in vars(settings).items() if k not in ("insert_triggers", "prompt")}
        if settings.method == "regional" and not settings.method_params:
            used = {name for name, *_ in settings.loras or []}
            kwargs["method_params"] = {"regions": {n: r for n, r in self.regions.items() if n in used}}
        try:
            with self.lock:
                start = time.perf_counter()
                image = self.composer.generate(self._prompt(settings), callback=step, **kwargs)[0]
                seconds = time.perf_counter() - start
                self.made += 1
                path = save_png(image, self.outputs / f"{self.made:05d}-{settings.method}-{settings.seed}.png")
        finally:
            if self.cancels.get(session) is cancel:
                del self.cancels[session]
        return path, json.loads(image.info["compose"]), seconds

    def _cost_note(self, settings: Settings) -> str | None:
        """A warning for a request that costs many ordinary images (shown with the progress)."""
        native = self.composer.shape.native
        if not all(isinstance(v, int) for v in (settings.width or native, settings.height or native, settings.steps)):
            return None
        return cost_note(settings.width or native, settings.height or native, native, settings.steps)

    def clipscore(self, path: Path, record: dict) -> float | None:
        if self.scorer is None or not record["loras"]:
            return None
        from ..evaluation.clipscore import composition_text

        text = composition_text([t for lora in record["loras"] for t in lora["triggers"]]) or record["prompt"]
        with Image.open(path) as image:
            return float(self.scorer.score([image.convert("RGB")], [text])[0])

    def compare(self, settings: Settings, progress: Progress | None = None, session: str = "") -> list[dict]:
        """The same settings with every method: path, method, seconds, CLIPScore, and on
        the demo world the concepts present. ``session``: as for :meth:`generate`."""
        rows = []
        for k, method in enumerate(METHODS):

            def part(fraction: float, text: str, k: int = k) -> None:
                if progress is not None:
                    progress((k + fraction) / len(METHODS), text)

            params = settings.method_params if method == settings.method else None
            path, record, seconds = self.generate(
                Settings(**{**vars(settings), "method": method, "method_params": params}), part, session
            )
            with Image.open(path) as image:
                presence = concept_presence(image, [name for name, *_ in settings.loras or []])
            rows.append({"method": method, "path": path, "seconds": seconds,
                         "clipscore": self.clipscore(path, record), "presence": presence})  # fmt: skip
        return rows

    def settings_from_png(self, png: str | Path) -> Settings:
        """The settings stored in a PNG made by compose; its LoRAs must be in the library.

        ``<lora:...>`` tags stay in the prompt (they carry schedules and block weights);
        the other LoRAs come back as table weights."""
        try:
            record = read_record(png)
        except (OSError, ValueError) as error:
            raise StudioError(f"{Path(png).name}: {error}") from None
        outside = [m for m in record_masks(record) if Path(m).resolve().parent != self.outputs.resolve()]
        if outside:
            raise StudioError(f"{Path(png).name}: its regional method names the mask file {outside[0]!r}, which this "
                              "studio did not paint; paint the regions again")  # fmt: skip
        kwargs = generate_kwargs(record)
        tagged = {use.name for use in extract_lora_tags(record["prompt"])[1]}
        by_hash = {lora.sha256: lora.name for lora in self.composer.loras.values()}
        loras = []
        for entry in record["loras"]:
            name = by_hash.get(entry["sha256"])
            if name is None:
                raise StudioError(f"the image uses LoRA {entry['name']} ({entry['file']}); add it to the library first")
            if entry["name"] not in tagged:
                blocks = entry.get("blocks")
                loras.append((name, entry["weight"]) if blocks is None else (name, entry["weight"], blocks))
        kwargs.update(prompt=record["prompt"], loras=loras)
        return Settings(**kwargs)


def _painted_mask(painting: dict | None):
    """``uint8`` mask (255 = painted) from an image-editor value, or ``None`` if nothing is painted."""
    import numpy as np

    layers = [np.asarray(layer) for layer in (painting or {}).get("layers") or [] if layer is not None]
    strokes = [layer[..., 3] > 0 for layer in layers if layer.ndim == 3 and layer.shape[-1] == 4]
    if not strokes or not np.any(strokes):
        return None
    return (np.any(strokes, axis=0) * 255).astype(np.uint8)
