"""Bootstrapping a small causal LM from scratch: the offline default's stand-in for a pretrained source model.

`build_model` makes a fresh Llama, GPT-NeoX or GPT-2 from a ModelSpec and a tokenizer; `train_causal_lm` is a
nanoGPT-style training loop (AdamW, warmup + cosine, gradient clipping) over documents sampled by domain weight.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, PreTrainedModel

from fusesoup.cli import StageError
from fusesoup.models import context_length
from fusesoup.params import ModelSpec, TrainSpec

VOCAB_MULTIPLE = 64  # embedding rows are rounded up to this (faster matmuls, room for added tokens)
MIN_LR_FRACTION = 0.1  # the cosine schedule ends at this fraction of the peak lr
GRAD_CLIP = 1.0
BETAS = (0.9, 0.95)
# sdpa is the fastest attention for these shapes on CPU (and works on GPU); eager is 1.5-4x slower there.
ATTENTION = "sdpa"


class TrainingError(StageError):
    """Training cannot go on (a non-finite loss, a domain without data); the message names the step or domain."""


def padded_vocab_size(tokenizer) -> int:
    return -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def build_model(architecture: str, spec: ModelSpec, tokenizer, seed: int) -> PreTrainedModel:
    """A randomly initialised float32 model of `architecture` sized by `spec`, with the tokenizer's special ids.

    The vocabulary is len(tokenizer) rounded up to a multiple of 64; input and output embeddings are tied for
    gpt2 (as GPT-2 does) and separate for llama and gpt_neox (as Llama-2 and Pythia do). No dropout.
    """
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    vocab_size = padded_vocab_size(tokenizer)
    if architecture == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                             num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                             num_key_value_heads=spec.heads, max_position_embeddings=spec.context,
                             tie_word_embeddings=False, **special)
    elif architecture == "gpt_neox":
        config = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=spec.hidden_size,
                               intermediate_size=spec.intermediate_size, num_hidden_layers=spec.layers,
                               num_attention_heads=spec.heads, max_position_embeddings=spec.context,
                               tie_word_embeddings=False, **special)
    elif architecture == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=spec.hidden_size, n_inner=spec.intermediate_size,
                            n_layer=spec.layers, n_head=spec.heads, n_positions=spec.context,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, **special)
    else:
        raise ValueError(f"unknown architecture {architecture!r}; expected llama, gpt_neox or gpt2")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION, dtype=torch.float32)
    model.loss_type = "ForCausalLM"  # GPT2LMHeadModel's class name is not recognised: same loss, minus a warning
    return model


def lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warmup to spec.lr over warmup_steps, then cosine decay to MIN_LR_FRACTION * lr at the last step."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    decay_steps = max(1, spec.steps - 1 - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / decay_steps)
    floor = MIN_LR_FRACTION * spec.lr
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (spec.lr - floor)


def make_optimizer(model: PreTrainedModel, spec: TrainSpec) -> torch.optim.AdamW:
    """AdamW(BETAS) at spec.lr, weight decay on matrices only (not on biases and norm gains)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=BETAS)


def train_causal_lm(model: PreTrainedModel, sequences_by_domain: dict[str, list[list[int]]],
                    weights: dict[str, float], spec: TrainSpec, seed: int, progress: bool = True) -> list[dict]:
    """Train `model` in place on documents (token ids without specials); returns one log dict per step.

    Each step draws documents (a domain by `weights`, then one of its sequences uniformly) until the batch holds
    spec.batch_tokens real tokens; each is [BOS] + ids + [EOS] cut to the model context, right-padded to the
    longest in the batch (labels -100 and attention mask 0 on padding). Same inputs and seed on the same device
    and thread count give identical weights. `tokens` in the log counts real tokens seen up to and including the step.
    """
    domains = sorted(weights)
    for domain in domains:
        if not sequences_by_domain.get(domain):
            raise TrainingError(f"domain {domain!r} has weight {weights[domain]} but no training sequences "
                                f"(domains with data: {sorted(d for d, s in sequences_by_domain.items() if s)})")
    probabilities = np.array([weights[d] for d in domains], dtype=np.float64)
    probabilities /= probabilities.sum()
    config = model.config
    eos = config.eos_token_id
    bos = config.bos_token_id if config.bos_token_id is not None else eos  # as evaluate.bos_token_id does
    if eos is None:
        raise TrainingError(f"{config.model_type} config has no eos_token_id to end training sequences with")
    pad = config.pad_token_id if config.pad_token_id is not None else eos
    context = context_length(config)
    device = next(model.parameters()).device

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    optimizer = make_optimizer(model, spec)
    model.train()
    log: list[dict] = []
    seen_tokens, started = 0, time.perf_counter()
    bar = tqdm(range(spec.steps), desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        samples, batch_real = [], 0
        while batch_real < spec.batch_tokens:
            domain = domains[rng.choice(len(domains), p=probabilities)]
            pool = sequences_by_domain[domain]
            sample = ([bos] + list(pool[rng.integers(len(pool))]) + [eos])[:context]
            samples.append(sample)
            batch_real += len(sample)
        width = max(len(s) for s in samples)
        input_ids = torch.full((len(samples), width), pad, dtype=torch.long)
        labels = torch.full((len(samples), width), -100, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, sample in enumerate(samples):
            input_ids[row, : len(sample)] = labels[row, : len(sample)] = torch.tensor(sample)
            mask[row, : len(sample)] = 1

        lr = lr_at(step, spec)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        if not torch.isfinite(loss):
            raise TrainingError(f"loss is {loss.item()} at step {step} (lr {lr:.3g}): training diverged; "
                                "lower bootstrap.<name>.train.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()

        seen_tokens += batch_real
        log.append({"step": step, "loss": loss.item(), "lr": lr, "tokens": seen_tokens})
        bar.set_postfix(loss=f"{log[-1]['loss']:.3f}",
                        tok_s=f"{seen_tokens / (time.perf_counter() - started):.0f}", refresh=False)
    bar.close()
    model.eval()
    return log
