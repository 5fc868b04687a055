"""How the model is distributed while it trains: torch's own engines, chosen by `train.distributed`.

- one process: the model as it is;
- `ddp`: DistributedDataParallel (bucketed all-reduce overlapped with backward; no sync inside accumulation);
- `fsdp`: FSDP2 `fully_shard` of each decoder layer and then the root, so parameters, gradients and optimizer state
  are sharded over the ranks; on CUDA parameters compute in bf16 and gradients reduce in float32, the sharded
  float32 parameters being the optimizer's master copy.
Both engines average gradients over ranks, so the loop multiplies each rank's loss by the world size (its loss sums
are already divided by the global batch's position count). Checkpoints are torch.distributed.checkpoint (DCP)
directories: each rank writes its shards, and a checkpoint loads on any world size (DCP reshards).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from fusesoup.errors import lookup
from fusesoup.params import Engine


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks, by the class names transformers declares unsplittable (`_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers to shard "
                         f"(its _no_split_modules is {names or None})")
    return layers


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`ddp`: the model wrapped in DistributedDataParallel."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)  # no second copy of the gradients


def fully_sharded(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`fsdp`: each decoder layer, then the root, sharded in place (FSDP2); bf16 compute on CUDA."""
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" else MixedPrecisionPolicy())
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


ENGINES: dict[Engine, Callable[[torch.nn.Module, torch.device], torch.nn.Module]] = {
    "ddp": data_parallel, "fsdp": fully_sharded}


def distribute(model: torch.nn.Module, engine: Engine, activation_checkpointing: bool = False) -> torch.nn.Module:
    """The module the loop calls: `model` itself in one process, else wrapped (ddp) or sharded in place (fsdp)."""
    wrap = lookup(ENGINES, engine, "train.distributed engine")
    if activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if rank_and_world()[1] == 1:
        return model
    return wrap(model, next(model.parameters()).device)


def inner(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a DDP wrapper (FSDP2 shards in place, so its module is the model)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def accumulating(model: torch.nn.Module, last: bool):
    """The context of one micro-batch's backward: DDP skips its all-reduce until the step's last micro-batch."""
    return model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()


def save_training_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer state into the DCP directory `directory`, every rank its own shards (collective)."""
    model_state, optimizer_state = get_state_dict(inner(model), optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)


def load_training_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The state save_training_state wrote, resharded onto this run's ranks (collective)."""
    model_state, optimizer_state = get_state_dict(inner(model), optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(inner(model), optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's tensors on rank 0's CPU, gathered from the shards (collective); None on the other ranks."""
    model = inner(model)
    if not isinstance(model, FSDPModule):
        return model.state_dict() if rank_and_world()[0] == 0 else None
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if rank_and_world()[0] == 0 else None
