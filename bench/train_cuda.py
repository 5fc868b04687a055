"""train@fused's loop on a generated model and generated fused data, for the GPU check; prints JSON.

A Llama of the given shape (default TinyLlama's 1.1B) built in float32 master weights on --device, trained by
fusesoup.train.loop.train_target (bf16 autocast on CUDA, lambda 0.9, the fused term over --k entries per position)
on packed blocks of random tokens with random fused rows, --steps steps of --batch-tokens. Reported: the median
tokens/s and MFU of the steps after --warmup (the loop's own columns: throughput.py), the peak CUDA memory, and the
memory plan the loop printed. Needs no corpus or stores; on the CPU a small shape checks that it runs:

    python bench/train_cuda.py --device cuda [--steps 200 --batch-tokens 65536 --micro-batch-tokens 16384]
    python bench/train_cuda.py --device cpu --hidden 64 --intermediate 128 --layers 2 --vocab 512 --steps 4 \\
        --batch-tokens 1024 --block 256
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.llama_shape import add_shape_arguments, llama_config  # noqa: E402
from fusesoup.logits.sparse import merge_entries  # noqa: E402
from fusesoup.params import ContinuedTraining  # noqa: E402
from fusesoup.train.loop import train_target  # noqa: E402
from fusesoup.train.packing import TrainSequence, pack_documents, packing_order  # noqa: E402
from fusesoup.train.stream import PlannedBatches  # noqa: E402
from fusesoup.train.throughput import flops_per_token  # noqa: E402


def generated_documents(count: int, length: int, vocab: int, k: int, seed: int) -> list[TrainSequence]:
    """`count` documents of `length` random tokens, each position with k random fused entries."""
    rng = np.random.default_rng(seed)
    documents = []
    for _ in range(count):
        ids = rng.integers(3, vocab, length)
        rows = merge_entries(np.repeat(np.arange(length), k), rng.integers(3, vocab, length * k),
                             rng.random(length * k), length, vocab)
        documents.append(TrainSequence(ids, rows))
    return documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    add_shape_arguments(parser)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--batch-tokens", type=int, default=65536)
    parser.add_argument("--micro-batch-tokens", type=int, default=None)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the medians")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--checkpointing", action="store_true", help="train.activation_checkpointing")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = llama_config(args, max_position_embeddings=args.block, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device)  # float32 master weights; the loop autocasts to bf16 on CUDA
    documents = generated_documents(2 * args.batch_tokens // args.block + 2, args.block - 1, args.vocab, args.k, 0)
    order = packing_order([len(d.input_ids) for d in documents], np.random.default_rng(0))
    blocks = pack_documents(documents, args.block, 1, args.block, order)
    spec = ContinuedTraining(steps=args.steps, batch_tokens=args.batch_tokens, block_size=args.block, lr=1e-4,
                             warmup_steps=10, checkpoint_every=args.steps + 1,
                             micro_batch_tokens=args.micro_batch_tokens,
                             activation_checkpointing=args.checkpointing)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        log = train_target(model, PlannedBatches(blocks, spec.batch_tokens, spec.steps, 0), spec, 0.9, "ce", 0,
                           Path(scratch), "bench", progress=False)
    measured = log[args.warmup:] or log
    mfu = [row["mfu"] for row in measured if row["mfu"] != ""]
    print(json.dumps({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "parameters": sum(p.numel() for p in model.parameters()), "flops_per_token": flops_per_token(model, args.block),
        "steps": args.steps, "batch_tokens": args.batch_tokens, "block": args.block,
        "micro_batch_tokens": args.micro_batch_tokens, "activation_checkpointing": args.checkpointing,
        "seconds": round(time.perf_counter() - started, 1),
        "median_tok_s": statistics.median(row["tok_s"] for row in measured),
        "median_mfu": statistics.median(mfu) if mfu else None,
        "peak_cuda_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "loss_first_last": [round(log[0]["loss"], 4), round(log[-1]["loss"], 4)],
    }, indent=2))


if __name__ == "__main__":
    main()
