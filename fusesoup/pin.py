"""pin@<model>: a path, hub or GGUF model put into data/models/<model>, with a record of where it came from.

The stage links (does not copy) a path or hub model's top-level files into `data/models/<name>` and writes
`pin.json` (source, location, requested revision, resolved hub commit, file sizes). DVC hashes the output through
the links (`cache: false`, so a 7B model is never copied into the DVC cache): editing a local model's weights marks
pin@ and everything downstream as changed, touching nothing changes nothing, and a hub branch is resolved to a
commit once, when pin@ runs, so a later `dvc repro` does not drift when the branch moves. A GGUF model is
dequantised into safetensors (fusesoup/gguf.py) and the GGUF file itself is linked beside them as `source.gguf`,
so that it is tracked exactly as a path model's files are. Every later stage loads every model, bootstrapped or
pinned, from data/models/<name>.
"""
from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from fusesoup.batching import encode_text
from fusesoup.corpus import TokenLimit
from fusesoup.gguf import dequantise, gguf_file, gguf_location, inspect_gguf
from fusesoup.models import (SPECIAL_TOKENS_PER_SEQUENCE, UNSAFE_WEIGHTS, ModelError, check_safetensors, context_length,
                             is_unsafe_weights, load_from)
from fusesoup.params import GgufRef, HubRef, ModelRef, Params, PathRef
from fusesoup.storage import atomic_dir, sha256_file, write_json
from fusesoup.token_bytes import text_token_bytes, token_bytes

PIN_FILE = "pin.json"
GGUF_LINK = "source.gguf"  # a GGUF model's file, linked into its pinned directory: what DVC tracks it by
# Text the tokenizer must spell back byte for byte: alignment compares tokens across tokenizers by their bytes.
ROUND_TRIP_PROBE = "def f(x):\n\treturn x  + 1  # Naïve café, déjà vu — 42%\n\n  Indented Line.\r\n"
_HUB_IGNORE = [*UNSAFE_WEIGHTS, "original/*", "onnx/*", "*.md", ".gitattributes"]


class PinError(ModelError):
    """A path or hub model that cannot be pinned; the message names the model and what to change."""


def hub_snapshot(name: str, ref: HubRef) -> Path:
    """The local snapshot of `ref` at its revision (downloaded once into the Hugging Face cache; offline it must be
    there already): safetensors weights, config, tokenizer files; remote code files only if trust_remote_code."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = f"model {name!r} (hub {ref.id}@{ref.revision})"
    ignore = _HUB_IGNORE + ([] if ref.trust_remote_code else ["*.py"])
    try:
        return Path(snapshot_download(ref.id, revision=ref.revision, ignore_patterns=ignore))
    except GatedRepoError:
        raise PinError(f"{where}: the repo is gated: accept its license on huggingface.co and log in "
                       "(`hf auth login`, or HF_TOKEN in the environment)") from None
    except RevisionNotFoundError:
        raise PinError(f"{where}: revision {ref.revision!r} does not exist; set models.{name}.revision to a "
                       "branch, tag or commit of the repo") from None
    except RepositoryNotFoundError:
        raise PinError(f"{where}: no such repo, or it is private (log in with `hf auth login`); check "
                       f"models.{name}.id") from None
    except LocalEntryNotFoundError:
        raise PinError(f"{where}: not in the local Hugging Face cache and the hub cannot be reached (offline); "
                       "download it once with network access (`hf download "
                       f"{ref.id} --revision {ref.revision}`) or point HF_HOME at a cache that has it") from None
    except HfHubHTTPError as error:
        raise PinError(f"{where}: the hub refused: {' '.join(str(error).split())}") from None


def source_location(name: str, ref: ModelRef) -> tuple[str, dict]:
    """(where the model lives, from_pretrained kwargs) to read its tokenizer and config before pin@ has run."""
    if isinstance(ref, GgufRef):
        return gguf_location(name, ref)
    return str(source_dir(name, ref)), {"trust_remote_code": ref.trust_remote_code}


def source_dir(name: str, ref: PathRef | HubRef) -> Path:
    """The directory `ref` names: a local path, or the hub snapshot of its revision."""
    if isinstance(ref, HubRef):
        return hub_snapshot(name, ref)
    directory = Path(ref.path).expanduser()
    if not directory.is_dir():
        raise PinError(f"model {name!r}: models.{name}.path {ref.path} is not a directory; it must name a "
                       "save_pretrained directory (config.json, *.safetensors, tokenizer files)")
    return directory


def model_files(name: str, directory: Path) -> list[Path]:
    """The top-level files of a model directory that the pipeline may read; refuses one without safetensors."""
    check_safetensors(name, directory)
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    kept = [p for p in files if not is_unsafe_weights(p)]
    if not (directory / "config.json").is_file():
        raise PinError(f"model {name!r}: {directory} has no config.json; it must be a save_pretrained directory")
    if (directory / "tokenizer.model").is_file() and not any(
            (directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        # AutoTokenizer then builds a generic tokenizer from the SentencePiece file that, unlike LlamaTokenizer,
        # puts no `▁` in front of a text: the model would read other tokens than it was trained on
        raise PinError(f"model {name!r}: {directory} has a tokenizer.model but no tokenizer_config.json naming its "
                       "class; add one ({\"tokenizer_class\": \"LlamaTokenizer\"}, as the model's hub repo has)")
    return kept


def check_round_trip(name: str, directory: Path, trust_remote_code: bool = False) -> None:
    """PinError unless the tokenizer's tokens of ROUND_TRIP_PROBE are its exact bytes (a lowercasing or
    unicode-folding normaliser, dropped whitespace or <unk> would misalign every row, found only hours later)."""
    tokenizer = load_from("tokenizer", AutoTokenizer, name, str(directory), {"trust_remote_code": trust_remote_code})
    ids = encode_text(tokenizer, [ROUND_TRIP_PROBE])["input_ids"][0]
    try:
        text_token_bytes(token_bytes(tokenizer), ids, ROUND_TRIP_PROBE)
    except ValueError as error:
        raise PinError(f"model {name!r}: its tokenizer does not give back the text it encodes ({error}); fusion "
                       "aligns tokens by their bytes, so it needs a tokenizer without a lossy normaliser") from None


def pin_model(name: str, ref: ModelRef, out: Path | str) -> dict:
    """Link `ref`'s files into `out` (atomically: all links and pin.json, or nothing) and return the pin record."""
    if isinstance(ref, GgufRef):
        return pin_gguf(name, ref, Path(out))
    directory = source_dir(name, ref)
    files = model_files(name, directory)
    check_round_trip(name, directory, ref.trust_remote_code)
    record = {"name": name, **ref.model_dump(),
              "commit": directory.name if isinstance(ref, HubRef) else None,
              "files": {p.name: p.stat().st_size for p in files}}
    with atomic_dir(out) as tmp:
        for path in files:
            os.symlink(path.resolve(), tmp / path.name)
        write_json(tmp / PIN_FILE, record)
    return record


