"""Tokenizer families: exact round trip, length bound, family markers, specials, save/reload, determinism."""
from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoTokenizer

from fusesoup.tokenizer_families import (
    BYTE_TOKENS,
    FAMILIES,
    MIN_VOCAB_SIZE,
    _reservoir_sample,
    round_trips,
    train_tokenizer,
    within_length_bound,
)
from tests.helpers import CASES, random_strings, sample_texts

VOCAB_SIZE = 800








@pytest.fixture(scope="module")
def texts() -> list[str]:
    return sample_texts()


@pytest.fixture(scope="module")
def trained(texts):
    return {kind: train_tokenizer(kind, iter(texts), VOCAB_SIZE) for kind in FAMILIES}


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory) -> dict[str, Path]:
    dirs = {}
    for kind, tokenizer in trained.items():
        dirs[kind] = tmp_path_factory.mktemp(kind)
        tokenizer.save_pretrained(dirs[kind])
    return dirs


@pytest.fixture(scope="module")
def reloaded(saved):
    return {kind: AutoTokenizer.from_pretrained(directory) for kind, directory in saved.items()}


@pytest.fixture(params=["in-memory", "reloaded"])
def tokenizers(request, trained, reloaded):
    return trained if request.param == "in-memory" else reloaded


@pytest.mark.parametrize("kind", FAMILIES)
def test_round_trip_and_length_bound(kind, tokenizers):
    tokenizer = tokenizers[kind]
    for text in CASES + random_strings():
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert round_trips(tokenizer, text), (text, tokenizer.convert_ids_to_tokens(ids), tokenizer.decode(ids))
        assert within_length_bound(tokenizer, text), (text, tokenizer.convert_ids_to_tokens(ids))


@pytest.mark.parametrize("kind", FAMILIES)
def test_reloaded_encodes_and_decodes_identically(kind, trained, reloaded):
    before, after = trained[kind], reloaded[kind]
    assert after.clean_up_tokenization_spaces is False and before.clean_up_tokenization_spaces is False
    assert len(after) == len(before) and after.get_vocab() == before.get_vocab()
    for text in CASES + random_strings(seed=1):
        assert after.encode(text) == before.encode(text), text
        ids = before.encode(text)
        assert after.decode(ids) == before.decode(ids), text
        assert after.decode(ids, skip_special_tokens=True) == before.decode(ids, skip_special_tokens=True), text


def test_sentencepiece_bpe_looks_like_llama(trained):
    tokenizer = trained["sentencepiece_bpe"]
    vocab = tokenizer.get_vocab()
    assert [vocab[b] for b in BYTE_TOKENS] == list(range(3, 259))  # like Llama: <unk> <s> </s> <0x00>..<0xFF>
    assert sum(t.startswith("▁") and len(t) > 1 for t in vocab) > 100
    assert tokenizer.tokenize("a\nb") == ["▁a", "<0x0A>", "b"]
    assert tokenizer.tokenize("x\n    return") == ["▁x", "<0x0A>", "▁▁▁", "▁return"]
    assert not [t for t in vocab if sum(c.isdigit() for c in t) > 1 and not t.startswith("<0x")]
    assert tokenizer.tokenize("€") == ["▁", "<0xE2>", "<0x82>", "<0xAC>"]  # "€" does not occur in the sample


def test_byte_level_bpe_looks_like_gpt_neox(trained):
    tokenizer = trained["byte_level_bpe"]
    vocab = tokenizer.get_vocab()
    assert set(ByteLevel.alphabet()) <= set(vocab)
    assert sum(t.startswith("Ġ") and len(t) > 1 for t in vocab) > 100
    assert tokenizer.tokenize("a\nb") == ["a", "Ċ", "b"]
    assert tokenizer.tokenize(" return") == ["Ġreturn"]
    assert tokenizer.tokenize("€") == ["â", "Ĥ", "¬"]
    assert not any("▁" in t or t.startswith("<0x") for t in vocab)


