"""How train@ runs under a launcher: what it honours of the launch configuration, and its process group.

Training is data parallel over torch.distributed (one process per device, launched by `accelerate launch` or
torchrun), DDP or FSDP2 as train.distributed says (engine.py), with bf16 on CUDA. A launch option the code does not
implement (accelerate's own FSDP or DeepSpeed wrapping) is refused, never ignored.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.distributed as dist

from fusesoup.errors import StageError

# accelerate launch's environment variables for engines this loop does not run (each set to "true" when asked).
_UNSUPPORTED_ENGINES = {"ACCELERATE_USE_FSDP": "--use_fsdp (FSDP)", "ACCELERATE_USE_DEEPSPEED": "--use_deepspeed",
                        "ACCELERATE_USE_MEGATRON_LM": "--use_megatron_lm"}
_HONOURED_PRECISION = ("no", "bf16")  # bf16 is what the loop's CUDA autocast uses anyway


def check_launch(env: Mapping[str, str] = os.environ) -> None:
    """StageError naming the first launch option in `env` that training would otherwise silently ignore."""
    for variable, option in _UNSUPPORTED_ENGINES.items():
        if env.get(variable, "").lower() == "true":
            hint = ("set train.distributed: fsdp in params instead (FSDP2 fully_shard, fusesoup/train/engine.py)"
                    if variable == "ACCELERATE_USE_FSDP" else "train.distributed runs ddp or fsdp")
            raise StageError(f"train: accelerate launch {option} is not supported: {hint}; launch without it")
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision not in _HONOURED_PRECISION:
        raise StageError(f"train: accelerate launch --mixed_precision {precision} is not supported: training uses "
                         "bf16 autocast on CUDA and float32 on CPU; launch with --mixed_precision bf16 or no")


def init_distributed(env: Mapping[str, str] = os.environ) -> None:
    """Join the launcher's process group (WORLD_SIZE > 1): NCCL on CUDA, one device per local rank; else gloo."""
    check_launch(env)
    if int(env.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
