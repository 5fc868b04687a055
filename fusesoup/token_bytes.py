"""The exact bytes each token of a Hugging Face fast tokenizer stands for, so that tokens compare across tokenizers.

FuseLLM compares token strings after swapping only the word-start marker, so `Ċ` (byte-level newline), `<0x0A>`
(SentencePiece byte fallback) and the pieces of a multi-byte character never match across tokenizers. As bytes
they do. The scheme is read from the backend's own pipeline (model, normalizer, pre-tokenizer, decoder), never from
the tokenizer's name:

- byte-level BPE (a `ByteLevel` pre-tokenizer or decoder): every character is one byte of GPT-2's byte-to-unicode
  table (`Ġ` = space, `Ċ` = newline), so a token can be part of a multi-byte UTF-8 character;
- SentencePiece (a `Metaspace` component, or a decoder that replaces a marker with a space): the marker (`▁`) is a
  space, and with byte fallback `<0xNN>` is the byte NN;
- WordPiece: a `##` continuation is its text, any other token starts a word and so stands for a space + its text
  (the WordPiece decoder's reading; WordPiece drops whitespace, so this is exact only between space-separated words);
- anything else: the token's UTF-8.

Special tokens stand for no bytes (b""): they are never part of the text. Non-special added tokens match their
literal content in the text, so they stand for that content's UTF-8.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _printable_bytes() -> list[int]:
    """Bytes GPT-2's table keeps as their own Latin-1 character: '!'..'~', '¡'..'¬', '®'..'ÿ'."""
    return [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]


def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the other 68 bytes take the code points 256, 257, ... in byte order."""
    printable = _printable_bytes()
    others = [byte for byte in range(256) if byte not in set(printable)]
    table = {chr(byte): byte for byte in printable}
    table.update({chr(256 + rank): byte for rank, byte in enumerate(others)})
    return table


UNICODE_TO_BYTE = _unicode_to_byte()


def token_bytes(tokenizer: PreTrainedTokenizerFast | Tokenizer) -> list[bytes]:
    """For every token id, the bytes the token stands for in the middle of a text (b"" for special tokens and for
    ids the vocabulary skips); a transformers fast tokenizer or a bare `tokenizers.Tokenizer`."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    state = json.loads(backend.to_str())
    decode = _token_decoder(state)
    added = {entry["id"]: entry for entry in state["added_tokens"]}
    vocab = backend.get_vocab(with_added_tokens=True)
    table = [b""] * (max(vocab.values(), default=-1) + 1)
    for token, index in vocab.items():
        if index not in added:
            table[index] = decode(token)
        elif not added[index]["special"]:
            table[index] = added[index]["content"].encode("utf-8")
    return table


