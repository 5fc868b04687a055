"""Tokens as bytes: the three tokenizer families and hand-built WordPiece, Metaspace and plain tokenizers."""
from __future__ import annotations

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from fusesoup.align.vocab_map import map_vocab
from fusesoup.token_bytes import UNICODE_TO_BYTE, shadowed_fallbacks, text_token_bytes, token_bytes
from fusesoup.tokenizer_families import BYTE_TOKENS, FAMILIES, SPACE, train_tokenizer
from tests.helpers import CASES, random_strings, sample_texts

VOCAB_SIZE = 800
MORE_CASES = ["x\ty\t\tz", "a\n\n\nb\r\n", "naïve café", "e\u0301\u0302 o\u0308", "🙂🙃 👍🏽",
              "中文 日本語 한국어", "    return self.x  # indented\n"]


@pytest.fixture(scope="module")
def families():
    """Each family's tokenizer and its byte table."""
    texts = sample_texts()
    tokenizers = {kind: train_tokenizer(kind, iter(texts), VOCAB_SIZE) for kind in FAMILIES}
    return {kind: (tokenizer, token_bytes(tokenizer)) for kind, tokenizer in tokenizers.items()}


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("kind", FAMILIES)
def test_tokens_spell_the_text_exactly(kind, families):
    tokenizer, table = families[kind]
    assert len(table) == len(tokenizer)
    for text in CASES + MORE_CASES + random_strings(300, seed=4) + sample_texts()[:3]:
        pieces = text_token_bytes(table, encode(tokenizer, text), text)
        assert b"".join(pieces) == text.encode("utf-8"), (kind, text)


@pytest.mark.parametrize("kind, prepends", [("sentencepiece_bpe", True), ("unigram", True), ("byte_level_bpe", False)])
def test_only_the_sentencepiece_families_prepend_one_space(kind, prepends, families):
    """The `▁` families prepend a `▁` to every non-empty text (a Prepend normaliser, even before a space);
    `text_token_bytes` drops exactly that space from the first token that holds it."""
    tokenizer, table = families[kind]
    for text in ["x", " x", "  x", "\nx", "中"]:
        ids = encode(tokenizer, text)
        raw = b"".join(table[index] for index in ids)
        assert raw == (b" " if prepends else b"") + text.encode()
        pieces = text_token_bytes(table, ids, text)
        assert len(pieces) == len(ids) and b"".join(pieces) == text.encode()
    assert encode(tokenizer, "") == [] and text_token_bytes(table, [], "") == []


def test_sentencepiece_markers_and_byte_fallback(families):
    for kind in ("sentencepiece_bpe", "unigram"):
        tokenizer, table = families[kind]
        vocab = tokenizer.get_vocab()
        assert table[vocab[SPACE]] == b" "
        assert [table[vocab[token]] for token in BYTE_TOKENS] == [bytes([b]) for b in range(256)]
        words = [token for token in vocab if token.startswith(SPACE) and token.count(SPACE) == 1 and len(token) > 2]
        assert words and all(table[vocab[word]] == b" " + word[1:].encode() for word in words)
        assert table[vocab["<unk>"]] == table[vocab["<s>"]] == table[vocab["</s>"]] == b""


def test_byte_level_symbols_are_bytes(families):
    tokenizer, table = families["byte_level_bpe"]
    vocab = tokenizer.get_vocab()
    assert (table[vocab["Ġ"]], table[vocab["Ċ"]], table[vocab["ĉ"]]) == (b" ", b"\n", b"\t")
    assert sorted(table[vocab[symbol]] for symbol in UNICODE_TO_BYTE) == [bytes([b]) for b in range(256)]
    assert table[vocab["<|endoftext|>"]] == table[vocab["<|padding|>"]] == b""
    merged = [token for token in vocab if len(token) > 1 and token not in ("<|endoftext|>", "<|padding|>")]
    assert all(table[vocab[token]] == bytes(UNICODE_TO_BYTE[char] for char in token) for token in merged)


def test_pieces_of_a_multibyte_character_stay_partial_bytes():
    texts = sample_texts()[:2] + ["中文 中国 文字 中心"] * 300
    tokenizer = train_tokenizer("byte_level_bpe", iter(texts), VOCAB_SIZE)
    table = token_bytes(tokenizer)
    pieces = text_token_bytes(table, encode(tokenizer, "中文"), "中文")
    assert b"".join(pieces) == "中文".encode()
    vocab = tokenizer.get_vocab()
    assert table[vocab["ä¸Ńæĸĩ"]] == "中文".encode()
    assert table[vocab["æĸ"]] == "文".encode()[:2]  # a piece that is no character on its own


