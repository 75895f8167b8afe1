# The README's commands. Each target first creates or refreshes .venv (fast when up to date).
VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.foldtron-installed
NPROC   ?= 8
# The parallel layout of `make train` (dp is inferred: 8 ranks / (tp 2 x pp 2) = dp 2). With NPROC=1 use LAYOUT=.
LAYOUT  ?= parallel.tp=2 parallel.sequence_parallel=true parallel.pp=2 data.micro_batch_size=3
ARGS    ?=
PYTEST_ARGS ?=

.PHONY: setup train test test-fast bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_env.sh
	@scripts/setup_env.sh

train: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc-per-node=$(NPROC) launch/train.py +experiment=quickstart $(LAYOUT) $(ARGS)

# Every test in tests/ (unit, multirank, e2e, Triton interpreter): what CI runs.
test: $(STAMP)
	$(PYTHON) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

# Local iteration only, never CI: skips the torchrun end-to-end runs and the Triton interpreter tests.
test-fast: $(STAMP)
	$(PYTHON) -m pytest -q -n 2 --dist loadgroup -m "not e2e and not triton_interpret" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PYTHON) bench/overhead.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .cache runs outputs
