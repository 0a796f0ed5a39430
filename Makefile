# Every target makes .venv itself, so a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SRC := vastd tests bench examples

.PHONY: venv demo test lint typecheck unit sshd bench bench-scale chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/vastd demo

lint: $(STAMP)
	$(BIN)/ruff check $(SRC)
	$(BIN)/ruff format --check $(SRC)

typecheck: $(STAMP)
	$(BIN)/mypy --strict vastd

# The OpenSSH tier needs sshd, an unprivileged test user and a Python it can run.
sshd:
	bash scripts/ensure-test-sshd.sh

unit: $(STAMP)
	$(BIN)/pytest

test: lint typecheck sshd unit

bench: $(STAMP)
	$(BIN)/python bench/run_bench.py
	$(BIN)/python bench/bench_autoscale.py --jobs 1000 --max-instances 16

# Issue 9: a campaign's bookkeeping at scale (no SSH); JOBS=100000 for the full size.
JOBS ?= 20000
INSTANCES ?= 500
bench-scale: $(STAMP)
	$(BIN)/python bench/bench_scale.py --jobs $(JOBS) --instances $(INSTANCES)

# The chaos suite of issue 4 (the full run; `make test` runs the short one).
chaos: $(STAMP)
	bash scripts/ensure-test-sshd.sh
	$(BIN)/python bench/chaos.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