def test_unigram_looks_like_sentencepiece_unigram(trained):
    tokenizer = trained["unigram"]
    vocab = tokenizer.get_vocab()
    assert type(tokenizer.backend_tokenizer.model).__name__ == "Unigram"
    assert [vocab[b] for b in BYTE_TOKENS] == list(range(4, 260))
    assert sum(t.startswith("▁") and len(t) > 1 for t in vocab) > 100
    assert "<0x0A>" in tokenizer.tokenize("a\nb")
    assert tokenizer.tokenize("€") == ["▁", "<0xE2>", "<0x82>", "<0xAC>"]
    assert "<0x41>" not in tokenizer.tokenize("<0x41>")  # the literal text is not the byte token


SPECIALS = {
    "sentencepiece_bpe": {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": "</s>",
                          "ids": {"<unk>": 0, "<s>": 1, "</s>": 2}},
    "byte_level_bpe": {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>", "pad": "<|padding|>",
                       "ids": {"<|endoftext|>": 0, "<|padding|>": 1}},
    "unigram": {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": "<pad>",
                "ids": {"<pad>": 0, "</s>": 1, "<unk>": 2, "<s>": 3}},
}


@pytest.mark.parametrize("kind", FAMILIES)
def test_specials_vocab_size_and_bos(kind, tokenizers):
    tokenizer, expected = tokenizers[kind], SPECIALS[kind]
    roles = {"bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "unk": tokenizer.unk_token,
             "pad": tokenizer.pad_token}
    assert roles == {role: expected[role] for role in roles}
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in expected["ids"]} == expected["ids"]
    assert VOCAB_SIZE - 20 <= len(tokenizer) <= VOCAB_SIZE
    plain = tokenizer.encode("hello world", add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if kind == "sentencepiece_bpe" else []
    assert tokenizer.encode("hello world") == bos + plain
    # Special-token look-alikes in text are text, never control tokens.
    assert not set(tokenizer.encode(" ".join(expected["ids"]), add_special_tokens=False)) & set(
        expected["ids"].values()
    )


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("vocab_size", [MIN_VOCAB_SIZE, 400])
def test_small_vocabularies_keep_size_bounds_and_determinism(kind, vocab_size):
    # ~45 KB with ~160 distinct characters: some are left to byte fallback, and unigram's EM drops some that its
    # trainer then puts back with scores in random order.
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text(encoding="utf-8") for name in ("textwrap.py", "string.py", "shlex.py")]
    tokenizer = train_tokenizer(kind, texts, vocab_size)
    assert vocab_size - 20 <= len(tokenizer) <= vocab_size
    for text in CASES + random_strings():
        assert round_trips(tokenizer, text) and within_length_bound(tokenizer, text), text
    again = train_tokenizer(kind, texts, vocab_size)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


@pytest.mark.parametrize("kind", FAMILIES)
def test_training_is_deterministic(kind, texts, saved, tmp_path):
    train_tokenizer(kind, iter(texts), VOCAB_SIZE).save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (saved[kind] / "tokenizer.json").read_bytes()


def test_bad_arguments_are_refused(texts):
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'"):
        train_tokenizer("wordpiece", texts, VOCAB_SIZE)
    with pytest.raises(ValueError, match=f"at least {MIN_VOCAB_SIZE}"):
        train_tokenizer("unigram", texts, MIN_VOCAB_SIZE - 1)
    with pytest.raises(ValueError, match="needs some text"):
        train_tokenizer("unigram", ["", "\n\n"], VOCAB_SIZE)


def test_reservoir_sample_is_uniform_and_repeatable():
    sample = _reservoir_sample(map(str, range(100_000)), 2_000)
    assert sample == _reservoir_sample(map(str, range(100_000)), 2_000)
    values = sorted(map(int, sample))
    assert len(set(values)) == 2_000
    assert 45_000 < sum(values) / len(values) < 55_000 and values[-1] > 95_000
    assert _reservoir_sample(iter(["a", "b"]), 5) == ["a", "b"]
