"""Corpus preparation: chunking invariants, cleaning counts, caps, the split, Parquet output and its manifest,
byte-identical reruns, and the stage CLI."""
from __future__ import annotations

import ast
import hashlib
import json
import random
import sys
import sysconfig
import types
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import polars as pl
import pytest
import yaml

from fusesoup.cli import run_stage
from fusesoup.corpus import SPLITS, CorpusError, RawDoc, TokenLimit, read_split
from fusesoup.corpus.prepare import (
    SourceStats, SourceStream, chunk_text, clean_documents, content_hash, doc_id, normalise_newlines,
    prepare_corpus, split_for,
)
from fusesoup.corpus.builtin import docstrings, stdlib_files
from fusesoup.params import BuiltinCodeSource, BuiltinProseSource, Split
from fusesoup.storage import sha256_file
from tests.corpus_fixtures import corpus, files_source, write_jsonl, write_parquet, write_zst
from tests.helpers import reference_chunk_text, words




def check_chunks(text: str, chunks: list[str], max_bytes: int, limits=()) -> None:
    assert "".join(chunks) == text
    for chunk in chunks:
        assert chunk and len(chunk.encode("utf-8")) <= max_bytes
        assert all(limit.count_tokens(chunk) <= limit.max_tokens for limit in limits)


# --- chunking -------------------------------------------------------------------------------------------

def test_chunks_take_whole_lines_greedily():
    assert chunk_text("aa\nbb\ncc\n", 6) == ["aa\nbb\n", "cc\n"]
    assert chunk_text("aa\nbb\ncc", 5) == ["aa\n", "bb\ncc"]
    assert chunk_text("short", 100) == ["short"]
    assert chunk_text("", 10) == []


def test_a_long_line_is_cut_between_characters_never_inside_one():
    text = "é" * 5 + "\n" + "x" * 3  # é is 2 bytes; the cut line's rest "é\n" fits, so lines go on whole
    assert chunk_text(text, 5) == ["éé", "éé", "é\n", "xxx"]
    emoji = "😀" * 4  # 4 bytes each: 7 bytes hold one
    assert chunk_text(emoji, 7) == ["😀"] * 4
    with pytest.raises(CorpusError, match="alone exceeds the chunk limits"):
        chunk_text("a😀", 3)


def test_token_limits_cut_chunks_and_are_counted_only_on_candidates():
    calls = Counter()

    def count(s: str) -> int:
        calls["n"] += 1
        return len(s.split())

    text = "".join(f"w{i} w{i}b\n" for i in range(200))  # 2 words, 8-10 bytes a line
    chunks = chunk_text(text, 1000, [TokenLimit("toy", count, 1000)])
    check_chunks(text, chunks, 1000)
    assert calls["n"] == len(chunks)  # one count per chunk when the byte-greedy candidate fits
    chunks = chunk_text(text, 1000, [words(7)])
    check_chunks(text, chunks, 1000, [words(7)])
    assert [len(c.split()) for c in chunks[:3]] == [6, 6, 6]  # 3 lines of 2 words; a 4th would make 8
    line = "one two three four five six seven"
    assert chunk_text(line, 100, [words(3)]) == ["one two three ", "four five six ", "seven"]


def test_random_unicode_text_keeps_every_chunk_invariant():
    rng = random.Random(1234)
    alphabet = ["a", "b", " ", "\n", "\n\n", "é", "ß", "中", "文", "😀", "🧪", "\u2028", "\x00", "\t"]
    for trial in range(300):
        text = "".join(rng.choice(alphabet) * rng.choice([1, 1, 1, 5, 40]) for _ in range(rng.randrange(0, 120)))
        max_bytes = rng.choice([4, 5, 9, 16, 64, 1024])
        limits = [words(rng.randrange(1, 6))] if trial % 2 else []
        chunks = chunk_text(text, max_bytes, limits)
        check_chunks(text, chunks, max_bytes, limits)




def test_chunks_equal_the_quadratic_reference_on_random_long_lines():
    rng = random.Random(42)
    alphabet = ["a", "b", " ", "\n", "é", "中", "😀", "\x00", "\t"]
    for trial in range(400):
        weights = [rng.random() for _ in alphabet]
        weights[alphabet.index("\n")] *= rng.choice([0, 0.01, 1])  # many texts are one or a few very long lines
        text = "".join(rng.choices(alphabet, weights, k=rng.randrange(0, 600)))
        max_bytes = rng.choice([4, 5, 9, 16, 64, 1024])
        limits = [words(rng.randrange(1, 6))] if trial % 2 else []
        assert chunk_text(text, max_bytes, limits) == reference_chunk_text(text, max_bytes, limits), (text, max_bytes)


# --- cleaning, caps, split ----------------------------------------------------------------------------------

