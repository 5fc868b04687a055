"""Tiny checkpoints of real transformers architectures, and a Hugging Face cache laid out as huggingface_hub does.

The cache layout: <cache>/models--<org>--<name>/{blobs/<hash>, snapshots/<commit>/<file> -> ../../blobs/<hash>,
refs/<branch> (the commit)}; with HF_HUB_CACHE pointing at it and HF_HUB_OFFLINE=1, `snapshot_download` resolves a
branch through refs/ and returns the snapshot without any network.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from fusesoup.tokenizer_families import train_tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n",
         "for i in range(10):\n    print(i * i)\n", "Return the sum of the arguments, or raise TypeError.\n",
         "class Stack:\n    def push(self, item):\n        self.items.append(item)\n"] * 8


def save_checkpoint(directory: Path, config: PretrainedConfig, tokenizer: str | PreTrainedTokenizerBase,
                    vocab: int = 320, dtype: torch.dtype = torch.float32, seed: int = 0, *, no_bos: bool = False,
                    pad_vocab_to: int | None = None, added_tokens: tuple[str, ...] = (),
                    chat_template: str | None = None, padding_side: str = "right",
                    shard_bytes: int | None = None) -> Path:
    """A randomly initialised model of `config`'s architecture with `tokenizer` (a real one, or the name of a family
    to train on TEXTS with `vocab` tokens), saved with save_pretrained (safetensors) in `dtype`, with the quirks real
    checkpoints ship: no BOS token (Qwen), an embedding padded past the tokenizer (Qwen, Llama-2 + added tokens),
    added special tokens, a chat template, left padding, weights in several shards with model.safetensors.index.json."""
    if isinstance(tokenizer, str):
        tokenizer = train_tokenizer(tokenizer, TEXTS, vocab)
    if added_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(added_tokens)})
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.padding_side = padding_side
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    if no_bos:
        tokenizer.bos_token = None
        config.bos_token_id = None
    config.vocab_size = pad_vocab_to or len(tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(directory, **({"max_shard_size": shard_bytes} if shard_bytes else {}))
    tokenizer.save_pretrained(directory)
    return directory


def add_snapshot(cache: Path, repo_id: str, files_from: Path, commit: str, branch: str | None = "main") -> Path:
    """Put `files_from`'s files into the cache as `repo_id` at `commit` (and point `branch` at it)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(files_from.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    if branch:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
    return snapshot
