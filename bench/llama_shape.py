"""The Llama shape the benchmarks generate models of: its command-line arguments and its config."""
from __future__ import annotations

import argparse

from transformers import LlamaConfig

TINYLLAMA = {"hidden": 2048, "intermediate": 5632, "layers": 22, "heads": 32, "kv_heads": 4, "vocab": 32000}
LLAMA_2_7B = {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "kv_heads": 32, "vocab": 32000}


def add_shape_arguments(parser: argparse.ArgumentParser, defaults: dict[str, int] = TINYLLAMA) -> None:
    """--hidden, --intermediate, --layers, --heads, --kv-heads and --vocab, defaulting to `defaults`."""
    for name, value in defaults.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)


def llama_config(args: argparse.Namespace, **extra) -> LlamaConfig:
    """The LlamaConfig of the shape arguments (untied head), with `extra` config fields."""
    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                       tie_word_embeddings=False, **extra)
