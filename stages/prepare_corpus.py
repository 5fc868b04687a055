"""DVC stage prepare_corpus: params.yaml's corpus section -> data/corpus/{train,valid,test}.parquet + manifest.json."""
from __future__ import annotations

from fusesoup.cli import run_stage, stage_parser
from fusesoup.corpus.prepare import prepare_corpus
from fusesoup.params import load_params


def main(argv: list[str] | None = None) -> None:
    args = stage_parser("stages.prepare_corpus", __doc__, ["out"]).parse_args(argv)
    params = load_params(args.params)
    from fusesoup.pin import external_token_limits  # loads tokenizers of path/hub/GGUF models only

    limits = external_token_limits(params)
    manifest = prepare_corpus(params.corpus, args.out, limits)
    totals = manifest["totals"]
    print(f"{args.out}: {totals['documents']} documents, {totals['chunks']} chunks, {totals['bytes']} bytes "
          f"(train/valid/test chunks: {'/'.join(str(s['chunks']) for s in manifest['splits'].values())})"
          + "".join(f"; chunks fit {limit.model} ({limit.max_tokens} tokens)" for limit in limits))
    for limit in limits:
        if limit.max_tokens < params.corpus.max_chunk_bytes:  # a chunk of max_chunk_bytes may need that many tokens
            print(f"note: model {limit.model!r} holds {limit.max_tokens} tokens of text, fewer than a chunk of "
                  f"corpus.max_chunk_bytes={params.corpus.max_chunk_bytes} may need: chunks are cut to fit it")
    for split, domains in manifest["missing_domains"].items():
        for domain in domains:
            print(f"warning: domain {domain!r} has no documents in {split}: "
                  + ("it shapes the models but gets no test score" if split == "test" else
                     "the soups are tuned without it"))
    for split, stats in manifest["splits"].items():
        for domain, counts in stats["domains"].items():
            if split != "train" and counts["largest_group_share"] > 0.5:
                print(f"note: {split} {domain}: one document group holds {counts['largest_group_share']:.0%} of the "
                      f"{counts['bytes']} bytes ({counts['groups']} groups); its scores mostly measure that group")


if __name__ == "__main__":
    run_stage(main)
