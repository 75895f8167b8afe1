# The README's commands. Each target first creates or refreshes .venv (fast when up to date).
VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.foldtron-installed
NPROC   ?= 1
ARGS    ?=
PYTEST_ARGS ?=

.PHONY: setup train test test-all bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_env.sh
	@scripts/setup_env.sh

train: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc-per-node=$(NPROC) launch/train.py +experiment=quickstart $(ARGS)

test: $(STAMP)
	$(PYTHON) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

bench: $(STAMP)
	$(PYTHON) bench/overhead.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .cache runs outputs
