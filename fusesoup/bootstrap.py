"""Bootstrapping a small causal LM from scratch: the offline default's stand-in for a pretrained source model.

`build_model` makes a fresh Llama, GPT-NeoX or GPT-2 from a ModelSpec and a tokenizer; `train_causal_lm` is a
nanoGPT-style training loop (the shared recipe: AdamW, warmup + cosine, clipping) over documents sampled by domain
weight and packed into blocks.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, PreTrainedConfig,
                          PreTrainedModel)

from fusesoup.errors import lookup
from fusesoup.models import context_length
from fusesoup.params import Architecture, ModelSpec, TrainSpec
from fusesoup.train.packing import BlockPacker
from fusesoup.train.recipe import GRAD_CLIP, TrainingError, lr_at, make_optimizer, set_lr, special_ids

VOCAB_MULTIPLE = 64  # embedding rows are rounded up to this (faster matmuls, room for added tokens)
# sdpa is the fastest attention for these shapes on CPU (and works on GPU); eager is 1.5-4x slower there.
ATTENTION = "sdpa"


def padded_vocab_size(tokenizer) -> int:
    return -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def llama_config(spec: ModelSpec, vocab_size: int, special: dict) -> PreTrainedConfig:
    """`llama`: separate input and output embeddings, as Llama-2 has."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                       num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
                       max_position_embeddings=spec.context, tie_word_embeddings=False, **special)


def gpt_neox_config(spec: ModelSpec, vocab_size: int, special: dict) -> PreTrainedConfig:
    """`gpt_neox`: separate input and output embeddings, as Pythia has."""
    return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                         num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                         max_position_embeddings=spec.context, tie_word_embeddings=False, **special)


def gpt2_config(spec: ModelSpec, vocab_size: int, special: dict) -> PreTrainedConfig:
    """`gpt2`: tied embeddings, as GPT-2 has; no dropout."""
    return GPT2Config(vocab_size=vocab_size, n_embd=spec.hidden_size, n_inner=spec.intermediate_size,
                      n_layer=spec.layers, n_head=spec.heads, n_positions=spec.context,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, **special)


ARCHITECTURES: dict[Architecture, Callable[[ModelSpec, int, dict], PreTrainedConfig]] = {
    "llama": llama_config, "gpt_neox": gpt_neox_config, "gpt2": gpt2_config}


def build_model(architecture: Architecture, spec: ModelSpec, tokenizer, seed: int) -> PreTrainedModel:
    """A randomly initialised float32 model of `architecture` (ARCHITECTURES) sized by `spec`, with the tokenizer's
    special ids; the vocabulary is len(tokenizer) rounded up to a multiple of 64."""
    make_config = lookup(ARCHITECTURES, architecture, "bootstrap architecture")
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    config = make_config(spec, padded_vocab_size(tokenizer), special)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION, dtype=torch.float32)
    model.loss_type = "ForCausalLM"  # GPT2LMHeadModel's class name is not recognised: same loss, minus a warning
    return model


def train_causal_lm(model: PreTrainedModel, sequences_by_domain: dict[str, list[list[int]]],
                    weights: dict[str, float], spec: TrainSpec, seed: int, progress: bool = True) -> list[dict]:
    """Train `model` in place on documents (token ids without specials); returns one log dict per step.

    Each step draws documents (a domain by `weights`, then one of its sequences uniformly) into a packed stream
    (packing.BlockPacker: [BOS] doc [EOS] ..., attention and loss within each document) and trains on
    batch_tokens / block_size rows of block_size tokens: every token real, none padding. Same inputs and seed on the
    same device and thread count give identical weights. `tokens` in the log counts tokens trained on so far.
    """
    domains = sorted(weights)
    for domain in domains:
        if not sequences_by_domain.get(domain):
            raise TrainingError(f"domain {domain!r} has weight {weights[domain]} but no training sequences "
                                f"(domains with data: {sorted(d for d, s in sequences_by_domain.items() if s)})")
    probabilities = np.array([weights[d] for d in domains], dtype=np.float64)
    probabilities /= probabilities.sum()
    ids = special_ids(model.config)
    packer = BlockPacker(ids.bos, ids.eos, spec.block_size, context_length(model.config))
    rows = spec.batch_tokens // spec.block_size
    device = next(model.parameters()).device

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    optimizer = make_optimizer(model, spec)
    model.train()
    log: list[dict] = []
    seen_tokens, started = 0, time.perf_counter()
    bar = tqdm(range(spec.steps), desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        while packer.buffered() < rows * spec.block_size:
            pool = sequences_by_domain[domains[rng.choice(len(domains), p=probabilities)]]
            packer.add(pool[rng.integers(len(pool))])
        input_ids, labels, positions = packer.take(rows)  # [rows, block_size] each

        lr = lr_at(step, spec)
        set_lr(optimizer, lr)
        loss = model(input_ids=input_ids.to(device), labels=labels.to(device), position_ids=positions.to(device),
                     use_cache=False).loss  # attention within each document (packing.py)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss is {loss.item()} at step {step} (lr {lr:.3g}): training diverged; "
                                "lower bootstrap.<name>.train.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()

        seen_tokens += input_ids.numel()
        log.append({"step": step, "loss": loss.item(), "lr": lr, "tokens": seen_tokens})
        bar.set_postfix(loss=f"{log[-1]['loss']:.3f}",
                        tok_s=f"{seen_tokens / (time.perf_counter() - started):.0f}", refresh=False)
    bar.close()
    model.eval()
    return log
