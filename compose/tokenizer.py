"""The real CLIP BPE tokenizer, built offline from the vocabulary that open_clip ships.

Stable Diffusion's tokenizer is CLIP's byte-level BPE. Its merges file ships inside
open_clip (``bpe_simple_vocab_16e6.txt.gz``), so a transformers ``CLIPTokenizer`` with
the exact SD vocabulary (49,408 tokens) can be made without a model hub.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

CLIP_VOCAB_SIZE = 49408
_NUM_MERGES = CLIP_VOCAB_SIZE - 256 - 256 - 2


def write_clip_vocabulary(folder: Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` of CLIP's BPE into ``folder``.

    The vocabulary is the 256 byte characters, the same with ``</w>``, one token per
    merge, then the two special tokens, in that order (ids 0..49407). open_clip is imported
    here, not with the module, so that :mod:`compose.tiny` and the speed benchmark import
    on a machine without it (the GPU check's).
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


@lru_cache(maxsize=1)
def clip_tokenizer() -> CLIPTokenizer:
    """Stable Diffusion's tokenizer (slow ``CLIPTokenizer``; the fast one mis-tokenizes
    when built from these files)."""
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = write_clip_vocabulary(Path(tmp))
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77, pad_token="<|endoftext|>")
