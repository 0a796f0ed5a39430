# Every target makes .venv itself, so a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUNTIME_STAMP := $(VENV)/.installed-runtime
SRC := vastd tests bench examples
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# `make install DESTDIR=/tmp/stage PREFIX=/opt/vastd`: see scripts/install-service.sh
PREFIX ?= /opt/vastd
DESTDIR ?=

.PHONY: venv demo test lint typecheck unit sshd systemd bench-tools bench bench-scale chaos clean install uninstall

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[test]'
	touch $(STAMP) $(RUNTIME_STAMP)

# The demo needs the runtime dependencies only (not the test tools or the vastai CLI).
$(RUNTIME_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $(RUNTIME_STAMP)

venv: $(STAMP)

demo: $(RUNTIME_STAMP)
	$(BIN)/vastd demo

install:
	bash scripts/install-service.sh --prefix $(PREFIX) $(if $(DESTDIR),--root $(DESTDIR))

uninstall:
	bash scripts/install-service.sh --uninstall --prefix $(PREFIX) $(if $(DESTDIR),--root $(DESTDIR))

lint: $(STAMP)
	$(BIN)/ruff check $(SRC)
	$(BIN)/ruff format --check $(SRC)

typecheck: $(STAMP)
	$(BIN)/mypy --strict vastd

# The OpenSSH tier needs sshd, an unprivileged test user and a Python it can run.
sshd:
	bash scripts/ensure-test-sshd.sh

# The unit's tests need systemd-analyze (verify, security --offline); no running systemd.
systemd:
	bash scripts/ensure-systemd-tools.sh

unit: $(STAMP)
	$(BIN)/pytest

test: lint typecheck sshd systemd unit

# GNU parallel and rsync, the baseline of bench/bench_parallel.py (issue 13).
bench-tools:
	bash scripts/ensure-bench-tools.sh

bench: $(STAMP) bench-tools
	$(BIN)/python bench/run_bench.py
	$(BIN)/python bench/bench_autoscale.py --jobs 1000 --max-instances 16
	$(BIN)/python bench/bench_autoscale.py --jobs 200 --job-s 2 --max-instances 16
	$(BIN)/python bench/bench_autoscale.py --jobs 200 --job-s 2 --max-instances 16 --stage-ahead 1
	$(BIN)/python bench/bench_parallel.py

# Issue 9: a campaign at scale through the real daemon on the simulator: JOBS files
# over INSTANCES instances sharing SSHD SSH servers, dropped BATCH at a time. At about
# 40 jobs/s on 2 cores the full size takes about 40 minutes; JOBS=3000 BATCH=1000 a few
# minutes. BOOKKEEPING=1: the in-process bookkeeping-only run (no daemon, no SSH).
JOBS ?= 100000
INSTANCES ?= 500
SSHD ?= 4
BATCH ?= 10000
bench-scale: $(STAMP)
	$(BIN)/python bench/bench_scale.py --jobs $(JOBS) --instances $(INSTANCES) \
		--sshd $(SSHD) --batch $(BATCH) $(if $(BOOKKEEPING),--bookkeeping)

# The chaos suite of issue 4 (the full run; `make test` runs the short one).
chaos: $(STAMP)
	bash scripts/ensure-test-sshd.sh
	$(BIN)/python bench/chaos.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
