"""The memory plan (fusesoup/train/memory.py) of a realistic config built on the meta device; prints JSON.

A Llama-2-7B-shaped model (no weights allocated) trained as FuseLLM trains it: micro-batches of one 2048-token
sequence, bf16 compute on CUDA, at world 8. Reported per device in GB: DDP and FSDP, with and without activation
checkpointing, next to DeepSpeed ZeRO-3's model states as FuseLLM's recipe runs it (bf16 parameters and gradients,
float32 master weights and Adam moments: 2 + 2 + 12 bytes per parameter, sharded over the world), with the same
activations; and whether each fits an 80 GB A100 and a 141 GB H200.

    python bench/train_memory.py [--hidden 4096 --intermediate 11008 --layers 32 --vocab 32000 --world 8]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.llama_shape import LLAMA_2_7B, add_shape_arguments, llama_config  # noqa: E402
from fusesoup.train.memory import GB, plan_memory  # noqa: E402

DEVICES = {"a100_80gb": 80e9, "h200_141gb": 141e9}
ZERO3_BYTES_PER_PARAMETER = 2 + 2 + 12  # bf16 weights, bf16 gradients, float32 master + two Adam moments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser, LLAMA_2_7B)
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--micro-tokens", type=int, default=2048)
    args = parser.parse_args()
    config = llama_config(args)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    plans = {}
    for checkpointing in (False, True):
        for engine in ("ddp", "fsdp"):
            plan = plan_memory(model, engine, args.world, args.micro_tokens, 2, checkpointing)
            plans[f"{engine}{'+checkpointing' if checkpointing else ''}"] = {
                **{part: round(getattr(plan, part) / GB, 2) for part in
                   ("parameters", "gradients", "optimizer", "gathered", "activations")},
                "total": round(plan.total / GB, 2)}
        zero3 = -(-parameters // args.world) * ZERO3_BYTES_PER_PARAMETER
        plans[f"deepspeed-zero3{'+checkpointing' if checkpointing else ''}"] = {
            "model_states": round(zero3 / GB, 2), "activations": round(plan.activations / GB, 2),
            "total": round((zero3 + plan.activations) / GB, 2)}
    for plan in plans.values():
        plan["fits"] = {name: plan["total"] * GB <= size for name, size in DEVICES.items()}
    print(json.dumps({"shape": vars(args), "parameters": parameters, "gb_per_device": plans,
                      "fsdp/ddp": round(plans["fsdp"]["total"] / plans["ddp"]["total"], 3),
                      "fsdp/zero3": round(plans["fsdp"]["total"] / plans["deepspeed-zero3"]["total"], 3)}, indent=2))


if __name__ == "__main__":
    main()
