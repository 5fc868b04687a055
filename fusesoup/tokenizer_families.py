"""Train small tokenizers of three real families so the bootstrapped source models disagree the way real LLMs do.

- `sentencepiece_bpe`: Llama-2 (SentencePiece BPE, `▁` word starts, single digits, byte fallback `<0x0A>`, BOS added);
- `byte_level_bpe`: GPT-NeoX (byte-level BPE, `Ġ` / `Ċ`, `<|endoftext|>` as bos/eos/unk, `<|padding|>`);
- `unigram`: T5/XLNet-like (SentencePiece unigram, `▁` word starts, byte fallback).

Every family decodes exactly what it encoded and spends at most one token per UTF-8 byte plus one prepended `▁`
(`round_trips`, `within_length_bound`); the pipeline sizes contexts on that bound (params.TOKENS_OVER_BYTES).
The one exception is inherited from SentencePiece: the `▁` families decode a literal `▁` (U+2581) as a space.
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from fusesoup.batching import encode_text

FAMILIES = ("sentencepiece_bpe", "byte_level_bpe", "unigram")
SPACE = "▁"  # SentencePiece's meta symbol for a space (U+2581)
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
MIN_VOCAB_SIZE = 300  # bytes, specials, the characters that spell them, and some room (params.py asks as much)
# SentencePiece words, as Llama-2 trains them: letters (with their marks), numbers and other symbols never share a
# piece (split_by_unicode_script, roughly), and a run of spaces keeps its last space for the next word, so that
# indentation before `return` gives `▁▁▁` + `▁return` (allow_whitespace_only_pieces).
_SPM_WORD = Regex(r"▁+(?=▁[^▁])|▁?[\p{L}\p{M}]+|▁?\p{N}+|▁?[^\p{L}\p{M}\p{N}▁]+|▁+")
# The `▁` families train on a uniform sample of lines, as SentencePiece does (input_sentence_size): all of the default
# corpus (~170k lines in 6 MB), a bounded part of a larger one (UnigramTrainer takes ~1 s per MB, in memory).
_SPM_SAMPLE_LINES = 200_000
_UNIGRAM_SCORE_DECIMALS = 4  # run-to-run noise in UnigramTrainer scores is ~1e-11 (see `_repeatable_scores`)


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a `kind` tokenizer (one of FAMILIES) of at most `vocab_size` tokens on `texts`, read once."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(FAMILIES)}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")
    return _BUILDERS[kind](texts, vocab_size)


def round_trips(tokenizer: PreTrainedTokenizerFast, text: str) -> bool:
    """Whether decoding the encoding of `text` (no special tokens) gives `text` back exactly."""
    return tokenizer.decode(encode_text(tokenizer, [text])["input_ids"][0]) == text


def within_length_bound(tokenizer: PreTrainedTokenizerFast, text: str) -> bool:
    """Whether `text` costs at most one token per UTF-8 byte plus one (a prepended `▁`), special tokens aside."""
    return len(encode_text(tokenizer, [text])["input_ids"][0]) <= len(text.encode("utf-8")) + 1


def _sentencepiece_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Llama-2: BPE over `▁`-words with single digits, unknown characters as `<0xNN>` bytes, `<s>` prepended."""
    specials = ["<unk>", "<s>", "</s>"]
    tokenizer = _spm_tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True), split_digits=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BYTE_TOKENS), special_tokens=specials, initial_alphabet=[SPACE],
        show_progress=False,
    )
    lines = _spm_training_lines(texts, vocab_size, specials, always=SPACE)
    tokenizer.train_from_iterator(lines, trainer, length=len(lines))
    tokenizer = _with_byte_tokens(tokenizer, len(specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    return _wrap(tokenizer, bos="<s>", eos="</s>", unk="<unk>", pad="</s>")


def _byte_level_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """GPT-NeoX: GPT-2 regex words over the 256 printable byte symbols (`Ġ` space, `Ċ` newline), no prefix space.

    NeoX's NFC normaliser is left out: it would turn "e\\u0301" into "é" and break the exact round trip.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    eot = "<|endoftext|>"
    return _wrap(tokenizer, bos=eot, eos=eot, unk=eot, pad="<|padding|>")


def _unigram(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """T5/XLNet-like: SentencePiece unigram over `▁`-words, unknown characters as `<0xNN>` bytes, nothing added."""
    specials = ["<pad>", "</s>", "<unk>", "<s>"]
    tokenizer = _spm_tokenizer(models.Unigram(), split_digits=False)
    # The alphabet spells every special and byte token, so that their text always has a spelling as text.
    alphabet = sorted(set(SPACE + "".join(specials + BYTE_TOKENS)))
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - len(BYTE_TOKENS), special_tokens=specials, unk_token="<unk>",
        initial_alphabet=alphabet, show_progress=False,
    )
    lines = _spm_training_lines(texts, vocab_size, specials, always="".join(alphabet))
    if not lines:
        raise ValueError("a unigram tokenizer needs some text to train on")
    tokenizer.train_from_iterator(lines, trainer, length=len(lines))
    tokenizer = _with_byte_tokens(tokenizer, len(specials))
    return _wrap(tokenizer, bos="<s>", eos="</s>", unk="<unk>", pad="<pad>")


def _spm_tokenizer(model: models.Model, split_digits: bool) -> Tokenizer:
    """The SentencePiece pipeline both `▁` families share, laid out like Llama-2's tokenizer.json.

    The `▁` is prepended by a normaliser, not by Metaspace: Metaspace skips it when the text already starts with a
    space, so " x" and "x" would encode alike and the decoder, which strips one leading space, would lose one.
    """
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Prepend(SPACE)
    words = [
        pre_tokenizers.Metaspace(SPACE, prepend_scheme="never", split=False),
        pre_tokenizers.Split(_SPM_WORD, behavior="isolated"),
    ]
    if split_digits:
        words.append(pre_tokenizers.Digits(individual_digits=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(words)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tokenizer


def _lines(texts: Iterable[str]) -> Iterator[str]:
    """Non-empty lines without their newline, as SentencePiece trains: no piece holds a newline (it is `<0x0A>`)."""
    for text in texts:
        yield from filter(None, text.split("\n"))


def _spm_training_lines(texts: Iterable[str], vocab_size: int, specials: list[str], always: str) -> list[str]:
    """A uniform sample of lines, cut at rare characters so that single characters (`always` first) take at most half
    the room that bytes and specials leave.

    The rest falls back to bytes, like SentencePiece's character coverage; this only bites on small vocabularies, the
    stdlib having ~450 distinct characters. (BpeTrainer's own `limit_alphabet` breaks frequency ties at random.)
    """
    budget = (vocab_size - len(BYTE_TOKENS) - len(specials)) // 2 - len(always)
    return _cut_at_rare_chars(_reservoir_sample(_lines(texts), _SPM_SAMPLE_LINES), budget, set(always))


def _reservoir_sample(items: Iterable[str], k: int) -> list[str]:
    """A uniform sample of `k` items (all of them if fewer) in one pass and O(k) memory, the same on every run."""
    rng = random.Random(0)
    sample: list[str] = []
    for seen, item in enumerate(items):
        if seen < k:
            sample.append(item)
        elif (slot := rng.randrange(seen + 1)) < k:
            sample[slot] = item
    return sample


def _cut_at_rare_chars(lines: list[str], keep: int, always: set[str]) -> list[str]:
    """`lines` cut at every character but `always` and the `keep` most frequent others, leaving those to bytes."""
    others = Counter(char for line in lines for char in line if char not in always)
    rare = "".join(sorted(set(others) - {char for char, _ in others.most_common(max(keep, 0))}))
    if not rare:
        return lines
    rare_run = re.compile(f"[{re.escape(rare)}]+")
    return [part for line in lines for part in rare_run.split(line) if part]


def _with_byte_tokens(tokenizer: Tokenizer, n_specials: int) -> Tokenizer:
    """Insert the 256 `<0xNN>` tokens right after the specials (as SentencePiece does) and turn on byte fallback.

    The trainers know neither: BpeTrainer keeps no byte tokens and UnigramTrainer also drops `byte_fallback`.
    """
    state = json.loads(tokenizer.to_str())
    model = state["model"]
    if model["type"] == "BPE":
        ranked = sorted(model["vocab"], key=model["vocab"].get)
        pieces = ranked[n_specials:]
        model["vocab"] = {piece: i for i, piece in enumerate(ranked[:n_specials] + BYTE_TOKENS + pieces)}
    else:
        specials = [piece for piece, _ in model["vocab"][:n_specials]]
        scored = _repeatable_scores(model["vocab"][n_specials:])
        pieces = [piece for piece, _ in scored]
        # Unigram matches every piece against the text, so the literal text "<0x41>" or "<s>" must lose to its own
        # spelling: at most 6 characters, each in the alphabet and scoring at least the lowest score.
        control = max(map(len, specials + BYTE_TOKENS)) * scored[-1][1] - 1
        model["vocab"] = [[piece, control] for piece in specials + BYTE_TOKENS] + scored
    if clash := set(pieces) & set(BYTE_TOKENS):
        raise ValueError(f"the corpus taught byte-token look-alikes {sorted(clash)}; they would decode as bytes")
    model["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(state, ensure_ascii=False))


def _repeatable_scores(trained: list[list]) -> list[list]:
    """Trained unigram `[piece, score]`s made to repeat from run to run: rounded, best first, ties ordered by piece.

    UnigramTrainer sums floats in HashMap order (noise of ~1e-11, rounded away) and re-adds the characters that EM
    dropped with scores 1e-4 apart in HashSet order: every piece below the lowest multi-character piece, which only EM
    makes, gets that piece's score.
    """
    floor = min((score for piece, score in trained if len(piece) > 1), default=0.0)
    scored = [[piece, round(max(score, floor), _UNIGRAM_SCORE_DECIMALS)] for piece, score in trained]
    return sorted(scored, key=lambda entry: (-entry[1], entry[0]))


def _wrap(tokenizer: Tokenizer, bos: str, eos: str, unk: str, pad: str) -> PreTrainedTokenizerFast:
    """The transformers view: specials named, no space clean-up, and special-token look-alikes in text read as text.

    BOS/EOS insertion stays with the backend's post-processor: transformers v5 saves no `add_bos_token`.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        clean_up_tokenization_spaces=False, split_special_tokens=True,
    )


_BUILDERS: dict[str, Callable[[Iterable[str], int], PreTrainedTokenizerFast]] = {
    "sentencepiece_bpe": _sentencepiece_bpe,
    "byte_level_bpe": _byte_level_bpe,
    "unigram": _unigram,
}
