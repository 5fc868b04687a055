"""DVC stages train@clm and train@fused: continued training of the target base, CLM only or CLM + fusion.

Both see the same token stream (the target's tokens of the corpus train split packed into train.block_size
blocks, in the order pack_documents and plan_steps fix from the seed) with the same budget and schedule;
train@fused adds (1 - lambda) * the fusion loss against data/fused. Writes data/models/target-<variant>
(safetensors + tokenizer), plots/train/<variant>.csv (loss curves) and metrics/train/<variant>.json (valid and
test bits per byte). Checkpoints go to
data/checkpoints/<variant> (not a DVC output, so a killed run keeps them) and are removed once the model is saved.
Data parallel: `accelerate launch --num_processes N -m stages.train fused` (or torchrun), DDP or FSDP2 per
train.distributed; rank 0 writes the outputs.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fusesoup.cli import StageError, run_stage
from fusesoup.corpus import read_split
from fusesoup.evaluate import score_by_domain
from fusesoup.logits.sparse_store import FUSED_EXTRAS, SparseStore
from fusesoup.logits.store import LogitStore
from fusesoup.models import context_length, load_model, model_path, stored_dtype
from fusesoup.params import TRAINED_VARIANTS, Params, load_params
from fusesoup.storage import atomic_dir, content_key, directory_fingerprint, write_csv, write_json
from fusesoup.train.engine import full_state_dict
from fusesoup.train.launch import init_distributed
from fusesoup.train.loop import train_target
from fusesoup.train.packing import TrainBlock, TrainSequence, pack_documents
from fusesoup.train.recipe import special_ids


def load_documents(variant: str, fused: Path, target_logits: Path) -> tuple[list[TrainSequence], str]:
    """The train split's documents (with fused targets for `fused`) and the key of the store they come from."""
    if variant == "fused":
        store = SparseStore(fused, FUSED_EXTRAS)
        items = [TrainSequence(s.input_ids, s.rows) for batch in store.iter_batches("train", 256) for s in batch]
    else:
        store = LogitStore(target_logits)
        items = [TrainSequence(s.logits.input_ids, None) for batch in store.iter_batches("train", 256) for s in batch]
    if not items:
        raise StageError(f"no training sequences in the train split of {store.directory} for train@{variant}")
    return items, store.manifest["key"]


def load_blocks(variant: str, params: Params, model, fused: Path, target_logits: Path
                ) -> tuple[list[TrainBlock], str]:
    """load_documents packed into train.block_size blocks for `model`, and the key of their store."""
    items, key = load_documents(variant, fused, target_logits)
    context, block = context_length(model.config), params.train.block_size
    if block > context:
        raise StageError(f"train.block_size {block} is longer than the context of {params.target} ({context} tokens)")
    return pack_documents(items, block, special_ids(model.config).bos, context, params.seed), key


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.train", description=__doc__)
    parser.add_argument("variant", choices=TRAINED_VARIANTS,
                        help="clm: CLM loss only; fused: CLM + fusion (params train)")
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    parser.add_argument("--corpus", default="data/corpus", help="the corpus directory (default: data/corpus)")
    parser.add_argument("--models", default="data/models", help="where models live (default: data/models)")
    parser.add_argument("--fused", default="data/fused", help="the fused store (default: data/fused)")
    parser.add_argument("--logits", default="data/logits", help="the logit stores (default: data/logits)")
    parser.add_argument("--out", help="the trained model (default: data/models/target-<variant>)")
    parser.add_argument("--checkpoints", help="checkpoint directory (default: data/checkpoints/<variant>)")
    parser.add_argument("--metrics", help="metrics JSON (default: metrics/train/<variant>.json)")
    parser.add_argument("--plots", help="loss curves CSV (default: plots/train/<variant>.csv)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    variant, params = args.variant, load_params(args.params)
    spec, target = params.train, params.target
    if params.runtime.threads:
        torch.set_num_threads(params.runtime.threads)
    init_distributed()  # WORLD_SIZE etc. from accelerate launch or torchrun; refuses options it would ignore

    model, tokenizer = load_model(target, params, args.models)
    model.float()  # master weights in float32; CUDA runs under bf16 autocast in the loop
    blocks, data_key = load_blocks(variant, params, model, Path(args.fused), Path(args.logits) / target)
    lam = spec.lam if variant == "fused" else 1.0
    key = content_key({"variant": variant, "train": spec.model_dump(), "seed": params.seed, "data": data_key,
                       "base": directory_fingerprint(model_path(target, args.models))})
    checkpoints = Path(args.checkpoints or f"data/checkpoints/{variant}")
    started = time.perf_counter()
    log = train_target(model, blocks, spec, lam, spec.fusion_loss, params.seed, checkpoints, key,
                       progress=not args.no_progress)
    seconds = time.perf_counter() - started
    if dist.is_initialized():
        weights = full_state_dict(model) if spec.distributed == "fsdp" else None  # gathered onto rank 0's CPU
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank:
            return
        if weights is not None:  # the sharded model cannot run without its process group: a whole one instead
            model, tokenizer = load_model(target, params, args.models)
            model.float().load_state_dict(weights)

    model.to(stored_dtype(model_path(target, args.models)))  # saved as the base is (soups mix them tensor by tensor)
    with atomic_dir(args.out or f"data/models/target-{variant}") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    model.float()  # scored below as later stages load it: the saved weights, computed in float32
    shutil.rmtree(checkpoints, ignore_errors=True)

    metrics = {"train": {"steps": len(log), "tokens": log[-1]["tokens"], "final_loss": log[-1]["loss"],
                         "lambda": lam}}
    for split in ("valid", "test"):
        results = score_by_domain(model, tokenizer, read_split(args.corpus, split), spec.batch_tokens)
        metrics[split] = {domain: {"bpb": r.bpb} for domain, r in results.items()}
    write_json(args.metrics or f"metrics/train/{variant}.json", metrics)
    write_csv(args.plots or f"plots/train/{variant}.csv", log,
              ["step", "loss", "clm", "fusion", "lr", "tokens", "tok_s"])
    print(f"train@{variant}: {len(log)} steps in {seconds:.0f} s, final loss {log[-1]['loss']:.3f}; valid bpb "
          + ", ".join(f"{d} {m['bpb']:.3f}" for d, m in metrics["valid"].items()), flush=True)


if __name__ == "__main__":
    run_stage(main)
