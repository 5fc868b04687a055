"""Bits per byte of two models on one domain of a split: its largest document group against the rest; prints JSON.

A split is cut by document group (a source file), so one big group can dominate a domain's valid set; this tells
whether a difference between two models (target-fused vs target-clm by default) holds outside that group.
Use it on valid when tuning; test is for reporting only.

    python bench/domain_groups.py [--split valid] [--domain prose] [--models target-clm target-fused]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import stages  # noqa: E402,F401  (before torch: the stages' oneDNN setting)

from fusesoup.corpus import largest_group_parts, read_split  # noqa: E402
from fusesoup.evaluate import bits_per_byte  # noqa: E402
from fusesoup.models import load_model  # noqa: E402
from fusesoup.params import load_params  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(ROOT / "data/corpus"))
    parser.add_argument("--split", default="valid")
    parser.add_argument("--domain", default="prose")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--models-dir", default=str(ROOT / "data/models"))
    parser.add_argument("--models", nargs="+", default=["target-clm", "target-fused"], help="model names")
    parser.add_argument("--batch-tokens", type=int, default=8192)
    args = parser.parse_args()
    try:
        largest, frames = largest_group_parts(read_split(Path(args.corpus), args.split), args.domain)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    parts = {part: frame["text"].to_list() for part, frame in frames.items()}
    params, scores = load_params(args.params), {}
    for name in args.models:
        model, tokenizer = load_model(name, params, args.models_dir)
        scores[name] = {part: bits_per_byte(model.eval(), tokenizer, texts, args.batch_tokens).bpb
                        for part, texts in parts.items()}
    print(json.dumps({"split": args.split, "domain": args.domain, "largest_group": largest,
                      "rows": {name: len(texts) for name, texts in parts.items()}, "bpb": scores}, indent=2))


if __name__ == "__main__":
    main()
