"""What more than one test module uses: small tokenizers, models, corpora and stores built here, the training data of
the loop's tests, and the plain-Python reference implementations that the library's fast versions must equal."""
from __future__ import annotations

import bisect
import functools
import math
import random
import sysconfig
from pathlib import Path
from pydoc_data.topics import topics
from types import SimpleNamespace

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fusesoup.bootstrap import build_model
from fusesoup.corpus import CORPUS_SCHEMA, TokenLimit
from fusesoup.logits.extract import extract_store, key_parts
from fusesoup.logits.sparse import merge_entries
from fusesoup.params import ContinuedTraining, Extract, ModelSpec
from fusesoup.soup.checkpoint import weight_files
from fusesoup.storage import write_parquet
from fusesoup.train.packing import TrainBlock, TrainSequence, pack_documents, packing_order
from fusesoup.train.stream import PlannedBatches


TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. Naïve café — déjà vu.\n",
    "for i in range(10):\n    print(i * i)\n",
    "Return the sum of the arguments; raise TypeError if they cannot be added.",
    "x",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
] * 4


def make_tokenizer(texts=TEXTS, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE with <s>, </s>, <pad>: 259 symbols + a few merges (300 is not a multiple of 64)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_spec(context: int = 128) -> ModelSpec:
    return ModelSpec(hidden_size=32, layers=2, heads=2, intermediate_size=64, context=context)


ASCII_TEXTS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * (1 + i % 3) for i in range(40)]


def write_code_corpus(directory: Path, texts=ASCII_TEXTS) -> Path:
    rows = [(f"d{i}", "code", text) for i, text in enumerate(texts)]
    for split in ("train", "valid", "test"):
        write_parquet(pl.DataFrame(rows if split == "train" else rows[:3], schema=CORPUS_SCHEMA, orient="row"),
                      directory / f"{split}.parquet")
    return directory


EXTRACT_SPEC = Extract(k=5, splits=["train"], batch_tokens=512, shard_sequences=8, workers=1)  # one process unless a test asks


def run_store(model, tokenizer, corpus: Path, store: Path, spec: Extract = EXTRACT_SPEC, **kwargs):
    calls = []

    def load():
        calls.append(1)
        return model, tokenizer

    parts = key_parts({"model.safetensors": "fixed"}, corpus, spec, torch.float32)
    manifest = extract_store(load, model.config.vocab_size, corpus, store, spec, parts, progress=False, **kwargs)
    return manifest, len(calls)


def shard_bytes(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


CASES = [
    "Hello, world!",
    "def f(x):\n    return x + 1\n",
    "x , y . z ! ? 's n't",  # what clean_up_tokenization_spaces would rewrite
    " leading",
    "   three leading",
    "trailing ",
    "trailing   ",
    "a  b   c    d",
    "\ttab\tand\t\ttabs\t",
    "\n",
    "\n\n",
    "\nstarts\n\nand ends\n",
    "\r\nwindows\r\n",
    "emoji 👍🎉",
    "👩‍👩‍👧‍👦 family, 🏳️‍🌈 flag",
    "中文分词测试",
    "日本語のテキスト",
    "e\u0301 a\u0308\u0301",
    "שלום עולם",
    "مرحبا بالعالم",
    "12345 67890",
    "<s> </s> <unk> <pad> <|endoftext|> <|padding|>",
    "<0x41> <0x0A>",
    "",
    " ",
    "   ",
    "\t",
    " \n\t \n ",
]


# Code point ranges for random strings: ASCII, controls, odd spaces, Latin-1, combining marks, Hebrew, Arabic,
# CJK, Hangul, private use, emoji with ZWJ and variation selector, and astral planes. U+2581 is not in any of them.
RANGES = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0xFF), (0x2000, 0x200F), (0x3000, 0x3000), (0x300, 0x36F),
          (0x5D0, 0x5EA), (0x627, 0x64A), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xF8FF),
          (0x1F300, 0x1FAFF), (0xFE0F, 0xFE0F), (0x10000, 0x10FFFF)]


def random_strings(count: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)

    def char() -> str:
        low, high = rng.choice(RANGES)
        return chr(rng.randint(low, high))

    return ["".join(char() for _ in range(rng.randint(0, 40))) for _ in range(count)]


def sample_texts() -> list[str]:
    """~250 KB of stdlib source and ~100 KB of its prose (the pydoc topics), in a fixed order."""
    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        texts.append(path.read_text(encoding="utf-8"))
        size += len(texts[-1])
        if size > 250_000:
            break
    prose = [topics[key] for key in sorted(topics)]
    return texts + prose[: len(prose) // 4]


def reference_edit_distance(a: bytes, b: bytes) -> int:
    """Levenshtein distance, the textbook DP (unit insert, delete, substitute)."""
    previous = list(range(len(b) + 1))
    for i, byte_a in enumerate(a, start=1):
        current = [i]
        for j, byte_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (byte_a != byte_b)))
        previous = current
    return previous[-1]


