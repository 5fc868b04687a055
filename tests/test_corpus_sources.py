"""Corpus sources: every local format, the hub path, the built-in stdlib sources, and each kind of bad input
in fail mode (the message names file and line) and skip mode (counted by reason, good records kept)."""
from __future__ import annotations

import ast
import os
import sysconfig
from collections import Counter
from pathlib import Path

import pytest
import zstandard

from fusesoup.corpus import CorpusError
from fusesoup.corpus.builtin import docstrings, iter_builtin_code, iter_builtin_prose, stdlib_files
from fusesoup.corpus.sources import domain_name
from fusesoup.params import BuiltinCodeSource, BuiltinProseSource, HubSource
from tests.corpus_fixtures import files_source, read_docs, write_jsonl, write_parquet, write_zst

RECORDS = [
    {"text": "first doc", "meta": {"pile_set_name": "Pile-CC"}},
    {"text": "second doc\nwith two lines", "meta": {"pile_set_name": "PubMed Central"}},
    {"text": "third doc", "meta": {"pile_set_name": "Github"}},
]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Glob patterns are relative to the working directory, so every test runs inside its tmp_path."""
    monkeypatch.chdir(tmp_path)


def texts(docs) -> list[str]:
    return [doc.text for doc in docs]


# --- each local format ---------------------------------------------------------------------------------

def test_jsonl_zst_and_parquet_read_text_domain_field_and_origins(tmp_path):
    write_jsonl(Path("a.jsonl"), RECORDS)
    write_zst(Path("b.jsonl.zst"), RECORDS)
    write_parquet(Path("c.parquet"), {"text": [r["text"] for r in RECORDS], "meta": [r["meta"] for r in RECORDS]})
    for name, origins in [("a.jsonl", ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3"]),
                          ("b.jsonl.zst", ["b.jsonl.zst:1", "b.jsonl.zst:2", "b.jsonl.zst:3"]),
                          ("c.parquet", ["c.parquet:row 1", "c.parquet:row 2", "c.parquet:row 3"])]:
        docs, skipped = read_docs(files_source([name], domain_field="meta.pile_set_name"))
        assert texts(docs) == [r["text"] for r in RECORDS]
        assert [d.domain for d in docs] == ["pile-cc", "pubmed-central", "github"]
        assert [d.origin for d in docs] == origins
        assert all(d.group is None for d in docs)  # records split by their own content
        assert not skipped


def test_txt_is_one_document_per_file_and_globs_are_sorted_and_deduplicated(tmp_path):
    Path("docs").mkdir()
    Path("docs/b.txt").write_text("bee\nline two\n")
    Path("docs/a.txt").write_text("ay")
    docs, _ = read_docs(files_source(["docs/*.txt", "docs/a.txt"], domain="notes"))
    assert [(d.text, d.domain, d.origin) for d in docs] == [("ay", "notes", "docs/a.txt"),
                                                            ("bee\nline two\n", "notes", "docs/b.txt")]


def test_fixed_domain_and_a_custom_text_field(tmp_path):
    write_jsonl(Path("a.jsonl"), [{"body": {"content": "x"}}, {"body": {"content": "y"}}])
    docs, _ = read_docs(files_source(["a.jsonl"], text_field="body.content", domain="web"))
    assert [(d.text, d.domain) for d in docs] == [("x", "web"), ("y", "web")]


def test_zst_streams_many_frames_and_lines_that_cross_blocks(tmp_path):
    records = [{"text": f"doc {i} " + "x" * (i % 5000)} for i in range(600)]  # ~1.5 MB: many 64 kB reads
    write_zst(Path("a.jsonl.zst"), records, frames=7)  # frame edges fall inside lines
    docs, skipped = read_docs(files_source(["a.jsonl.zst"]))
    assert texts(docs) == [r["text"] for r in records]
    assert docs[-1].origin == "a.jsonl.zst:600" and not skipped


def test_parquet_is_read_in_batches_across_row_groups(tmp_path):
    write_parquet(Path("a.parquet"), {"text": [f"t{i}" for i in range(2500)], "other": list(range(2500))},
                  row_group_size=700)
    docs, _ = read_docs(files_source(["a.parquet"]))
    assert texts(docs) == [f"t{i}" for i in range(2500)]
    assert docs[2499].origin == "a.parquet:row 2500"


def test_a_pattern_that_matches_nothing_and_an_unknown_extension_are_errors(tmp_path):
    Path("a.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(CorpusError, match=r"pattern 'corpora/\*\.jsonl' matches no file"):
        read_docs(files_source(["a.jsonl", "corpora/*.jsonl"]))
    Path("b.csv").write_text("text\nx\n")
    with pytest.raises(CorpusError, match=r"^b\.csv: unsupported file type"):
        read_docs(files_source(["*"]))
    with pytest.raises(CorpusError, match=r"^notes\.txt: a \.txt file has no field 'meta\.kind'"):
        Path("notes.txt").write_text("x")
        read_docs(files_source(["notes.txt"], domain_field="meta.kind"))


def test_domain_values_become_params_style_names():
    assert domain_name("Pile-CC") == "pile-cc"
    assert domain_name("  PubMed Central ") == "pubmed-central"
    assert domain_name("ArXiv_2") == "arxiv_2"


# --- bad input: fail names file and line, skip counts and keeps the good records ---------------------------

GOOD = {"text": "good", "meta": {"kind": "A"}}
BAD_LINES = [
    (b'{"meta": {"kind": "A"}}', "missing_field", "missing field 'text'"),
    (b'{"text": 7, "meta": {"kind": "A"}}', "not_string", "field 'text' is not a string (got int)"),
    (b'{"text": null, "meta": {"kind": "A"}}', "missing_field", "field 'text' is null"),
    (b'{"text": "x", "meta": {}}', "missing_field", "missing field 'meta.kind'"),
    (b'{"text": "x", "meta": {"kind": 3}}', "not_string", "field 'meta.kind' is not a string (got int)"),
    (b'{"text": "caf\xe9"}', "undecodable", "invalid UTF-8 (byte 0xe9 at offset 13 of the line)"),
    (b'{"text": "\\ud800", "meta": {"kind": "A"}}', "undecodable", "field 'text' holds a lone surrogate"),
    (b'{"text": "x", "meta": ', "bad_json", "malformed JSON (Expecting value at column 23)"),
    (b'["text", "x"]', "bad_json", "expected a JSON object, got list"),
    (b'{"text": "x", "meta": {"kind": "--"}}', "bad_domain", "domain '--' has no letters or digits"),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
@pytest.mark.parametrize("bad,reason,problem", BAD_LINES, ids=[b[1] + str(i) for i, b in enumerate(BAD_LINES)])
def test_a_bad_jsonl_line_fails_naming_file_and_line_or_is_skipped_and_counted(suffix, bad, reason, problem):
    records = [GOOD, {"text": "also good", "meta": {"kind": "B"}}, b"", bad, GOOD | {"text": "last"}]
    name = "corpora/a" + suffix
    Path("corpora").mkdir()
    (write_zst if suffix.endswith("zst") else write_jsonl)(Path(name), records)
    source = files_source(["corpora/*"], domain_field="meta.kind")
    with pytest.raises(CorpusError) as caught:
        read_docs(source, "fail")
    assert str(caught.value).startswith(f"{name}:4: {problem}")
    docs, skipped = read_docs(source, "skip")
    assert texts(docs) == ["good", "also good", "last"]  # the blank line 3 is no record
    assert skipped == {reason: 1}


def test_parquet_bad_rows_name_the_row(tmp_path):
    write_parquet(Path("a.parquet"), {"text": ["ok", None, "fine"]})
    with pytest.raises(CorpusError, match=r"^a\.parquet:row 2: field 'text' is null$"):
        read_docs(files_source(["a.parquet"]))
    write_parquet(Path("b.parquet"), {"body": ["x", "y"]})
    with pytest.raises(CorpusError, match=r"^b\.parquet:row 1: missing field 'text'$"):
        read_docs(files_source(["b.parquet"]))
    write_parquet(Path("c.parquet"), {"text": [1, 2]})
    docs, skipped = read_docs(files_source(["*.parquet"]), "skip")
    assert texts(docs) == ["ok", "fine"]
    assert skipped == {"missing_field": 3, "not_string": 2}


def test_a_corrupt_parquet_file_is_reported(tmp_path):
    Path("a.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(CorpusError, match=r"^a\.parquet:row 1: unreadable Parquet"):
        read_docs(files_source(["a.parquet"]))
    assert read_docs(files_source(["a.parquet"]), "skip") == ([], {"corrupt": 1})


def test_txt_invalid_utf8_names_the_line(tmp_path):
    Path("a.txt").write_bytes(b"one\ntwo\nthr\xffee\n")
    Path("b.txt").write_text("fine")
    with pytest.raises(CorpusError, match=r"^a\.txt:3: invalid UTF-8$"):
        read_docs(files_source(["*.txt"]))
    docs, skipped = read_docs(files_source(["*.txt"]), "skip")
    assert texts(docs) == ["fine"] and skipped == {"undecodable": 1}


def test_a_truncated_zst_stops_that_file_and_names_the_unfinished_line(tmp_path):
    records = [{"text": f"record {i} " + "y" * 300} for i in range(3000)]  # ~1 MB: several zstd blocks
    write_zst(Path("a.jsonl.zst"), records)
    whole = Path("a.jsonl.zst").read_bytes()
    Path("a.jsonl.zst").write_bytes(whole[: len(whole) * 2 // 3])
    write_jsonl(Path("b.jsonl"), [{"text": "after"}])
    # zstandard's stream_reader hides the truncation: it returns part of the data and a clean EOF
    silent = zstandard.ZstdDecompressor().stream_reader(open("a.jsonl.zst", "rb")).read()
    assert 0 < len(silent) < sum(len(r["text"]) for r in records)

    docs, skipped = read_docs(files_source(["a.jsonl.zst", "b.jsonl"]), "skip")
    kept = len(docs) - 1
    assert 0 < kept < len(records)
    assert texts(docs) == [r["text"] for r in records[:kept]] + ["after"]
    assert skipped == {"truncated": 1}
    with pytest.raises(CorpusError) as caught:
        read_docs(files_source(["a.jsonl.zst", "b.jsonl"]))
    assert str(caught.value) == f"a.jsonl.zst:{kept + 1}: truncated zstd stream (the file ends mid-frame)"


def test_an_empty_or_garbage_zst_is_reported(tmp_path):
    Path("a.jsonl.zst").write_bytes(b"")
    with pytest.raises(CorpusError, match=r"^a\.jsonl\.zst:1: truncated zstd stream"):
        read_docs(files_source(["a.jsonl.zst"]))
    Path("a.jsonl.zst").write_bytes(b"not zstd at all")
    with pytest.raises(CorpusError, match=r"^a\.jsonl\.zst:1: corrupt zstd data"):
        read_docs(files_source(["a.jsonl.zst"]))


# --- hub (the real path for e.g. JeanKaddour/minipile), exercised with the `json` builder ----------------

def test_hub_streams_a_json_dataset_with_domain_field_and_max_docs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS + [{"meta": {"pile_set_name": "X"}}])
    source = HubSource(kind="hub", dataset="json", data_files=[str(path)], domain_field="meta.pile_set_name")
    with pytest.raises(CorpusError, match=r"^json\[train\]:row 4: field 'text' is null$"):
        read_docs(source)
    docs, skipped = read_docs(source, "skip")
    assert [(d.text, d.domain, d.origin) for d in docs] == [
        ("first doc", "pile-cc", "json[train]:row 1"),
        ("second doc\nwith two lines", "pubmed-central", "json[train]:row 2"),
        ("third doc", "github", "json[train]:row 3"),
    ]
    assert skipped == {"missing_field": 1}
    capped = HubSource(kind="hub", dataset="json", data_files=[str(path)], domain="web", max_docs=2)
    assert texts(read_docs(capped)[0]) == ["first doc", "second doc\nwith two lines"]


def test_hub_reports_a_dataset_it_cannot_open(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    source = HubSource(kind="hub", dataset="json", data_files=[str(tmp_path / "none.jsonl")], domain="web")
    with pytest.raises(CorpusError, match=r"^json\[train\]: cannot open the dataset"):
        read_docs(source)


# --- built-in sources --------------------------------------------------------------------------------------

def test_stdlib_files_are_shuffled_deterministically_without_site_packages():
    files = stdlib_files()
    assert files == stdlib_files()
    assert {"os.py", "json/decoder.py"} <= set(files)
    assert not any(part in ("site-packages", "dist-packages") for f in files for part in f.split("/"))
    assert files != sorted(files)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) == sum(1 for f in files if (root / f).is_file()) > 500


def test_docstrings_are_collected_in_source_order_from_nested_blocks():
    tree = ast.parse('"""Mod."""\nclass A:\n    """Cls.\n\n      indented"""\n    def f(self):\n'
                     '        """Meth."""\n        x = "not a docstring"\nif True:\n    async def g():\n'
                     '        """Nested in if."""\ndef h(): pass\n')
    assert docstrings(tree) == ["Mod.", "Cls.\n\nindented", "Meth.", "Nested in if."]


def test_builtin_code_and_prose_share_groups_and_count_bad_files(monkeypatch, tmp_path):
    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "site-packages").mkdir()
    (lib / "site-packages" / "third.py").write_text('"""Not stdlib."""\n')
    (lib / "mod.py").write_text('"""Module doc."""\ndef f():\n    """F doc."""\n')
    (lib / "pkg" / "bad.py").write_text("def (:\n")
    (lib / "latin.py").write_bytes(b"# caf\xe9\n")
    os.symlink(lib / "gone.py", lib / "dangling.py")
    (lib / "pydoc_data").mkdir()
    (lib / "pydoc_data" / "topics.py").write_text("topics = {'assert': 'The assert statement'}\n")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(lib)})
    assert sorted(stdlib_files()) == ["dangling.py", "latin.py", "mod.py", "pkg/bad.py", "pydoc_data/topics.py"]

    code, code_skipped = read_docs(BuiltinCodeSource(kind="builtin_code"))  # the topics file is prose, not code
    assert sorted((d.group, d.domain) for d in code) == [("mod.py", "code"), ("pkg/bad.py", "code")]
    assert code_skipped == {"undecodable": 2}
    skipped: Counter[str] = Counter()
    prose = list(iter_builtin_prose(BuiltinProseSource(kind="builtin_prose"), skipped))
    modules = {d.group: d.text for d in prose if not d.group.startswith("pydoc_topics/")}
    assert modules == {"mod.py": "Module doc.\n\nF doc.", "pydoc_data/topics.py": ""}  # (empty: dropped later)
    from pydoc_data.topics import topics
    assert [d.group for d in prose[len(modules):]] == [f"pydoc_topics/{name}" for name in sorted(topics)]
    assert skipped == {"undecodable": 2, "unparsable": 1}
    assert [d.group for d in iter_builtin_code(BuiltinCodeSource(kind="builtin_code"), skipped)] == [
        g for g in stdlib_files() if g in ("mod.py", "pkg/bad.py")]
