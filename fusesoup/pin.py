"""pin@<model>: a path or hub model linked into data/models/<model>, with a record of where it came from.

The stage links (does not copy) the model's top-level files into `data/models/<name>` and writes `pin.json`
(source, location, requested revision, resolved hub commit, file sizes). DVC hashes the output through the links
(`cache: false`, so a 7B model is never copied into the DVC cache): editing a local model's weights marks pin@ and
everything downstream as changed, touching nothing changes nothing, and a hub branch is resolved to a commit once,
when pin@ runs, so a later `dvc repro` does not drift when the branch moves. Every later stage loads every model,
bootstrapped or pinned, from data/models/<name>.
"""
from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from fusesoup.corpus import TokenLimit
from fusesoup.models import (SPECIAL_TOKENS_PER_SEQUENCE, UNSAFE_WEIGHTS, ModelError, check_safetensors, context_length,
                             is_unsafe_weights, load_from)
from fusesoup.params import HubRef, ModelRef, Params
from fusesoup.storage import atomic_dir, write_json
from fusesoup.token_bytes import text_token_bytes, token_bytes

PIN_FILE = "pin.json"
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


def source_dir(name: str, ref: ModelRef) -> Path:
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
    ids = tokenizer(ROUND_TRIP_PROBE, add_special_tokens=False).input_ids
    try:
        text_token_bytes(token_bytes(tokenizer), ids, ROUND_TRIP_PROBE)
    except ValueError as error:
        raise PinError(f"model {name!r}: its tokenizer does not give back the text it encodes ({error}); fusion "
                       "aligns tokens by their bytes, so it needs a tokenizer without a lossy normaliser") from None


def pin_model(name: str, ref: ModelRef, out: Path | str) -> dict:
    """Link `ref`'s files into `out` (atomically: all links and pin.json, or nothing) and return the pin record."""
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


def describe(record: dict) -> str:
    """One line for the stage's log: what was pinned, from where, how big."""
    size = sum(record["files"].values())
    origin = (f"hub {record['id']}@{record['revision']} = commit {record['commit']}" if record["source"] == "hub"
              else f"path {record['path']}")
    return f"pin@{record['name']}: {origin}, {len(record['files'])} files, {size / 2**20:.1f} MiB (linked)"


def _token_counter(tokenizer):
    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    return count_tokens


def external_token_limits(params: Params) -> list[TokenLimit]:
    """A TokenLimit for every path or hub model (tokenizer and config only, read where the model lives, before
    pin@ links it), in params order: prepare_corpus cuts chunks so that they fit every one of them.

    max_tokens leaves room for BOS and EOS. Bootstrap models need none: their tokenizers are trained on the
    corpus and the schema makes their context hold max_chunk_bytes + TOKENS_OVER_BYTES.
    """
    limits = []
    for name, ref in params.models.items():
        location, kwargs = str(source_dir(name, ref)), {"trust_remote_code": ref.trust_remote_code}
        tokenizer = load_from("tokenizer", AutoTokenizer, name, location, kwargs)
        config = load_from("config", AutoConfig, name, location, kwargs)
        max_tokens = context_length(config) - SPECIAL_TOKENS_PER_SEQUENCE
        if max_tokens <= 0:
            raise ModelError(f"model {name!r}: context length {max_tokens + SPECIAL_TOKENS_PER_SEQUENCE} "
                             "leaves no room for text; give a model with a longer context")
        limits.append(TokenLimit(model=name, count_tokens=_token_counter(tokenizer), max_tokens=max_tokens))
    return limits
