"""DVC stages train@clm and train@fused: continued training of the target base, CLM only or CLM + fusion.

Both see the same token stream (the target's tokens of the corpus train split packed into train.block_size
blocks, read a window of shards at a time in the order fusesoup.train.stream fixes from the seed) with the same
budget and schedule; train@fused adds (1 - lambda) * the fusion loss against data/fused. Writes
data/models/target-<variant> (safetensors + tokenizer), plots/train/<variant>.csv (loss curves) and
metrics/train/<variant>.json (valid and test bits per byte), the same bytes on every run; each step's throughput
(tokens per second, MFU) goes to --throughput (data/logs/train/<variant>.csv), which DVC does not track. Checkpoints go to data/checkpoints/<variant> (not a
DVC output, so a killed run keeps them) and are removed once the model is saved.
Data parallel: `accelerate launch --num_processes N -m stages.train fused` (or torchrun), DDP or FSDP2 per
train.distributed; rank 0 writes the outputs.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch.distributed as dist

from fusesoup.cli import run_stage, stage_parser, torch_runtime
from fusesoup.corpus import read_split
from fusesoup.evaluate import score_by_domain
from fusesoup.models import load_model, model_path, stored_dtype
from fusesoup.errors import StageError
from fusesoup.params import TRAINED_VARIANTS, Params, load_params
from fusesoup.storage import atomic_dir, directory_fingerprint, write_csv, write_json
from fusesoup.train.data import run_key, train_stream
from fusesoup.train.engine import full_state_dict
from fusesoup.train.launch import init_distributed
from fusesoup.train.loop import EXTRA_COLUMNS, THROUGHPUT_COLUMNS, ExtraTerms, LiveTeacher, train_target


def live_teacher(name: str, params: Params, models: str, student) -> LiveTeacher:
    """`name` loaded in float32 for inference beside the student, which must share its vocabulary."""
    model, _ = load_model(name, params, models)
    if model.config.vocab_size != student.config.vocab_size:
        raise StageError(f"--live-teacher {name} has {model.config.vocab_size} ids, the target {params.target} "
                         f"{student.config.vocab_size}: a live teacher must be on the target's tokenizer")
    return LiveTeacher(model.float().eval().requires_grad_(False).to(next(student.parameters()).device),
                       params.fuse.temperature)


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("stages.train", __doc__,
                          ["corpus", "models", "fused", "logits", "out", "checkpoints", "metrics", "plots",
                           "throughput"])
    parser.add_argument("variant", choices=TRAINED_VARIANTS, help="clm: CLM loss only; fused: CLM + fusion")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--live-teacher", metavar="MODEL",
                        help="fused only, for benchmarks: MODEL (under --models, on the target's tokenizer) run live as "
                             "the fusion target over the whole vocabulary instead of --fused (the dense ceiling)")
    args = parser.parse_args(argv)
    if args.live_teacher and args.variant != "fused":
        parser.error("--live-teacher is the fusion target: train@fused only")
    variant, params = args.variant, load_params(args.params)
    spec, target = params.train, params.target
    torch_runtime(params)
    init_distributed()  # WORLD_SIZE etc. from accelerate launch or torchrun; refuses options it would ignore

    model, tokenizer = load_model(target, params, args.models)
    model.float()  # master weights in float32; CUDA runs under bf16 autocast in the loop
    teacher = live_teacher(args.live_teacher, params, args.models, model) if args.live_teacher else None
    batches, data_key = train_stream("clm" if teacher else variant, params, model, Path(args.fused),
                                     Path(args.logits) / target)
    lam = spec.lam if variant == "fused" else 1.0
    base = directory_fingerprint(model_path(target, args.models))
    if teacher:  # the live teacher is part of what the checkpoints are valid for
        base = {"base": base, "live_teacher": directory_fingerprint(model_path(args.live_teacher, args.models))}
    key = run_key(variant, params, data_key, base)
    checkpoints = Path(args.checkpoints)
    started = time.perf_counter()
    log = train_target(model, batches, spec, lam, spec.fusion_loss, params.seed, checkpoints, key,
                       progress=not args.no_progress, peak_tflops=params.runtime.peak_tflops,
                       extra=ExtraTerms.of(spec) if variant == "fused" else ExtraTerms(), teacher=teacher)
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
    with atomic_dir(args.out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    model.float()  # scored below as later stages load it: the saved weights, computed in float32
    shutil.rmtree(checkpoints, ignore_errors=True)

    metrics = {"train": {"steps": len(log), "tokens": log[-1]["tokens"], "final_loss": log[-1]["loss"],
                         "lambda": lam}}
    for split in ("valid", "test"):
        results = score_by_domain(model, tokenizer, read_split(args.corpus, split), spec.batch_tokens)
        metrics[split] = {domain: {"bpb": r.bpb} for domain, r in results.items()}
    write_json(args.metrics, metrics)
    write_csv(args.plots, log, ["step", "loss", "clm", *EXTRA_COLUMNS, "lr", "tokens"])
    write_csv(args.throughput, log, ["step", *THROUGHPUT_COLUMNS])
    print(f"train@{variant}: {len(log)} steps in {seconds:.0f} s, final loss {log[-1]['loss']:.3f}; valid bpb "
          + ", ".join(f"{d} {m['bpb']:.3f}" for d, m in metrics["valid"].items()), flush=True)


if __name__ == "__main__":
    run_stage(main)
