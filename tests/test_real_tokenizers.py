"""Byte-exact token handling on real third-party tokenizers (Mistral-7B's SentencePiece, GPT-2's byte-level BPE),
checked against their own reference implementations (sentencepiece, tiktoken), and the first position of a text,
where one of them puts a word-start space that the other does not."""
from __future__ import annotations

import numpy as np
import pytest
import sentencepiece
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from fusesoup.align.align_store import align_sequence, alignment
from fusesoup.batching import encode_text
from fusesoup.align.transfer import EXACT, SPAN
from fusesoup.logits.codec import SequenceLogits
from fusesoup.params import Align
from fusesoup.token_bytes import prepended_space, text_token_bytes, token_bytes
from tests.real_tokenizers import ENDOFTEXT, GPT2_PATTERN, files_dir, gpt2_tokenizer, mistral_tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog.", " leading space", "\nnewline first",
         "def add(a, b):\n    return a + b\n", "tabs\tand  double  spaces   end ", "naïve café, Zürich 中文 🙂!",
         "it's 2026; x=1e-30", "\u00a0no-break space and \u200b zero width"]


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return mistral_tokenizer(tmp_path_factory.mktemp("mistral"))


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


def test_the_converted_tokenizers_encode_as_their_reference_implementations(mistral, gpt2):
    processor = sentencepiece.SentencePieceProcessor(model_file=str(files_dir() / "mistral-7b-v0.1.model"))
    reference = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, special_tokens={ENDOFTEXT: 50256},
                                  mergeable_ranks=load_tiktoken_bpe(str(files_dir() / "gpt2.tiktoken")))
    for text in TEXTS:
        assert gpt2.encode(text, add_special_tokens=False) == reference.encode(text), text
        # transformers' conversion of a SentencePiece model departs from sentencepiece in two known ways (both
        # still spell the text, which is all alignment needs; the pipeline reads what the loaded tokenizer does):
        # it puts no `▁` in front of a text that starts with a space, and it cuts runs of spaces differently
        if "  " not in text and "\n " not in text:
            expected = processor.encode(text)[1 if text.startswith(" ") else 0:]
            assert mistral.encode(text, add_special_tokens=False) == expected, text
    assert (len(mistral), len(gpt2), gpt2.bos_token_id, gpt2.eos_token_id) == (32000, 50257, 50256, 50256)
    assert gpt2.model_max_length > 1e29  # no limit given: transformers' VERY_LARGE_INTEGER


def test_every_gpt2_token_stands_for_the_bytes_tiktoken_decodes(gpt2):
    reference = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, special_tokens={ENDOFTEXT: 50256},
                                  mergeable_ranks=load_tiktoken_bpe(str(files_dir() / "gpt2.tiktoken")))
    table = token_bytes(gpt2)
    assert table[:50256] == [reference.decode_single_token_bytes(index) for index in range(50256)]
    assert table[50256] == b""  # <|endoftext|> is special: never part of the text


def test_every_mistral_piece_stands_for_its_sentencepiece_bytes(mistral):
    processor = sentencepiece.SentencePieceProcessor(model_file=str(files_dir() / "mistral-7b-v0.1.model"))
    table = token_bytes(mistral)
    for index in range(3, 32000):
        piece = processor.id_to_piece(index)
        expected = bytes([int(piece[3:5], 16)]) if processor.is_byte(index) else piece.replace("▁", " ").encode()
        assert table[index] == expected, (index, piece)
    assert table[:3] == [b"", b"", b""]  # <unk>, <s>, </s>


@pytest.mark.parametrize("name", ["mistral", "gpt2"])
def test_the_tokens_of_real_text_spell_it_byte_for_byte(name, request):
    tokenizer = request.getfixturevalue(name)
    table = token_bytes(tokenizer)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(text_token_bytes(table, ids, text)) == text.encode(), text
        # SentencePiece puts `▁` in front of a text unless it starts with a space; byte-level BPE never does
        assert prepended_space(table, ids, text) == (b" " if name == "mistral" and text[0] != " " else b""), text