def raw(text: str, domain: str = "web", group: str | None = None) -> RawDoc:
    return RawDoc(text, domain, group, "test")


def run_clean(sources: list[tuple[list[RawDoc], str | None]], caps=None):
    stats = [SourceStats() for _ in sources]
    streams = [SourceStream(iter(docs), stat, fixed) for (docs, fixed), stat in zip(sources, stats)]
    return list(clean_documents(streams, caps or {})), stats


def test_newlines_are_normalised_before_hashing():
    assert normalise_newlines("a\r\nb\rc\n\r\n") == "a\nb\nc\n\n"
    kept, (stats,) = run_clean([([raw("x\r\ny"), raw("x\ny"), raw("x\ry")], None)])
    assert [d.text for d in kept] == ["x\ny"]
    assert stats.duplicate == 2


def test_empty_and_duplicate_documents_are_dropped_first_occurrence_wins():
    first = [raw("a"), raw(" \n\t "), raw(""), raw("b"), raw("a")]
    second = [raw("b", "other"), raw("c", "other")]
    kept, stats = run_clean([(first, None), (second, None)])
    assert [(d.text, d.domain) for d in kept] == [("a", "web"), ("b", "web"), ("c", "other")]
    assert [(s.read, s.kept, s.empty, s.duplicate) for s in stats] == [(5, 2, 2, 1), (2, 1, 0, 1)]
    assert kept[0].group == hashlib.sha256(b"a").hexdigest()  # records without a group split by content


def test_a_domain_cap_keeps_a_prefix_then_drops_the_rest_of_the_domain():
    mixed = [raw("aaaa", "x"), raw("bbbb", "x"), raw("yy", "y"), raw("cccc", "x"), raw("c", "x"), raw("zz", "y")]
    kept, (stats,) = run_clean([(mixed, None)], {"x": 9})
    assert [d.text for d in kept] == ["aaaa", "bbbb", "yy", "zz"]  # "c" would fit, but x is full
    assert (stats.read, stats.kept, stats.capped, stats.stopped_at_cap) == (6, 4, 2, False)


def test_a_source_whose_fixed_domain_is_full_stops_reading():
    def endless():
        for i in range(10**9):
            yield raw(f"doc {i}", "x")

    kept, stats = run_clean([(endless(), "x"), ([raw("more", "x")], "x"), ([raw("doc 3", "y")], "y")], {"x": 18})
    assert [d.text for d in kept] == ["doc 0", "doc 1", "doc 2", "doc 3"]  # a capped doc's copy elsewhere is kept
    assert [(s.read, s.kept, s.capped, s.stopped_at_cap) for s in stats] == [
        (4, 3, 1, True), (0, 0, 0, True), (1, 1, 0, False)]


def test_the_split_is_a_deterministic_function_of_the_group():
    split = Split(valid=0.1, test=0.2)
    names = [split_for(f"group-{i}", split) for i in range(4000)]
    assert names == [split_for(f"group-{i}", split) for i in range(4000)]
    shares = Counter(names)
    assert abs(shares["valid"] / 4000 - 0.1) < 0.02 and abs(shares["test"] / 4000 - 0.2) < 0.03
    assert split_for("anything", Split(valid=0, test=0)) == "train"
    position = int.from_bytes(hashlib.sha256(b"mod.py").digest()[:8], "big") / 2**64
    assert split_for("mod.py", Split(valid=position + 1e-9, test=0)) == "valid"
    assert split_for("mod.py", Split(valid=position - 1e-9, test=0)) == "train"


def test_doc_ids():
    digest = hashlib.sha256(b"text").digest()
    assert doc_id(digest, 3) == digest.hex()[:16] + "-0003"


# --- end to end into Parquet ---------------------------------------------------------------------------

@pytest.fixture
def inputs(tmp_path, monkeypatch) -> Path:
    """One file in each local format, with a duplicate across files, an empty record and CRLF lines."""
    monkeypatch.chdir(tmp_path)
    Path("in").mkdir()
    long = "".join(f"line {i} of a long document\r\n" for i in range(40))  # ~1 kB: several 256-byte chunks
    write_jsonl(Path("in/a.jsonl"), [{"text": long, "meta": {"src": "Web Text"}},
                                     {"text": "   ", "meta": {"src": "Web Text"}}])
    write_zst(Path("in/b.jsonl.zst"), [{"text": f"zst doc {i}", "meta": {"src": "Books"}} for i in range(60)])
    write_parquet(Path("in/c.parquet"), {"text": [f"parquet doc {i}" for i in range(60)] + [long.replace("\r", "")],
                                         "meta": [{"src": "Wiki"}] * 61})
    Path("in/d.txt").write_text("a plain text file\n")
    return tmp_path


