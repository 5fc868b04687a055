"""The training recipe every loop here shares (bootstrap and continued training): AdamW with FuseLLM's betas and
weight decay on matrices only, linear warmup then cosine decay, gradient clipping, and the special-id rule."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fusesoup.errors import StageError
from fusesoup.params import TrainSpec

MIN_LR_FRACTION = 0.1  # the cosine schedule ends at this fraction of the peak lr
GRAD_CLIP = 1.0
BETAS = (0.9, 0.95)


class TrainingError(StageError):
    """Training cannot go on (a non-finite loss, a domain without data); the message names the step or domain."""


class SpecialIds(NamedTuple):
    bos: int  # in front of every document
    eos: int  # after every document in pretraining-style streams
    pad: int  # fills masked positions only, so its value never changes a result


def special_ids(config) -> SpecialIds:
    """The one rule for every loop: BOS, else EOS (GPT-2 style families); EOS, else BOS; PAD, else EOS."""
    bos = config.bos_token_id if config.bos_token_id is not None else config.eos_token_id
    eos = config.eos_token_id if config.eos_token_id is not None else bos
    if bos is None:
        raise TrainingError(f"{config.model_type} config has neither a bos_token_id nor an eos_token_id to start "
                            "training sequences with")
    return SpecialIds(bos, eos, config.pad_token_id if config.pad_token_id is not None else eos)


def lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warmup to spec.lr over warmup_steps, then cosine decay to MIN_LR_FRACTION * lr at the last step."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    decay_steps = max(1, spec.steps - 1 - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / decay_steps)
    floor = MIN_LR_FRACTION * spec.lr
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (spec.lr - floor)


def make_optimizer(model: torch.nn.Module, spec: TrainSpec) -> torch.optim.AdamW:
    """AdamW(BETAS) at spec.lr, weight decay on matrices only (not on biases and norm gains)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=BETAS)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
