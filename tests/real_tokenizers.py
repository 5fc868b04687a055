"""Real third-party tokenizers, from files that ship inside packages on PyPI (pinned by hash), for the tests.

- Mistral-7B-v0.1's SentencePiece model (`tokenizer.model.v1` in mistral-common): Llama-2's scheme, 32000 pieces,
  byte fallback, a word-start `▁` prepended to the text;
- GPT-2's byte-level BPE ranks (`gpt2.tiktoken` in openai-whisper): 50257 tokens, BOS == EOS == <|endoftext|>,
  no model_max_length (transformers writes 1e30).

`make test` fetches them once into .venv/tokenizer-files (`python -m tests.real_tokenizers DIR`: pip download,
no dependencies installed, hashes required); the tests read them from there, or from $FUSESOUP_TOKENIZER_FILES.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest
from transformers import LlamaTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

# (requirement with its hash, the file inside the downloaded archive, the name it is kept under)
FILES = [
    ("mistral-common==1.13.1 --hash=sha256:98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af",
     "mistral_common/data/tokenizer.model.v1", "mistral-7b-v0.1.model"),
    ("openai-whisper==20250625 --hash=sha256:37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96",
     "openai_whisper-20250625/whisper/assets/gpt2.tiktoken", "gpt2.tiktoken"),
]
DEFAULT_DIR = Path(__file__).resolve().parents[1] / ".venv/tokenizer-files"
# GPT-2's pre-tokenizer (tiktoken's r50k_base pattern)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"


def files_dir() -> Path:
    """Where the fetched files are; fails the test in one line if they are not there."""
    directory = Path(os.environ.get("FUSESOUP_TOKENIZER_FILES", DEFAULT_DIR))
    missing = [name for _, _, name in FILES if not (directory / name).is_file()]
    if missing:
        pytest.fail(f"{directory}: no {', '.join(missing)}; run `make test`, or python -m tests.real_tokenizers "
                    f"{directory}", pytrace=False)
    return directory


def mistral_tokenizer(into: Path) -> LlamaTokenizer:
    """Mistral-7B-v0.1's tokenizer, as a checkpoint that ships only tokenizer.model loads it (converted to fast)."""
    into.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(files_dir() / "mistral-7b-v0.1.model", into / "tokenizer.model")
    return LlamaTokenizer.from_pretrained(into)


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's tokenizer, built by transformers' own tiktoken converter from the ranks file."""
    backend = TikTokenConverter(vocab_file=str(files_dir() / "gpt2.tiktoken"), pattern=GPT2_PATTERN,
                                extra_special_tokens=[ENDOFTEXT]).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT,
                                   unk_token=ENDOFTEXT)


def fetch(directory: Path, files: list[tuple[str, str, str]] = FILES) -> None:
    """Download the pinned archives (hash-checked, nothing installed) and keep the files `files` names."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        requirements = Path(scratch) / "requirements.txt"
        requirements.write_text("".join(f"{requirement}\n" for requirement, _, _ in files))
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--require-hashes", "-r", str(requirements), "-d", scratch], check=True)
        for archive in sorted(Path(scratch).iterdir()):
            for _, member, name in files:
                data = _read_member(archive, member)
                if data is not None:
                    partial = directory / f".{name}.partial"
                    partial.write_bytes(data)
                    partial.replace(directory / name)


def _read_member(archive: Path, member: str) -> bytes | None:
    """The bytes of `member` in a wheel or sdist, None if it is not there."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel:
            return wheel.read(member) if member in wheel.namelist() else None
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as sdist:
            try:
                return sdist.extractfile(member).read()
            except KeyError:
                return None
    return None


if __name__ == "__main__":
    fetch(Path(sys.argv[1]))