def files_corpus(**settings):
    return corpus([files_source(["in/*.jsonl", "in/*.zst", "in/*.parquet"], domain_field="meta.src"),
                   files_source(["in/d.txt"], domain="notes")], max_chunk_bytes=256, **settings)


def test_every_format_lands_in_parquet_with_a_manifest(inputs):
    manifest = prepare_corpus(files_corpus(split=Split(valid=0.2, test=0.2)), "out")
    frames = {split: read_split("out", split) for split in SPLITS}
    rows = [row for frame in frames.values() for row in frame.iter_rows(named=True)]
    assert len(rows) == manifest["totals"]["chunks"] == sum(manifest["splits"][s]["chunks"] for s in SPLITS)
    assert all(frames[s].height > 0 for s in SPLITS)
    assert Counter(r["domain"] for r in rows) == {"books": 60, "wiki": 60, "web-text": 5, "notes": 1}
    long_rows = sorted((r for r in rows if r["domain"] == "web-text"), key=lambda r: r["doc_id"])
    expected = "".join(f"line {i} of a long document\n" for i in range(40))
    assert "".join(r["text"] for r in long_rows) == expected
    digest = hashlib.sha256(expected.encode()).hexdigest()[:16]
    assert [r["doc_id"] for r in long_rows] == [f"{digest}-{i:04d}" for i in range(5)]
    assert {r["text"] for r in rows} >= {"zst doc 7", "parquet doc 59", "a plain text file\n"}
    assert manifest["sources"] == [
        {"kind": "files", "read": 123, "kept": 121, "empty": 1, "duplicate": 1, "capped": 0,
         "skipped": {}, "stopped_at_cap": False},
        {"kind": "files", "read": 1, "kept": 1, "empty": 0, "duplicate": 0, "capped": 0,
         "skipped": {}, "stopped_at_cap": False},
    ]
    for split in SPLITS:
        entry = manifest["splits"][split]
        assert entry["sha256"] == sha256_file(Path("out") / f"{split}.parquet")
        assert entry["chunks"] == sum(d["chunks"] for d in entry["domains"].values()) == frames[split].height
        assert entry["bytes"] == sum(len(t.encode()) for t in frames[split]["text"])
        for domain, counts in entry["domains"].items():  # files records: each document is its own split group
            rows = frames[split].filter(pl.col("domain") == domain)
            doc_bytes = rows.group_by(pl.col("doc_id").str.split("-").list.first()).agg(
                pl.col("text").str.len_bytes().sum())["text"]
            assert counts["groups"] == len(doc_bytes)
            assert counts["largest_group_share"] == pytest.approx(doc_bytes.max() / counts["bytes"])
    assert manifest["content_hash"] == content_hash(manifest["splits"])
    assert manifest["corpus"]["max_chunk_bytes"] == 256
    # one-document domains sit in one split each (here valid), so test lacks them
    assert {split: set(frames[split]["domain"]) for split in SPLITS} == {
        "train": {"books", "wiki"}, "valid": {"books", "wiki", "web-text", "notes"}, "test": {"books", "wiki"}}
    assert manifest["missing_domains"] == {"valid": [], "test": ["notes", "web-text"]}
    assert json.loads(Path("out/manifest.json").read_text()) == manifest
    meta = pq.ParquetFile("out/train.parquet").metadata
    assert meta.row_group(0).column(2).compression == "ZSTD"


def test_two_runs_give_byte_identical_files(inputs):
    prepare_corpus(files_corpus(), "one")
    prepare_corpus(files_corpus(), "two")
    names = sorted(p.name for p in Path("one").iterdir())
    assert names == ["manifest.json", "test.parquet", "train.parquet", "valid.parquet"]
    for name in names:
        assert (Path("one") / name).read_bytes() == (Path("two") / name).read_bytes()


def test_bad_input_fails_without_touching_the_previous_corpus_or_is_skipped_and_counted(inputs):
    prepare_corpus(files_corpus(), "out")
    before = {p.name: p.read_bytes() for p in Path("out").iterdir()}
    with open("in/a.jsonl", "ab") as handle:
        handle.write(b'{"text": "good", "meta": {"src": "x"}}\n{"meta": {"src": "x"}}\n')  # line 4: no text
    with pytest.raises(CorpusError, match=r"^in/a\.jsonl:4: missing field 'text'$"):
        prepare_corpus(files_corpus(), "out")
    assert {p.name: p.read_bytes() for p in Path("out").iterdir()} == before
    assert sorted(p.name for p in Path(".").iterdir()) == ["in", "out"]  # no temp directory left behind
    manifest = prepare_corpus(files_corpus(on_error="skip"), "out")
    assert manifest["sources"][0]["skipped"] == {"missing_field": 1}
    assert manifest["sources"][0]["kept"] == 122
    assert "good" in {t for s in SPLITS for t in read_split("out", s)["text"]}


