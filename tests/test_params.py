"""params.yaml validation: every bad input stops with one line naming the file, the key path and what was expected."""
import copy
import re
from pathlib import Path

import pytest
import yaml

from fusesoup.params import ParamsError, deep_merge, load_params, parse_params, read_mapping

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def error_for(raw: dict, change, tmp_path: Path) -> str:
    bad = copy.deepcopy(raw)
    change(bad)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(bad, allow_unicode=True))
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message.removeprefix(f"{path}: ")


def test_repo_params_and_tiny_profile_are_valid(raw):
    params = load_params(REPO / "params.yaml")
    assert params.target in params.sources
    assert params.models == {} and params.model_names() == list(params.bootstrap) == params.sources  # offline default
    tiny = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())
    parse_params(deep_merge(raw, tiny), "tiny")


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda r: r.__setitem__("sead", 1), "sead: unknown key"),
        (lambda r: r["corpus"].__setitem__("max_chunk_bytes", 0), "corpus.max_chunk_bytes: Input should be greater than 0, got 0"),
        (lambda r: r["corpus"].__setitem__("max_chunk_bytes", "big"), "corpus.max_chunk_bytes: Input should be a valid integer"),
        (lambda r: r["corpus"]["sources"][1].__setitem__("kind", "ftp"), "corpus.sources.1: Input tag 'ftp' found using 'kind' does not match"),
        (lambda r: r["corpus"]["sources"].append({"kind": "files", "paths": ["x.txt"]}), "corpus.sources.2: give exactly one of 'domain' or 'domain_field'"),
        (lambda r: r["corpus"]["split"].update(valid=0.6, test=0.5), "corpus.split: valid + test must be below 1"),
        (lambda r: r["corpus"].__setitem__("on_error", "ignore"), "corpus.on_error: Input should be 'fail' or 'skip', got 'ignore'"),
        (lambda r: r.__setitem__("target", "llama-70b"), "target: model 'llama-70b' is defined neither under 'models' nor under 'bootstrap'"),
        (lambda r: r["sources"].append("ghost"), "sources.3: model 'ghost' is defined neither under 'models' nor under 'bootstrap'"),
        (lambda r: r["sources"].remove("target-base"), "sources: must include the target 'target-base'"),
        (lambda r: r["models"].__setitem__("extra", {"source": "bootstrap"}), "models.extra: source 'bootstrap' is not a models entry: a bootstrapped model is defined by its bootstrap.extra section alone"),
        (lambda r: r["models"].__setitem__("code-neox", {"source": "path", "path": "/m"}), "models.code-neox: is also under 'bootstrap'"),
        (lambda r: r["models"].__setitem__("hubby", {"source": "hub"}), "models.hubby.id: required key is missing"),
        (lambda r: r["models"].__setitem__("Bad Name", {"source": "path", "path": "/m"}), "models.Bad Name.[key]: String should match pattern"),
        (lambda r: r["bootstrap"]["code-neox"]["model"].__setitem__("context", 512), "bootstrap.code-neox.model.context: must be >= corpus.max_chunk_bytes + 3"),
        (lambda r: r["bootstrap"]["code-neox"]["model"].__setitem__("heads", 3), "bootstrap.code-neox.model: hidden_size"),
        (lambda r: r["bootstrap"]["code-neox"]["train"].__setitem__("lr", -1), "bootstrap.code-neox.train.lr: Input should be greater than 0, got -1"),
        (lambda r: r["bootstrap"]["code-neox"].__setitem__("architecture", "mamba"), "bootstrap.code-neox.architecture: Input should be 'llama', 'gpt_neox' or 'gpt2', got 'mamba'"),
        (lambda r: r["bootstrap"]["code-neox"]["domains"].__setitem__("legal", 1.0), "bootstrap.code-neox.domains: domains ['legal'] come from no corpus source"),
        (lambda r: r["bootstrap"]["code-neox"]["tokenizer"].__setitem__("domains", ["code", "legal"]), "bootstrap.code-neox.tokenizer.domains: domains ['legal'] come from no corpus source"),
        (lambda r: r["bootstrap"]["prose-gpt2"]["tokenizer"].__setitem__("vocab_size", 100), "bootstrap.prose-gpt2.tokenizer.vocab_size: Input should be greater than or equal to 300"),
        (lambda r: r["flow"]["schedule"].__setitem__("cron", "daily"), "flow.schedule: cron must have 5 fields, got 'daily'"),
        (lambda r: r["runtime"].__setitem__("device", "tpu"), "runtime.device: String should match pattern"),
        (lambda r: (r["extract"].__setitem__("targets", "sample"), r["train"].__setitem__("uld_weight", 0.5)),
         "train.uld_weight: rank matching (ULD) needs each teacher's top k by rank"),
        (lambda r: r["extract"].__setitem__("targets", "top"), "extract.targets: Input should be 'topk' or 'sample'"),
    ],
)
def test_bad_params_name_the_key(raw, tmp_path, change, expected):
    assert error_for(raw, change, tmp_path).startswith(expected)