def reference_dtw(source: list, target: list, distance=reference_edit_distance) -> list[tuple[int, int]]:
    """FuseLLM's DTW in plain Python, O(N * M): acc[i][j] = cost + min of the three predecessors (1-based, with an
    infinite border), then the path traced back from the end to the predecessor with the smallest acc, the first of
    (diagonal, (i-1, j), (i, j-1)) on ties. The `distance` of a token pair is computed once (a cache)."""
    cost = functools.cache(distance)
    n, m = len(source), len(target)
    acc = [[math.inf] * (m + 1) for _ in range(n + 1)]
    acc[0][0] = 0
    for i in range(1, n + 1):
        row, above, token = acc[i], acc[i - 1], source[i - 1]
        for j in range(1, m + 1):
            row[j] = cost(token, target[j - 1]) + min(above[j], row[j - 1], above[j - 1])
    i, j = n, m
    path = [(i - 1, j - 1)]
    while (i, j) != (1, 1):
        options = [acc[i - 1][j - 1], acc[i - 1][j], acc[i][j - 1]]
        move = options.index(min(options))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
        path.append((i - 1, j - 1))
    return path[::-1]


def words(limit: int) -> TokenLimit:
    return TokenLimit("words", lambda s: len(s.split()), limit)


def reference_chunk_text(text: str, max_bytes: int, token_limits=()) -> list[str]:
    """chunk_text as it was before it kept an offset into an over-long line (quadratic in that line's length: it
    sliced the line's rest once per chunk): the reference its chunks must equal."""
    def fits(chunk: str) -> bool:
        return len(chunk.encode("utf-8")) <= max_bytes and all(
            limit.count_tokens(chunk) <= limit.max_tokens for limit in token_limits)

    def longest(count: int, fits_first) -> int:
        return bisect.bisect_left(range(1, count + 1), True, key=lambda k: not fits_first(k))

    lines = text.split("\n")
    units = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    sizes = [len(unit.encode("utf-8")) for unit in units]
    chunks = []
    while units:  # units[0] begins at the first character no chunk holds yet
        take = 0
        while take < len(units) and sum(sizes[:take + 1]) <= max_bytes:
            take += 1
        if take and not fits("".join(units[:take])):
            take = longest(take - 1, lambda k: fits("".join(units[:k])))
        if take:
            chunks.append("".join(units[:take]))
            del units[:take], sizes[:take]
        else:
            cut = longest(min(len(units[0]) - 1, max_bytes), lambda k: fits(units[0][:k]))
            assert cut, "the reference is only run on inputs every character of which fits"
            chunks.append(units[0][:cut])
            units[0] = units[0][cut:]  # the slice of the line's whole rest, once per chunk: quadratic
            sizes[0] -= len(chunks[-1].encode("utf-8"))
    return chunks


LAYERS = 2


def tiny_config(intermediate_size: int = 64) -> LlamaConfig:
    return LlamaConfig(hidden_size=32, intermediate_size=intermediate_size, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=100)


def save_model(directory: Path, seed: int, dtype: torch.dtype = torch.float32, **kwargs) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(kwargs.pop("intermediate_size", 64)))
    with torch.no_grad():  # the norms start at ones in every seed: make them differ too
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.add_(torch.randn_like(parameter))
    model.to(dtype).save_pretrained(directory, **kwargs)
    return directory


def state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in weight_files(model_dir):
        tensors.update(load_file(file))
    return tensors


TRAIN_VOCAB = 64


TRAIN_SPEC = ContinuedTraining(steps=6, batch_tokens=48, block_size=16, lr=3e-3, warmup_steps=1, checkpoint_every=2)


UNCHECKPOINTED = TRAIN_SPEC.model_copy(update={"checkpoint_every": 100})


class SpecialIds(SimpleNamespace):
    """What build_model reads of a tokenizer: its special ids and its length."""

    def __len__(self) -> int:
        return TRAIN_VOCAB


def tiny_model():
    tokenizer = SpecialIds(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    spec = ModelSpec(hidden_size=16, layers=1, heads=2, intermediate_size=32, context=64)
    return build_model("llama", spec, tokenizer, seed=0)


def blocks(with_targets: bool, n: int = 12) -> list[TrainBlock]:
    """The documents below packed as the stage packs them (BOS 1, blocks of TRAIN_SPEC.block_size, context 64)."""
    documents = sequences(with_targets, n)
    return pack_documents(documents, TRAIN_SPEC.block_size, 1, 64, order_of(documents))


def order_of(documents: list[TrainSequence], seed: int = 0) -> np.ndarray:
    return packing_order([len(d.input_ids) for d in documents], np.random.default_rng(seed))


def planned(data: list[TrainBlock], spec: ContinuedTraining = TRAIN_SPEC) -> PlannedBatches:
    """Each step's blocks as the in-memory plan takes them."""
    return PlannedBatches(data, spec.batch_tokens, spec.steps, 0)


def sequences(with_targets: bool, n: int = 12) -> list[TrainSequence]:
    rng, target_rng = np.random.default_rng(3), np.random.default_rng(4)
    out = []
    for length in rng.integers(5, 20, n):
        ids = rng.integers(3, TRAIN_VOCAB, length)
        rows = None
        if with_targets:
            entries = np.repeat(np.arange(length), 3)
            rows = merge_entries(entries, target_rng.integers(3, TRAIN_VOCAB, 3 * length), target_rng.random(3 * length),
                                 length, TRAIN_VOCAB)
        out.append(TrainSequence(ids, rows))
    return out