def shadowed_fallbacks(tokenizer: PreTrainedTokenizerFast | Tokenizer, table: list[bytes]) -> list[int]:
    """Byte-fallback ids `<0xNN>` whose byte is also a regular token of the vocabulary (`table` = token_bytes).

    The tokenizer falls back to bytes only for text no piece covers, so it never emits these ids: a vocabulary map
    that sent a teacher's `,` to the target's `<0x2C>` instead of its `,` would put the mass on a token the target
    never predicts (they come first in id order, so "first id with these bytes" picks them).
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    fallbacks = [index for token, index in backend.get_vocab(with_added_tokens=False).items()
                 if _BYTE_FALLBACK.fullmatch(token) and len(table[index]) == 1]
    fallback_set = set(fallbacks)
    regular = {piece for index, piece in enumerate(table) if piece and index not in fallback_set}
    return sorted(index for index in fallbacks if table[index] in regular)


def text_token_bytes(table: list[bytes], ids: list[int], text: str) -> list[bytes]:
    """The bytes of each token of `text` (encoded without special tokens) such that they join to `text` exactly.

    A tokenizer may add a word-start space in front of the text (SentencePiece's prepended `▁`, a WordPiece first
    word): that one space is dropped from the first token that holds it (a lone `▁` is then b"").
    Raises ValueError if the tokens spell anything else, e.g. after a lossy normaliser, or a literal `▁` (U+2581)
    in the text of a SentencePiece tokenizer, which encodes it as the marker, a space.
    """
    pieces = [table[index] for index in ids]
    spelled, expected = b"".join(pieces), text.encode("utf-8")
    if spelled == expected:
        return pieces
    if spelled != b" " + expected:
        raise ValueError(f"the tokens spell {spelled[:60]!r}..., not the text {expected[:60]!r}...")
    first = next(position for position, piece in enumerate(pieces) if piece)
    pieces[first] = pieces[first][1:]
    return pieces


def prepended_space(table: list[bytes], ids: list[int], text: str) -> bytes:
    """b" " where the tokenizer put a word-start space in front of `text` (what `text_token_bytes` drops), else b"";
    for tokens that `text_token_bytes` accepts.

    SentencePiece's `prepend_scheme: first` does it unless the text starts with a space; byte-level BPE never does.
    """
    return b" " if len(b"".join(table[index] for index in ids)) == len(text.encode("utf-8")) + 1 else b""


def _token_decoder(state: dict[str, Any]) -> Callable[[str], bytes]:
    """token string -> bytes for the model tokens of a backend tokenizer's JSON `state`."""
    model = state["model"]
    components = [*_flatten(state.get("normalizer")), *_flatten(state.get("pre_tokenizer")),
                  *_flatten(state.get("decoder"))]
    if any(component["type"] == "ByteLevel" for component in components):
        return _byte_level
    byte_fallback = bool(model.get("byte_fallback")) or any(c["type"] == "ByteFallback" for c in components)
    markers = _space_markers(components)
    if markers:
        marker = re.compile("|".join(map(re.escape, sorted(markers))))
        return lambda token: _fallback_byte(token, byte_fallback) or marker.sub(" ", token).encode("utf-8")
    if model["type"] == "WordPiece":
        prefix = model["continuing_subword_prefix"]
        return lambda token: (token[len(prefix):] if token.startswith(prefix) else " " + token).encode("utf-8")
    return lambda token: _fallback_byte(token, byte_fallback) or token.encode("utf-8")


def _flatten(component: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    """The leaf components of a normalizer, pre-tokenizer or decoder, `Sequence`s unpacked."""
    if component is None:
        return
    children = component.get("normalizers") or component.get("pretokenizers") or component.get("decoders")
    if component["type"] == "Sequence" and children is not None:
        for child in children:
            yield from _flatten(child)
    else:
        yield component


def _space_markers(components: list[dict[str, Any]]) -> set[str]:
    """Strings the pipeline writes for a space: Metaspace's replacement, or what a `Replace` swaps with a space."""
    markers = set()
    for component in components:
        if component["type"] == "Metaspace":
            markers.add(component["replacement"])
        elif component["type"] == "Replace" and "String" in component["pattern"]:
            pattern, content = component["pattern"]["String"], component["content"]
            if content == " " and pattern != " ":  # a decoder: marker -> space
                markers.add(pattern)
            elif pattern == " " and content != " ":  # a normaliser: space -> marker
                markers.add(content)
    return markers


def _byte_level(token: str) -> bytes:
    """A byte-level token: one byte per character of GPT-2's table (other characters, if any, as their UTF-8)."""
    return b"".join(bytes([UNICODE_TO_BYTE[char]]) if char in UNICODE_TO_BYTE else char.encode("utf-8")
                    for char in token)


def _fallback_byte(token: str, enabled: bool) -> bytes | None:
    """The byte of a byte-fallback token `<0xNN>` when byte fallback is on, else None."""
    match = _BYTE_FALLBACK.fullmatch(token) if enabled else None
    return bytes([int(match.group(1), 16)]) if match else None
