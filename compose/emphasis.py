"""AUTOMATIC1111's prompt syntax for the text encoder: emphasis, ``BREAK`` and 75-token chunks.

A prompt pasted from A1111 must condition the UNet as it did there, so its syntax is read
as A1111 reads it (``modules/prompt_parser.py`` and ``modules/sd_hijack_clip.py``):

- ``(text)`` multiplies the attention of ``text`` by 1.1, ``[text]`` divides it by 1.1,
  ``(text:1.5)`` sets the factor; brackets nest and multiply; an unclosed bracket runs to
  the end; ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literal characters;
- ``BREAK`` (upper case, a whole word) ends the current chunk;
- the tokens are cut into chunks of 75 (a chunk ends early at a comma within the last 20
  tokens, A1111's default "comma padding backtrack"), each wrapped with BOS/EOS and padded
  to 77, encoded separately and joined along the sequence axis;
- each token's encoder output is multiplied by its factor, then the chunk is rescaled to
  its original mean ("Original" emphasis).

Where A1111 takes that mean over the whole batch of one chunk, compose takes it per prompt
(A1111 at batch size 1), so that an image does not depend on the other prompts of its batch.
Prompt editing (``[a:b:0.5]``) and alternation (``[a|b]``) change the prompt during the
steps; compose refuses them rather than encoding them as text.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Protocol

CHUNK_TOKENS = 75
"""Tokens of a chunk between its BOS and EOS (the encoder's window of 77, less the two)."""
COMMA_BACKTRACK = 20
ROUND, SQUARE = 1.1, 1 / 1.1
MEAN_FLOOR = 1e-3
"""Below this fraction of a chunk's mean magnitude, its mean is not restored (:func:`emphasised`)."""
BREAK = "BREAK"

CLAUSE_BREAKS = (",", ";", ".", "and")
"""The words that end a clause of a prompt (:func:`clause_positions`)."""

_ATTENTION = re.compile(r"\\[\\()\[\]]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_EDITING = re.compile(r"(?<!\\)\[[^\[\]()]*[:|][^\[\]()]*]")


class Tokenizer(Protocol):
    """What is used of a transformers CLIP tokenizer."""

    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    unk_token: str
    unk_token_id: int

    def __call__(self, text: list[str], truncation: bool, add_special_tokens: bool): ...

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class Chunk(NamedTuple):
    """One encoder window: 77 token ids and each token's emphasis factor."""

    ids: list[int]
    weights: list[float]


def parse_attention(text: str) -> list[tuple[str, float]]:
    """``[(text, factor), ...]`` as A1111's ``parse_prompt_attention``: runs of equal factor
    merged, ``("BREAK", -1.0)`` where a chunk must end, ``[("", 1.0)]`` for an empty prompt."""
    if _EDITING.search(text):
        raise ValueError(f"prompt {_short(text)}: prompt editing [from:to:when] and alternation [a|b] are not "
                         "supported; escape the brackets as \\[ \\] to keep them as text")  # fmt: skip
    parts: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[1] *= factor

    for match in _ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            parts.append([piece[1:], 1.0])
        elif piece in "([":
            (rounds if piece == "(" else squares).append(len(parts))
        elif weight is not None and rounds:
            multiply(rounds.pop(), _factor(weight, text))
        elif piece == ")" and rounds:
            multiply(rounds.pop(), ROUND)
        elif piece == "]" and squares:
            multiply(squares.pop(), SQUARE)
        else:
            for i, plain in enumerate(_BREAK.split(piece)):
                parts.extend([[BREAK, -1.0], [plain, 1.0]] if i else [[plain, 1.0]])
    for start in rounds:
        multiply(start, ROUND)
    for start in squares:
        multiply(start, SQUARE)
    return _merged(parts) or [("", 1.0)]


def _factor(weight: str, text: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise ValueError(f"prompt {_short(text)}: {weight!r} is not a number; write (text:1.2)") from None


def _merged(parts: list[list]) -> list[tuple[str, float]]:
    merged: list[list] = []
    for part in parts:
        if merged and merged[-1][1] == part[1]:
            merged[-1][0] += part[0]
        else:
            merged.append(part)
    return [(text, weight) for text, weight in merged]


def _short(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def plain_text(tokenizer: Tokenizer, text: str) -> str | None:
    """The text the encoder would see if ``text`` needs none of the syntax (no factor other
    than 1, no BREAK, at most 75 tokens): then it encodes as diffusers encodes it. Else ``None``."""
    parsed = parse_attention(text)
    if len(parsed) != 1 or parsed[0][1] != 1.0:
        return None
    ids = tokenizer([parsed[0][0]], truncation=False, add_special_tokens=False).input_ids[0]
    return parsed[0][0] if len(ids) <= CHUNK_TOKENS else None


def _token_ids(tokenizer: Tokenizer, tokens: list[str]) -> list[int | None]:
    """Each vocabulary token's id, ``None`` where the vocabulary lacks it (looked up one by
    one: building ``get_vocab()``'s 49,408 entries took 60 ms a call)."""
    unknown = tokenizer.unk_token_id
    ids = tokenizer.convert_tokens_to_ids(tokens)
    return [None if i == unknown and t != tokenizer.unk_token else i for t, i in zip(tokens, ids, strict=True)]


def chunks(tokenizer: Tokenizer, text: str) -> list[Chunk]:
    """``text`` as A1111 cuts it into encoder windows (at least one)."""
    parsed = parse_attention(text)
    pieces = tokenizer([piece for piece, _ in parsed], truncation=False, add_special_tokens=False).input_ids
    comma = _token_ids(tokenizer, [",</w>"])[0]
    done: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1
    for tokens, (piece, weight) in zip(pieces, parsed, strict=True):
        if piece == BREAK and weight == -1.0:
            done.append(_window(tokenizer, ids, weights))
            ids, weights, last_comma = [], [], -1
            continue
        for token in tokens:
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK_TOKENS and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                done.append(_window(tokenizer, ids[:cut], weights[:cut]))
                ids, weights, last_comma = ids[cut:], weights[cut:], -1
            if len(ids) == CHUNK_TOKENS:
                done.append(_window(tokenizer, ids, weights))
                ids, weights, last_comma = [], [], -1
            ids.append(token)
            weights.append(weight)
    if ids or not done:
        done.append(_window(tokenizer, ids, weights))
    return done


def _window(tokenizer: Tokenizer, ids: list[int], weights: list[float]) -> Chunk:
    """BOS, the tokens, EOS, then the tokenizer's padding to 77: what diffusers feeds the
    encoder for a short prompt (A1111 pads with EOS, then SD2's pad id after the first EOS)."""
    pad = CHUNK_TOKENS - len(ids)
    return Chunk(
        [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad,
        [1.0, *weights, 1.0] + [1.0] * pad,
    )


def batch_chunks(tokenizer: Tokenizer, texts: list[str]) -> list[list[Chunk]]:
    """Every text's chunks, the shorter padded with the empty prompt's chunk to the longest,
    as A1111 pads a batch and (its "Pad conds" setting) a negative prompt."""
    encoded = [chunks(tokenizer, text) for text in texts]
    count = max(len(c) for c in encoded)
    empty = _window(tokenizer, [], [])
    return [c + [empty] * (count - len(c)) for c in encoded]


def emphasised(states, weights):
    """``states`` ``(B, 77, D)`` of one chunk with each token's output multiplied by its factor
    ``weights`` ``(B, 77)``, each row rescaled to its original mean (A1111's "Original").

    The mean is restored only where it means something: a row whose mean, before or after the
    weighting, is within :data:`MEAN_FLOOR` of its mean magnitude, or changed sign, would be
    scaled by a ratio of near-zero numbers (a layer norm centres each token on 0: an untrained encoder's rows have
    a mean of 1e-8 of their magnitude, the demo world's 5e-4), so it keeps its scale."""
    import torch

    scaled = states * weights[..., None].to(states.dtype)
    before, after = states.mean(dim=(1, 2), keepdim=True), scaled.mean(dim=(1, 2), keepdim=True)
    floor = MEAN_FLOOR * scaled.abs().mean(dim=(1, 2), keepdim=True)
    meaningful = (before * after > 0) & (before.abs() > floor) & (after.abs() > floor)
    return scaled * torch.where(meaningful, before / after, torch.ones_like(after))


def attention_mask(ids, eos: int):
    """``(B, 77)`` 1 up to each window's first EOS, 0 on its padding, as the tokenizer's mask
    (for the encoders that take one)."""
    first_eos = (ids == eos).int().argmax(dim=1, keepdim=True)
    return (ids.new_tensor(range(ids.shape[1]))[None, :] <= first_eos).long()


def phrase_positions(tokenizer: Tokenizer, text: str, phrase: str) -> list[int]:
    """The positions, in ``text``'s encoder sequence (its chunks of 77 one after another),
    of every token of every occurrence of ``phrase``; empty if it does not occur."""
    ids = [token for chunk in chunks(tokenizer, text) for token in chunk.ids]
    target = tokenizer([phrase], truncation=False, add_special_tokens=False).input_ids[0]
    found: list[int] = []
    for start in range(len(ids) - len(target) + 1) if target else ():
        if ids[start : start + len(target)] == target:
            found += range(start, start + len(target))
    return sorted(set(found))


def clause_positions(tokenizer: Tokenizer, text: str, phrase: str) -> list[int]:
    """The positions, in ``text``'s encoder sequence, of every clause that holds ``phrase``:
    around each occurrence, the run of tokens up to the nearest :data:`CLAUSE_BREAKS` word
    or the window's edge ("a zorbo creature on the left" in "a zorbo creature on the left
    and a klinko robot on the right"). Where a base's trigger words do not say where their
    concept is drawn, the clause's other words ("left") do. Empty if ``phrase`` does not occur."""
    ids = [token for chunk in chunks(tokenizer, text) for token in chunk.ids]
    stops = set(_token_ids(tokenizer, [f"{word}</w>" for word in CLAUSE_BREAKS]))
    stops |= {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    found: set[int] = set()
    for position in phrase_positions(tokenizer, text, phrase):
        left = right = position
        while left > 0 and ids[left - 1] not in stops:
            left -= 1
        while right + 1 < len(ids) and ids[right + 1] not in stops:
            right += 1
        found.update(range(left, right + 1))
    return sorted(found)


def words_at(tokenizer: Tokenizer, text: str, positions: list[int]) -> str:
    """The words at ``positions`` of ``text``'s encoder sequence, each run of consecutive
    positions decoded and the runs joined by commas (emphasis and ``BREAK`` dropped)."""
    ids = [token for chunk in chunks(tokenizer, text) for token in chunk.ids]
    runs: list[list[int]] = []
    for position in sorted(positions):
        if runs and runs[-1][-1] == position - 1:
            runs[-1].append(position)
        else:
            runs.append([position])
    return ", ".join(tokenizer.decode([ids[p] for p in run]).strip() for run in runs)