def first_row(teacher_tokenizer, target_tokenizer, text: str, candidates: list[str], spans: str = "onehot"):
    """Align a teacher sequence whose first row puts 0.5, 0.3, 0.2 on `candidates` (teacher tokens) onto the
    target's tokens of `text`; the target ids of aligned row 0 with their probabilities, and the row's status."""
    setup = alignment(teacher_tokenizer, target_tokenizer, len(teacher_tokenizer), len(target_tokenizer),
                      Align(vocab="prefix", spans=spans))
    teacher_ids = teacher_tokenizer.encode(text, add_special_tokens=False)
    target_ids = target_tokenizer.encode(text, add_special_tokens=False)
    n, k = len(teacher_ids), len(candidates)
    topk = np.array([teacher_tokenizer.convert_tokens_to_ids(candidates)] + [[i] * k for i in teacher_ids[1:]])
    probs = np.array([[0.5, 0.3, 0.2]] + [[1.0, 0.0, 0.0]] * (n - 1), np.float32)
    teacher = SequenceLogits(np.array(teacher_ids), np.zeros(n, np.int64), np.zeros(n, np.int64), topk,
                             np.log(np.maximum(probs, 1e-30)), -np.log(probs[:, 0]))  # realised = top 1
    target = SequenceLogits(np.array(target_ids), *[np.zeros(len(target_ids), np.int64)] * 2,
                            np.array(target_ids)[:, None], np.zeros((len(target_ids), 1), np.float32),
                            np.zeros(len(target_ids), np.float32))
    aligned = align_sequence(teacher, target, text, setup).rows
    start, stop = aligned.offsets[0], aligned.offsets[1]
    tokens = target_tokenizer.convert_ids_to_tokens(aligned.ids[start:stop].tolist())
    return dict(zip(tokens, (round(p, 4) for p in np.exp(aligned.logprobs[start:stop]).tolist()))), \
        align_sequence(teacher, target, text, setup).status[0]


def test_a_sentencepiece_teachers_first_row_lands_on_the_tokens_a_byte_level_target_emits_there(mistral, gpt2):
    # Mistral reads "▁The" at the start (its own prepended space); GPT-2 emits "The" there, never "ĠThe"
    row, status = first_row(mistral, gpt2, "The quick brown fox", ["▁The", "▁A", "▁In"])
    assert row == {"The": 0.5, "A": 0.3, "In": 0.2} and status == EXACT
    # a text that starts with a space: neither tokenizer adds one, the space is the text's own
    row, _ = first_row(mistral, gpt2, " The quick brown fox", ["▁The", "▁A", "▁In"])
    assert row == {"ĠThe": 0.5, "ĠA": 0.3, "ĠIn": 0.2}


def test_a_byte_level_teachers_first_row_lands_on_the_word_start_pieces_of_a_sentencepiece_target(mistral, gpt2):
    row, status = first_row(gpt2, mistral, "The quick brown fox", ["The", "A", "In"])
    assert row == {"▁The": 0.5, "▁A": 0.3, "▁In": 0.2} and status == EXACT


def test_a_span_at_the_start_is_read_without_the_teachers_space(mistral, gpt2):
    # "\nThe": Mistral "▁" "<0x0A>" "The" (a lone prepended ▁, so a span of two rows) against GPT-2 "Ċ" "The";
    # the candidates of the first row are spelled as GPT-2 spells the text's start: no space in front
    row, status = first_row(mistral, gpt2, "\nThe quick", ["▁", "▁Hello", "▁Yes"], spans="expand")
    assert status == SPAN and set(row) == {"Ċ", "Hello", "Yes"}
    assert row["Hello"] == pytest.approx(0.3, abs=1e-3) and row["Yes"] == pytest.approx(0.2, abs=1e-3)


@pytest.mark.parametrize("name", ["mistral", "gpt2"])
def test_text_that_spells_a_special_token_is_encoded_as_text(name, request):
    """Corpus text spelling a special token (`<|endoftext|>`, `<s>` in code about language models) gets no special
    id from encode_text, as every stage encodes, and its tokens spell it; the tokenizer's default call would put the
    special id there (a document boundary in mid-text) and leave its bytes out."""
    tokenizer = request.getfixturevalue(name)
    special = set(tokenizer.all_special_ids)
    text = "print(" + " + ".join(repr(token) for token in tokenizer.all_special_tokens) + ")"
    assert special & set(tokenizer(text, add_special_tokens=False).input_ids)  # the hazard
    ids = encode_text(tokenizer, [text, "plain"])["input_ids"][0]
    assert not special & set(ids)
    assert b"".join(text_token_bytes(token_bytes(tokenizer), ids, text)).endswith(text.encode())
    assert tokenizer(text, add_special_tokens=False).input_ids != ids  # the call left the tokenizer's default alone
