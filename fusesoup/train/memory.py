"""The memory plan of a training run, per device, printed before the first step; a run that cannot fit stops then.

Model states follow the engine (engine.py): float32 master weights, float32 gradients and AdamW's two float32
moments, whole on every device under DDP (its buckets are views of the gradients), sharded 1/world under FSDP, which
also holds the layers in flight unsharded (the one computing and the one prefetched, in the compute dtype, plus one
layer's unsharded float32 gradients) and the root's own tensors (embeddings, final norm, head) for the whole pass.
Activations per micro-batch are an estimate for a pre-norm decoder with SDPA attention: per token and layer about
10 x hidden + 4 x mlp width values saved for backward (norm inputs and outputs, q/k/v, attention output, the MLP's
gate, up, activation and product), in the compute dtype; with activation checkpointing each layer keeps only its
input and one layer is recomputed at a time. The logits add per token vocab x (compute dtype + float32 log-softmax
+ its float32 gradient).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import psutil
import torch

from fusesoup.params import Engine
from fusesoup.train.engine import decoder_layers
from fusesoup.train.recipe import TrainingError

FLOAT32 = 4
ADAM_MOMENTS = 2
GB = 1e9


class MemoryPlan(NamedTuple):
    """Bytes per device of one training run, by what holds them."""

    engine: str
    world: int
    parameters: int
    gradients: int
    optimizer: int
    gathered: int  # FSDP: unsharded layers in flight and the root's tensors; 0 otherwise
    activations: int  # one micro-batch, logits included

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.gathered + self.activations


def plan_memory(model: torch.nn.Module, engine: Engine | None, world: int, micro_tokens: int,
                compute_bytes: int, activation_checkpointing: bool) -> MemoryPlan:
    """The plan of training `model` (real or on the meta device) with `engine` on `world` devices (None or world 1:
    one process), `micro_tokens` tokens per forward pass, activations in `compute_bytes` per value."""
    config = model.config
    hidden = config.hidden_size
    mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    total = sum(p.numel() for p in model.parameters())
    try:
        sizes = [sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)]
    except ValueError:  # a model without declared blocks (only FSDP needs them): its layers as the config says
        sizes = [0] * config.num_hidden_layers
    per_layer, root = max(sizes), total - sum(sizes)
    sharded = engine == "fsdp" and world > 1
    share = -(-total // world) if sharded else total
    gathered = (2 * per_layer * compute_bytes + per_layer * FLOAT32 + root * (compute_bytes + FLOAT32)
                if sharded else 0)
    saved_per_layer = (10 * hidden + 4 * mlp) * compute_bytes  # per token
    if activation_checkpointing:
        per_token = len(sizes) * hidden * compute_bytes + saved_per_layer
    else:
        per_token = len(sizes) * saved_per_layer
    per_token += config.vocab_size * (compute_bytes + 2 * FLOAT32)
    return MemoryPlan(engine if world > 1 and engine else "single", world, share * FLOAT32, share * FLOAT32,
                      share * FLOAT32 * ADAM_MOMENTS, gathered, micro_tokens * per_token)


def format_memory_plan(plan: MemoryPlan) -> str:
    """One line: each part and the total per device in GB."""
    parts = ", ".join(f"{name} {getattr(plan, name) / GB:.2f}" for name in
                      ("parameters", "gradients", "optimizer", "gathered", "activations"))
    return (f"memory plan ({plan.engine}, {plan.world} device{'s' if plan.world > 1 else ''}): {parts}; "
            f"total {plan.total / GB:.2f} GB per device")


def device_memory(device: torch.device) -> int:
    """Bytes one rank may use: the GPU's total memory, or on the CPU the machine's available memory shared by the
    ranks on it (LOCAL_WORLD_SIZE, as torchrun and accelerate launch set it)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return psutil.virtual_memory().available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def check_fits(plan: MemoryPlan, available: int, device: torch.device) -> None:
    """TrainingError, in one line, when the plan needs more than `available` bytes."""
    if plan.total > available:
        hint = ("use train.distributed: fsdp on more devices" if plan.engine != "fsdp" else "use more devices")
        raise TrainingError(f"{format_memory_plan(plan)}: more than the {available / GB:.2f} GB of {device}; lower "
                            f"train.micro_batch_tokens, set train.activation_checkpointing, or {hint}")
