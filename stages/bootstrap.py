"""DVC stage bootstrap@<name>: train a tokenizer and a small causal LM on the corpus, save both, score them.

Outputs: the model + tokenizer directory (safetensors), metrics (bits per byte on the valid split per domain and
overall, training summary) and the loss curve as CSV for `dvc plots`.
"""
from __future__ import annotations

import time

from fusesoup.batching import encode_text
from fusesoup.bootstrap import build_model, train_causal_lm
from fusesoup.cli import run_stage, stage_parser, torch_runtime
from fusesoup.corpus import read_split
from fusesoup.errors import StageError
from fusesoup.evaluate import score_by_domain
from fusesoup.models import resolve_device_dtype
from fusesoup.params import load_params
from fusesoup.storage import atomic_dir, write_csv, write_json
from fusesoup.tokenizer_families import train_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("stages.bootstrap", __doc__, ["corpus", "out", "metrics", "plots"])
    parser.add_argument("name", help="the model: a key of params.yaml's bootstrap section")
    args = parser.parse_args(argv)
    name, out = args.name, args.out
    params = load_params(args.params)
    if name not in params.bootstrap:
        raise StageError(f"{args.params}: no bootstrap.{name} entry (bootstrap models: {sorted(params.bootstrap)})")
    spec = params.bootstrap[name]
    torch_runtime(params)
    device, _ = resolve_device_dtype(params.runtime)  # trained in float32 whatever runtime.dtype: it is tiny

    tokenizer_domains = spec.tokenizer.domains or list(spec.domains)
    train = read_split(args.corpus, "train")
    empty = sorted(d for d in {*spec.domains, *tokenizer_domains} if not (train["domain"] == d).any())
    if empty:
        raise StageError(f"bootstrap.{name}: the train split of {args.corpus} has no documents of domain(s) {empty}")
    texts_by_domain = {d: train.filter(train["domain"] == d)["text"].to_list() for d in spec.domains}
    started = time.perf_counter()
    tokenizer_texts = train.filter(train["domain"].is_in(tokenizer_domains))["text"].to_list()
    tokenizer = train_tokenizer(spec.tokenizer.kind, tokenizer_texts, spec.tokenizer.vocab_size)
    sequences = {d: encode_text(tokenizer, texts)["input_ids"] for d, texts in texts_by_domain.items()}
    print(f"{name}: {spec.tokenizer.kind} tokenizer of {len(tokenizer)} tokens in {time.perf_counter() - started:.1f} s; "
          + ", ".join(f"{d}: {len(s)} documents, {sum(map(len, s))} tokens" for d, s in sequences.items()), flush=True)

    model = build_model(spec.architecture, spec.model, tokenizer, params.seed).to(device)
    print(f"{name}: {spec.architecture}, {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    started = time.perf_counter()
    log = train_causal_lm(model, sequences, dict(spec.domains), spec.train, params.seed)
    seconds = time.perf_counter() - started

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)  # transformers v5 always writes safetensors
        tokenizer.save_pretrained(tmp)

    results = score_by_domain(model, tokenizer, read_split(args.corpus, "valid"), spec.train.batch_tokens)
    write_json(args.metrics, {
        "domains": {d: {"bpb": r.bpb, "tokens": r.tokens, "bytes": r.bytes} for d, r in results.items()},
        "train": {"steps": len(log), "final_loss": log[-1]["loss"], "tokens": log[-1]["tokens"]},
    })
    write_csv(args.plots, log, ["step", "loss", "lr", "tokens"])
    print(f"{name}: trained {len(log)} steps in {seconds:.0f} s, final loss {log[-1]['loss']:.3f}; valid bpb "
          + ", ".join(f"{d} {r.bpb:.3f}" for d, r in results.items()), flush=True)


if __name__ == "__main__":
    run_stage(main)