def wordpiece() -> Tokenizer:
    vocab = {"[UNK]": 0, "[CLS]": 1, "hel": 2, "##lo": 3, "world": 4, "##s": 5, "hello": 6}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.add_special_tokens([AddedToken("[CLS]", special=True)])
    tokenizer.add_tokens([AddedToken("<tool>", special=False)])
    return tokenizer


def test_wordpiece_word_starts_and_continuations():
    tokenizer = wordpiece()
    table = token_bytes(tokenizer)
    vocab = tokenizer.get_vocab()
    assert table[vocab["hel"]] == b" hel" and table[vocab["##lo"]] == b"lo" and table[vocab["##s"]] == b"s"
    assert table[vocab["[CLS]"]] == b"" and table[vocab["[UNK]"]] == b" [UNK]"  # a word like any other, for WordPiece
    assert table[vocab["<tool>"]] == b"<tool>"  # a non-special added token stands for its literal text
    text = "hello worlds hello"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert [table[index] for index in ids] == [b" hello", b" world", b"s", b" hello"]
    assert text_token_bytes(table, ids, text) == [b"hello", b" world", b"s", b" hello"]
    with pytest.raises(ValueError, match="spell"):  # WordPiece drops whitespace: two spaces cannot come back
        text_token_bytes(table, tokenizer.encode("hello  world").ids, "hello  world")


def metaspace_bpe() -> Tokenizer:
    """A Metaspace pipeline (prepend_scheme always, so a text starting with a space gets no extra `▁`)."""
    vocab = {"▁": 0, "a": 1, "b": 2, "▁a": 3, "▁b": 4, "<0x41>": 5}
    tokenizer = Tokenizer(models.BPE(vocab, [("▁", "a"), ("▁", "b")]))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(SPACE, prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(SPACE, prepend_scheme="always")
    return tokenizer


def test_metaspace_and_a_byte_token_look_alike_without_byte_fallback():
    tokenizer = metaspace_bpe()
    table = token_bytes(tokenizer)
    assert table == [b" ", b"a", b"b", b" a", b" b", b"<0x41>"]  # no byte fallback: `<0x41>` is its own text
    for text, pieces in [("a b", [b"a", b" b"]), (" a b", [b" a", b" b"]), ("ab", [b"a", b"b"])]:
        assert text_token_bytes(table, tokenizer.encode(text).ids, text) == pieces


def test_a_literal_metaspace_character_cannot_be_spelled(families):
    """SentencePiece reads a `▁` in the text as its space marker: that text has no exact byte spelling."""
    tokenizer, table = families["sentencepiece_bpe"]
    with pytest.raises(ValueError, match="spell"):
        text_token_bytes(table, encode(tokenizer, "a▁b"), "a▁b")


def test_a_plain_pipeline_reads_tokens_as_their_text_and_fallback_bytes():
    """No marker, byte-level or WordPiece component: a token is its UTF-8, and with byte fallback `<0xNN>` is NN."""
    vocab = {"<0x41>": 0, "<0xE4>": 1, "hi": 2, "h": 3, "i": 4, "<0x41": 5}
    tokenizer = Tokenizer(models.BPE(vocab, [("h", "i")], byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.ByteFallback()
    assert token_bytes(tokenizer) == [b"A", b"\xe4", b"hi", b"h", b"i", b"<0x41"]
    ids = tokenizer.encode("hiA").ids
    assert text_token_bytes(token_bytes(tokenizer), ids, "hiA") == [b"hi", b"A"]


def test_byte_fallback_ids_shadowed_by_a_regular_piece_take_no_mass():
    """A SentencePiece tokenizer with byte fallback holds `,` twice: as a piece and as `<0x2C>`, which it never emits;
    a teacher's `,` must map to the piece even though the fallback has the smaller id."""
    tokenizer = train_tokenizer("sentencepiece_bpe", iter(sample_texts()), 800)
    table = token_bytes(tokenizer)
    vocab = tokenizer.get_vocab()
    shadowed = shadowed_fallbacks(tokenizer, table)
    assert vocab["<0x2C>"] in shadowed and vocab["<0x2C>"] < vocab[","]
    assert all(table[index] in {table[i] for i in range(len(table)) if i not in shadowed} for index in shadowed)
    mappable = [b"" if index in shadowed else piece for index, piece in enumerate(table)]
    # a byte no piece covers keeps its fallback id
    assert map_vocab([b",", b"\xff"], mappable, "exact").tolist() == [vocab[","], vocab["<0xFF>"]]
    assert map_vocab([b","], table, "exact").tolist() == [vocab["<0x2C>"]]  # what the first id alone would pick