def test_several_problems_are_counted_on_one_line(raw, tmp_path):
    def two_problems(r):
        r["seed"] = "x"
        r["corpus"]["max_chunk_bytes"] = -5

    message = error_for(raw, two_problems, tmp_path)
    assert message.startswith("seed: Input should be a valid integer")
    assert message.endswith("(and 1 more problem)")


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(ParamsError, match=r"missing\.yaml: file not found"):
        load_params(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("corpus: [unclosed\n")
    with pytest.raises(ParamsError, match=r"broken\.yaml: not valid YAML"):
        load_params(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ParamsError, match=r"scalar\.yaml: expected a mapping at the top level, got int"):
        load_params(scalar)


def test_deep_merge_overrides_nested_keys_only():
    base = {"a": {"b": 1, "c": 2}, "d": [1, 2]}
    assert deep_merge(base, {"a": {"b": 5}, "d": [3]}) == {"a": {"b": 5, "c": 2}, "d": [3]}
    assert base == {"a": {"b": 1, "c": 2}, "d": [1, 2]}


def test_a_key_given_twice_names_file_key_and_both_lines(tmp_path):
    text = (REPO / "params.yaml").read_text()
    assert text.count("\nseed: 0\n") == 1
    top = tmp_path / "params.yaml"
    top.write_text(text.replace("\nseed: 0\n", "\nseed: 0\nseed: 1\n"))
    line = text[:text.index("\nseed: 0\n")].count("\n") + 2
    with pytest.raises(ParamsError) as caught:
        load_params(top)
    assert str(caught.value) == f"{top}: seed: given twice (line {line} and line {line + 1})"
    profile = tmp_path / "profile.yaml"  # profiles are read the same way, nested keys and list items included
    profile.write_text("corpus:\n  sources:\n    - kind: builtin_code\n      domain: code\n      domain: web\n")
    with pytest.raises(ParamsError) as caught:
        read_mapping(profile)
    assert str(caught.value) == f"{profile}: corpus.sources.0.domain: given twice (line 4 and line 5)"


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda r: r.setdefault("extract", {}).__setitem__("k", True), "extract.k: Input should be a valid integer, got True"),
        (lambda r: r["train"].__setitem__("steps", 12.0), "train.steps: Input should be a valid integer, got 12.0"),
        (lambda r: r.__setitem__("seed", "3"), "seed: Input should be a valid integer, got '3'"),
        (lambda r: r["soup"].__setitem__("recompute", 1), "soup.recompute: Input should be a valid boolean, got 1"),
        (lambda r: r["train"].__setitem__("lr", True), "train.lr: Input should be a valid number, got True"),
        (lambda r: r["train"].__setitem__("lr", "fast"), "train.lr: Input should be a valid number, got 'fast'"),
    ],
)
def test_values_are_not_coerced_across_types(raw, tmp_path, change, expected):
    assert re.fullmatch(re.escape(expected) + r" \(line \d+\)", error_for(raw, change, tmp_path))


def test_a_bad_value_is_named_with_its_line(tmp_path):
    text = (REPO / "params.yaml").read_text()
    line = text[:text.index("\n  k: 10 ")].count("\n") + 2
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("\n  k: 10 ", "\n  k: true "))
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    assert str(caught.value) == f"{path}: extract.k: Input should be a valid integer, got True (line {line})"
    path.write_text(text.replace("\nsources: [", "\nsources: [ghost, "))  # a cross-key check's key has its line too
    with pytest.raises(ParamsError, match=r": sources\.0: model 'ghost' is defined neither .* \(line \d+\)$"):
        load_params(path)


def test_a_number_dvc_writes_as_a_string_is_still_a_float(tmp_path):
    """`dvc exp run -S train.lr=1e-5` writes `lr: 1e-05`, which YAML 1.1 reads as the string '1e-05'."""
    text = (REPO / "params.yaml").read_text()
    assert text.count("\n  lr: 1.0e-3\n") == 1
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("\n  lr: 1.0e-3\n", "\n  lr: 1e-05\n"))
    assert read_mapping(path)["train"]["lr"] == "1e-05"
    assert load_params(path).train.lr == 1e-05