def pin_gguf(name: str, ref: GgufRef, out: Path) -> dict:
    """Dequantise the GGUF into `out` (atomically), link the file beside the weights and return the pin record:
    the file's sha256, architecture, quantisation type and the dtype the weights were written in."""
    file = gguf_file(name, ref)
    facts = inspect_gguf(name, file)  # what transformers would refuse, from the header, before any weight is read
    with atomic_dir(out) as tmp:
        facts.update(dequantise(name, file, ref.dtype, tmp))
        check_round_trip(name, tmp)
        os.symlink(file.resolve(), tmp / GGUF_LINK)
        record = {"name": name, **ref.model_dump(), "commit": None, "sha256": sha256_file(file), **facts,
                  "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}}
        write_json(tmp / PIN_FILE, record)
    return record


def describe(record: dict) -> str:
    """One line for the stage's log: what was pinned, from where, how big."""
    size = sum(record["files"].values())
    if record["source"] == "hub":
        origin, how = f"hub {record['id']}@{record['revision']} = commit {record['commit']}", "linked"
    elif record["source"] == "gguf":
        origin = (f"gguf {Path(record['path'], record['file'] or '')} (sha256 {record['sha256'][:12]}, "
                  f"{record['architecture']} {record['quantization']}) dequantised to {record['dtype']}")
        how = "written, the GGUF linked"
    else:
        origin, how = f"path {record['path']}", "linked"
    return f"pin@{record['name']}: {origin}, {len(record['files'])} files, {size / 2**20:.1f} MiB ({how})"


def _token_counter(tokenizer):
    def count_tokens(text: str) -> int:
        return len(encode_text(tokenizer, [text])["input_ids"][0])

    return count_tokens


def external_token_limits(params: Params) -> list[TokenLimit]:
    """A TokenLimit for every path, hub or GGUF model (tokenizer and config only, read where the model lives, before
    pin@ links it), in params order: prepare_corpus cuts chunks so that they fit every one of them.

    max_tokens leaves room for BOS and EOS. Bootstrap models need none: their tokenizers are trained on the
    corpus and the schema makes their context hold max_chunk_bytes + TOKENS_OVER_BYTES.
    """
    limits = []
    for name, ref in params.models.items():
        location, kwargs = source_location(name, ref)
        tokenizer = load_from("tokenizer", AutoTokenizer, name, location, kwargs)
        config = load_from("config", AutoConfig, name, location, kwargs)
        max_tokens = context_length(config) - SPECIAL_TOKENS_PER_SEQUENCE
        if max_tokens <= 0:
            raise ModelError(f"model {name!r}: context length {max_tokens + SPECIAL_TOKENS_PER_SEQUENCE} "
                             "leaves no room for text; give a model with a longer context")
        limits.append(TokenLimit(model=name, count_tokens=_token_counter(tokenizer), max_tokens=max_tokens))
    return limits