def test_settings_errors_of_any_source_come_before_reading(inputs):
    with open("in/a.jsonl", "ab") as handle:
        handle.write(b"not json\n")
    later = files_source(["in/missing/*.jsonl"])
    with pytest.raises(CorpusError, match=r"^corpus files: pattern 'in/missing/\*\.jsonl' matches no file"):
        prepare_corpus(corpus([files_corpus().sources[0], later]), "out")


def test_an_empty_corpus_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(Path("a.jsonl"), [{"text": " "}])
    with pytest.raises(CorpusError, match="the corpus is empty after cleaning"):
        prepare_corpus(corpus([files_source(["a.jsonl"])]), "out")
    assert not Path("out").exists()


def test_builtin_sources_smoke_both_domains_and_modules_share_a_split(tmp_path):
    settings = corpus([BuiltinCodeSource(kind="builtin_code"), BuiltinProseSource(kind="builtin_prose")],
                      domain_max_bytes={"code": 200_000, "prose": 200_000}, split=Split(valid=0.3, test=0.3))
    manifest = prepare_corpus(settings, tmp_path / "corpus")
    code, prose = manifest["sources"]
    assert code["stopped_at_cap"] and prose["stopped_at_cap"] and code["capped"] == prose["capped"] == 1
    for domain in ("code", "prose"):
        size = sum(manifest["splits"][s]["domains"].get(domain, {}).get("bytes", 0) for s in SPLITS)
        assert 50_000 < size <= 200_000
    split_of_doc = {}
    for split in SPLITS:
        frame = read_split(tmp_path / "corpus", split)
        assert frame["text"].str.len_bytes().max() <= 1024
        split_of_doc |= {(d[:16], dom): split for d, dom in zip(frame["doc_id"], frame["domain"])}
    root = Path(sysconfig.get_paths()["stdlib"])
    shared = 0
    for rel in stdlib_files()[:100]:  # both sources read the modules in this order
        try:
            code = normalise_newlines((root / rel).read_text(encoding="utf-8"))
            prose = "\n\n".join(docstrings(ast.parse(code)))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        found = [split_of_doc.get((hashlib.sha256(text.encode()).hexdigest()[:16], domain))
                 for text, domain in [(code, "code"), (prose, "prose")]]
        if None not in found:
            shared += 1
            assert found[0] == found[1] == split_for(rel, settings.split)
    assert shared >= 5


# --- the stage CLI ----------------------------------------------------------------------------------------

def test_the_stage_writes_the_corpus_and_reports_bad_input_in_one_line(inputs, monkeypatch, capsys):
    stub = types.ModuleType("fusesoup.pin")
    stub.external_token_limits = lambda params: [words(12)]
    monkeypatch.setitem(sys.modules, "fusesoup.pin", stub)
    from stages.prepare_corpus import main

    params = yaml_params(inputs)
    run_stage(lambda: main(["--params", str(params), "--out", "data/corpus"]))
    manifest = json.loads(Path("data/corpus/manifest.json").read_text())
    assert "token_limits" not in manifest  # they shape the chunks; recording them would change the output's hash
    assert all(len(t.split()) <= 12 for s in SPLITS for t in read_split("data/corpus", s)["text"])
    out = capsys.readouterr().out
    assert out.startswith(f"data/corpus: {manifest['totals']['documents']} documents")
    assert "; chunks fit words (12 tokens)" in out
    assert "note: model 'words' holds 12 tokens of text, fewer than a chunk of corpus.max_chunk_bytes=" in out
    assert manifest["missing_domains"] == {"valid": ["web-text"], "test": ["notes"]}  # the default 5% / 5% split
    assert ("warning: domain 'web-text' has no documents in valid: the soups are tuned without it\n"
            "warning: domain 'notes' has no documents in test: it shapes the models but gets no test score\n") in out
    Path("in/a.jsonl").write_bytes(b'{"text": "x", "meta": {"src": "ok"}}\n{"text": "\xff"}\n')
    with pytest.raises(SystemExit) as stopped:
        run_stage(lambda: main(["--params", str(params), "--out", "data/corpus"]))
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (
        "error: in/a.jsonl:2: invalid UTF-8 (byte 0xff at offset 10 of the line)\n")


def yaml_params(root: Path) -> Path:
    """A params file whose corpus is `files_corpus()` and whose only model is a local path (token limits)."""
    params = {"models": {"ext": {"source": "path", "path": "models/ext"}}, "target": "ext", "sources": ["ext"],
              "corpus": files_corpus().model_dump(mode="json", exclude_none=True)}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path
