"""Where each teacher's bits-per-byte advantage over the student sits: one-to-one tokens or spans; prints JSON.

Both models score a split's texts (per-token CE after BOS); the two tokenizations are aligned by byte offsets and
each side's cost is summed over the one-to-one groups and over the spans (groups that are not one-to-one). FuseLLM's
transfer (align.spans: onehot) gives the student only the teacher's one-to-one rows, so a teacher whose advantage
sits in the spans has little to pass on. Use it on valid; test is for reporting only.

    python bench/teacher_gain.py [--split valid] [--student target-clm] [--teachers code-neox prose-gpt2]
                                 [--part all|largest group|rest]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import stages  # noqa: E402,F401  (before torch: the stages' oneDNN setting)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fusesoup.align.token_alignment import GROUP_KINDS, byte_ends, cost_by_group_kind, offset_align  # noqa: E402
from fusesoup.corpus import largest_group_parts, read_split  # noqa: E402
from fusesoup.logits.extract import extract_sequences  # noqa: E402
from fusesoup.models import load_model  # noqa: E402
from fusesoup.params import load_params  # noqa: E402
from fusesoup.token_bytes import text_token_bytes, token_bytes  # noqa: E402


def token_costs(name: str, params, models_dir: str, texts: list[str], batch_tokens: int):
    """Per text: (the tokens' bytes, their CE in nats) under model `name`."""
    model, tokenizer = load_model(name, params, models_dir)
    with torch.no_grad():
        outputs = extract_sequences(model.eval(), tokenizer, texts, 1, batch_tokens)
    table = token_bytes(tokenizer)
    return [(text_token_bytes(table, out.input_ids.tolist(), text), out.ce) for out, text in zip(outputs, texts)]


def gain_report(teacher, student) -> dict:
    """Both models' bits per byte over the one-to-one groups, the spans and all, from their token_costs."""
    totals = np.zeros((len(GROUP_KINDS), 3))
    for (teacher_pieces, teacher_ce), (student_pieces, student_ce) in zip(teacher, student, strict=True):
        student_ends = byte_ends(student_pieces)
        groups = offset_align(byte_ends(teacher_pieces), student_ends)
        totals += cost_by_group_kind(groups, teacher_ce, student_ce, student_ends)
    all_bytes = totals[:, 2].sum()
    report = {kind: {"byte_share": row[2] / all_bytes, "teacher_bpb": row[0] / row[2] / math.log(2),
                     "student_bpb": row[1] / row[2] / math.log(2),
                     "gain_bpb_of_all": (row[1] - row[0]) / all_bytes / math.log(2)}
              for kind, row in zip(GROUP_KINDS, totals)}
    report["all"] = {"teacher_bpb": totals[:, 0].sum() / all_bytes / math.log(2),
                     "student_bpb": totals[:, 1].sum() / all_bytes / math.log(2)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(ROOT / "data/corpus"))
    parser.add_argument("--split", default="valid")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--models-dir", default=str(ROOT / "data/models"))
    parser.add_argument("--student", default="target-clm")
    parser.add_argument("--teachers", nargs="+", help="default: params sources other than the target")
    parser.add_argument("--part", default="all", choices=["all", "largest group", "rest"],
                        help="within each domain: every row, or its largest document group, or the other rows")
    parser.add_argument("--batch-tokens", type=int, default=8192)
    args = parser.parse_args()
    params = load_params(args.params)
    teachers = args.teachers or [name for name in params.sources if name != params.target]
    frame = read_split(Path(args.corpus), args.split)
    texts = {domain: (frame.filter(frame["domain"] == domain) if args.part == "all"
                      else largest_group_parts(frame, domain)[1][args.part])["text"].to_list()
             for domain in sorted(set(frame["domain"].to_list()))}
    every_text = [text for domain_texts in texts.values() for text in domain_texts]

    def costs_by_domain(name: str) -> dict[str, list]:
        """token_costs of every selected text, model `name` loaded once, cut back into the domains."""
        costs, start = token_costs(name, params, args.models_dir, every_text, args.batch_tokens), 0
        by_domain = {}
        for domain, domain_texts in texts.items():
            by_domain[domain], start = costs[start : start + len(domain_texts)], start + len(domain_texts)
        return by_domain

    student = costs_by_domain(args.student)
    teacher_costs = {teacher: costs_by_domain(teacher) for teacher in teachers}
    report = {"split": args.split, "student": args.student, "part": args.part, "domains": {
        domain: {"rows": len(domain_texts), **{teacher: gain_report(costs[domain], student[domain])
                                               for teacher, costs in teacher_costs.items()}}
        for domain, domain_texts in texts.items()}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
