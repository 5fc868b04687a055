"""Continued training of the target on lambda * CLM + (1 - lambda) * fusion (FuseLLM section 3.3), nanoGPT style.

The documents come packed into blocks of `train.block_size` tokens (packing.pack_documents: attention and loss
within each document, no padding), each step's blocks planned from the seed and the documents' lengths alone
(stream.py: streamed from the store a window of shards at a time, or in memory), so train@clm and train@fused see
the same tokens in the same order. Data parallel (a
torch.distributed process group, as `accelerate launch` or torchrun set up; DDP or FSDP2 per `train.distributed`,
engine.py): rank r takes every world-th block of each step's batch and divides its loss sums by the global batch's
trained-position count, so the
gradient the engine reduces is the whole batch's: the same trajectory as one process, up to float summation order.
Each rank's share runs in micro-batches of at most `micro_batch_tokens` padded tokens, their gradients accumulated
(the same trajectory again). Every `checkpoint_every` steps the model and optimizer (a DCP checkpoint, sharded
under FSDP), each rank's RNG and the log are swapped into the checkpoint directory atomically; a run started again
with the same key, on any world size, resumes after the last checkpoint and ends with the same weights as a run
that was never stopped.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from fusesoup.params import ContinuedTraining, FusionLoss
from fusesoup.storage import atomic_dir, read_json
from fusesoup.train.engine import (accumulating, distribute, load_training_state, rank_and_world,
                                   save_training_state)
from fusesoup.train.loss import (chunk_likelihood_loss, clm_loss, dense_fusion_loss, fusion_loss, pad_chunks,
                                 pad_ranks, pad_targets, rank_matching_loss, student_log_probs)
from fusesoup.train.memory import check_fits, device_memory, format_memory_plan, plan_memory
from fusesoup.train.packing import TrainBlock
from fusesoup.train.stream import StepBatches
from fusesoup.train.throughput import flops_per_token, model_flops_utilisation, peak_flops
from fusesoup.train.recipe import GRAD_CLIP, TrainingError, lr_at, make_optimizer, set_lr, special_ids

CHECKPOINT_FORMAT = "dcp-v1"  # a checkpoint of another format (or key) is not resumed from
EXTRA_COLUMNS = ("fusion", "chunk", "uld")  # the log's loss terms besides the total and clm ("" where off)
# the log's wall-clock figures: they differ between identical runs, so stages/train.py keeps them out of its plots
THROUGHPUT_COLUMNS = ("tok_s", "mfu")


def micro_batches(batch: Sequence[TrainBlock], budget: int | None) -> list[list[TrainBlock]]:
    """`batch` cut, in order, into micro-batches whose padded size (count x longest) fits `budget` tokens; None: the
    whole batch at once. A block longer than the budget goes alone."""
    if budget is None:
        return [list(batch)]
    micro, current, longest = [], [], 0
    for block in batch:
        width = block.width
        if current and (len(current) + 1) * max(longest, width) > budget:
            micro.append(current)
            current, longest = [], 0
        current.append(block)
        longest = max(longest, width)
    return micro + [current] if current else micro


def make_batch(blocks: Sequence[TrainBlock], pad: int):
    """(input_ids, position_ids, labels, mask: the trained labels, each [B, W]; fused targets, chunks and rank rows,
    each or None), right-padded to the longest block (only the stream's last block is shorter); padding is masked
    and, being last, never attended to by a real token."""
    width = max(block.width for block in blocks)
    input_ids = torch.full((len(blocks), width), pad, dtype=torch.long)
    labels = torch.full((len(blocks), width), pad, dtype=torch.long)
    positions = torch.zeros((len(blocks), width), dtype=torch.long)
    mask = torch.zeros((len(blocks), width), dtype=torch.bool)
    for row, block in enumerate(blocks):
        input_ids[row, : block.width] = torch.from_numpy(block.tokens[:-1])
        labels[row, : block.width] = torch.from_numpy(block.tokens[1:])
        positions[row, : block.width] = torch.from_numpy(block.positions[:-1])
        mask[row, : block.width] = torch.from_numpy(block.trained)
    fused = None if blocks[0].targets is None else pad_targets([block.targets for block in blocks], width)
    chunks = None if blocks[0].chunks is None else pad_chunks([block.chunks.of for block in blocks],
                                                               [block.chunks.ce for block in blocks], width)
    ranks = None if blocks[0].ranks is None else pad_ranks([block.ranks for block in blocks], width)
    return input_ids, positions, labels, mask, fused, chunks, ranks


class ExtraTerms(NamedTuple):
    """The span-aware terms train@fused adds (train.chunk_weight, chunk_temperature, uld_weight); all off: CLM and
    fusion only."""

    chunk_weight: float = 0.0
    chunk_temperature: float = 1.0
    uld_weight: float = 0.0

    @classmethod
    def of(cls, spec: ContinuedTraining) -> "ExtraTerms":
        return cls(spec.chunk_weight, spec.chunk_temperature, spec.uld_weight)


class LiveTeacher(NamedTuple):
    """A model on the target's tokenizer run alongside the student, its whole softmax(logits / temperature) the
    fusion target: what distillation carries with nothing lost in storage (bench/fusion_table.py's dense ceiling)."""

    model: torch.nn.Module
    temperature: float = 1.0


def forward_logits(model, input_ids: torch.Tensor, position_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[B, W, V] logits of packed blocks: position_ids, no attention_mask, no cache (transformers' packed-sequence
    mask: attention within documents), bf16 autocast on CUDA."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return model(input_ids=input_ids.to(device), position_ids=position_ids.to(device), use_cache=False).logits


def batch_losses(model, micro: Sequence[TrainBlock], pad: int, device: torch.device, lam: float, kind: FusionLoss,
                 positions: float, silent: bool = False, extra: ExtraTerms = ExtraTerms(),
                 teacher: LiveTeacher | None = None):
    """(loss, clm, fusion, chunk, uld; each of the last three or None) of one micro-batch, as sums over its trained
    positions / `positions` (the global batch's count); `silent`: every position masked (a rank without a block this
    step adds nothing); the chunk and ULD terms where their weight in `extra` is > 0 and the blocks carry them; the
    fusion term against `teacher`'s whole distribution where one is given, else against the blocks' fused rows."""
    input_ids, position_ids, labels, mask, fused, chunks, ranks = make_batch(micro, pad)
    if silent:
        mask = torch.zeros_like(mask)
    logits = forward_logits(model, input_ids, position_ids, device)
    log_probs = student_log_probs(logits)  # [B, W, V] float32, position t predicts labels[t]; one log-softmax for both
    clm = clm_loss(log_probs, labels.to(device), mask.to(device), positions)
    fusion = None
    if teacher is not None and lam < 1:
        with torch.no_grad():
            teacher_logits = forward_logits(teacher.model, input_ids, position_ids, device).float()
        teacher_probs = torch.softmax(teacher_logits / teacher.temperature, dim=-1)  # [B, W, V]
        fusion = dense_fusion_loss(log_probs, teacher_probs, mask.to(device), kind, positions)
    elif fused is not None and lam < 1:
        fusion = fusion_loss(log_probs, fused._replace(ids=fused.ids.to(device), probs=fused.probs.to(device)),
                             mask.to(device), kind, positions)
    chunk = uld = None
    if chunks is not None and extra.chunk_weight > 0:
        chunk = chunk_likelihood_loss(log_probs, labels.to(device), chunks._replace(of=chunks.of.to(device),
                                      ce=chunks.ce.to(device)), mask.to(device), extra.chunk_temperature, positions)
    if ranks is not None and extra.uld_weight > 0:
        uld = rank_matching_loss(log_probs, ranks._replace(rows=ranks.rows.to(device),
                                 logprobs=ranks.logprobs.to(device)), mask.to(device), positions)
    loss = clm if fusion is None else lam * clm + (1 - lam) * fusion
    loss = loss if chunk is None else loss + extra.chunk_weight * chunk
    return (loss if uld is None else loss + extra.uld_weight * uld), clm, fusion, chunk, uld


def save_checkpoint(directory: Path, key: str, model, optimizer, step: int, log: list[dict]) -> None:
    """Swap a DCP checkpoint (engine.save_training_state, every rank's RNG, the log) into `directory` atomically:
    every rank writes into rank 0's temporary sibling, which rank 0 swaps in once all have written."""
    rank, world = rank_and_world()
    with contextlib.ExitStack() as stack:
        tmp = [stack.enter_context(atomic_dir(directory)) if rank == 0 else None]
        if world > 1:
            dist.broadcast_object_list(tmp, src=0)  # one shared directory (the checkpoints live on a shared disk)
        save_training_state(tmp[0], model, optimizer)
        torch.save(torch.get_rng_state(), tmp[0] / f"rng-{rank}.pt")
        if world > 1:
            dist.barrier()  # every rank's files are in before rank 0 swaps the directory in
        if rank == 0:
            (tmp[0] / "state.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT, "key": key, "step": step,
                                                           "log": log}))
    if world > 1:
        dist.barrier()


def load_checkpoint(directory: Path, key: str, model, optimizer) -> tuple[int, list[dict]]:
    """(next step, log so far) from a checkpoint made under `key`, on any world size; (0, []) if there is none or it
    is another run's (or another format's)."""
    if not (directory / "state.json").is_file():
        return 0, []
    state = read_json(directory / "state.json")
    if state.get("key") != key or state.get("format") != CHECKPOINT_FORMAT:
        return 0, []
    load_training_state(directory, model, optimizer)
    rng = directory / f"rng-{rank_and_world()[0]}.pt"
    if rng.is_file():  # a rank the saving run did not have keeps its seeded RNG
        torch.set_rng_state(torch.load(rng, weights_only=True))
    return state["step"], state["log"]


def train_target(model, batches: StepBatches, spec: ContinuedTraining, lam: float, kind: FusionLoss,
                 seed: int, checkpoints: Path, key: str, progress: bool = True, peak_tflops: float | None = None,
                 extra: ExtraTerms = ExtraTerms(), teacher: LiveTeacher | None = None) -> list[dict]:
    """Train `model` in place (sharded in place under fsdp: engine.full_state_dict gathers it) on `batches[step]`,
    the whole batch of each step (stream.TrainStream or stream.PlannedBatches); returns one log row per step (total,
    clm, fusion, chunk and ULD loss (`extra`: the span-aware terms, off by default), lr, tokens seen, and the step's
    throughput: tokens per second and, on a GPU of known peak (throughput.py; `peak_tflops` per device), model FLOPs
    utilisation: THROUGHPUT_COLUMNS, wall time, so the columns that differ between identical runs). `teacher`: the
    fusion term against a live teacher (LiveTeacher) instead of the batches' fused rows."""
    pad = special_ids(model.config).pad
    device = next(model.parameters()).device
    per_token, peak = flops_per_token(model, spec.block_size), peak_flops(device, peak_tflops)
    torch.manual_seed(seed)
    rank, world = rank_and_world()
    plan_bytes = plan_memory(model, spec.distributed, world, spec.micro_batch_tokens or -(-spec.batch_tokens // world),
                             2 if device.type == "cuda" else 4, spec.activation_checkpointing)
    if rank == 0:
        print(format_memory_plan(plan_bytes), flush=True)
    check_fits(plan_bytes, device_memory(device), device)
    engine = distribute(model, spec.distributed, spec.activation_checkpointing)
    optimizer = make_optimizer(model, spec)
    start, log = load_checkpoint(checkpoints, key, engine, optimizer)
    engine.train()
    seen = log[-1]["tokens"] if log else 0
    bar = tqdm(range(start, spec.steps), desc="train", unit="step", disable=None if progress else True,
               dynamic_ncols=True, initial=start, total=spec.steps)
    for step in bar:
        step_started = time.perf_counter()
        batch = batches[step]
        positions = float(sum(int(block.trained.sum()) for block in batch))  # trained labels of the global batch
        mine = batch[rank::world]
        lr = lr_at(step, spec)
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        micros = [(micro, not mine) for micro in micro_batches(mine or batch[:1], spec.micro_batch_tokens)]
        if world > 1:  # every rank runs as many forward/backward passes (FSDP's gathers are collective)
            count = torch.tensor([len(micros)], device=device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            micros += [(batch[:1], True)] * (int(count.item()) - len(micros))
        terms, present = torch.zeros(5, device=device), [False] * 3  # loss, clm, fusion, chunk, uld
        # gradient accumulation: every micro-batch's loss sums are divided by the global batch's position count,
        # so the accumulated gradient is the whole batch's, whatever the micro-batch size; the engines average
        # over ranks, hence the loss x world
        for index, (micro, silent) in enumerate(micros):
            loss, clm, *parts = batch_losses(engine, micro, pad, device, lam, kind, positions, silent, extra, teacher)
            with accumulating(engine, last=index == len(micros) - 1):
                (loss * world).backward()
            terms += torch.stack([loss.detach(), clm.detach(), *((clm if p is None else p).detach() for p in parts)])
            present = [p is not None for p in parts]
        if world > 1:
            dist.all_reduce(terms)  # each rank holds its share of the global means
        if not torch.isfinite(terms[0]):
            raise TrainingError(f"loss is {terms[0].item()} at step {step} (clm {terms[1].item()}, fusion "
                                f"{terms[2].item() if present[0] else None}, lr {lr:.3g}); nothing was saved")
        torch.nn.utils.clip_grad_norm_(engine.parameters(), GRAD_CLIP)
        optimizer.step()

        seen += int(positions)
        tokens_per_second = positions / (time.perf_counter() - step_started)  # the global batch's, all ranks
        mfu = model_flops_utilisation(tokens_per_second, per_token, peak, world)
        log.append({"step": step, "loss": terms[0].item(), "clm": terms[1].item(),
                    **{name: terms[2 + i].item() if present[i] else "" for i, name in enumerate(EXTRA_COLUMNS)},
                    "lr": lr, "tokens": seen,
                    "tok_s": round(tokens_per_second, 1), "mfu": "" if mfu is None else round(mfu, 4)})
        bar.set_postfix(loss=f"{terms[0].item():.3f}", tok_s=f"{tokens_per_second:.0f}",
                        **({} if mfu is None else {"mfu": f"{mfu:.1%}"}), refresh=False)
        if (step + 1) % spec.checkpoint_every == 0 and step + 1 < spec.steps:
            save_checkpoint(checkpoints, key, engine, optimizer, step + 1, log)
    bar.close()
    model.eval()
    return log
