# metaformer-platform: install, test, run.   `make install`, then `make test`.
#
# pip (not uv or poetry) in a venv: torch's 2.14.1 CUDA wheel lies on this kind of machine's disk, and pip's
# configuration finds it there. Every install is limited by constraints.txt (the frozen dev venv).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Two pytest processes (pytest-xdist): the tests on the session's Ray cluster run in order in one of them (one
# cluster, see tests/conftest.py), everything else in the other meanwhile. `make test TEST_PROCS=0` runs one.
TEST_PROCS ?= 2
ARGS ?=

# Ray binds the machine's own address even when told 127.0.0.1. Where we may (root, and unshare works here),
# whatever starts Ray runs in a loopback-only network namespace: `$(ISOLATE) cmd args...`. On a workstation
# (not root) it runs directly. Force either way with `make test ISOLATE=` or ISOLATE='...'.
ifndef ISOLATE
ISOLATE := $(shell [ "$$(id -u)" = 0 ] && unshare -n true 2>/dev/null && command -v ip >/dev/null \
	&& echo "unshare -n sh -c 'ip link set lo up && exec \"\$$0\" \"\$$@\"'")
endif

.PHONY: install test test-slow-faults pretrain stack-up stack-down stack-status lint benchmark \
	constraints

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Needs the network (PyPI), so it runs outside the namespace; re-runs when pyproject.toml or constraints.txt
# change. DeepSpeed's setup imports torch: no build isolation; its C++/CUDA ops are built on first use, except
# the one every DeepSpeed job on a CPU machine needs, built here into the jobs' cache (a fresh machine's first
# DeepSpeed job would otherwise compile it for ~40 s).
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install -c constraints.txt --upgrade pip setuptools wheel
	$(PIP) install -c constraints.txt torch torchvision
	$(PIP) install -c constraints.txt -e '.[test]'
	DS_BUILD_OPS=0 $(PIP) install --no-build-isolation -c constraints.txt deepspeed
	$(PY) -c 'from metaformer_platform.strategies.deepspeed import build_ops; build_ops()'
	touch $@

# Exit status 5 is pytest's "no tests ran": a failure here, said plainly.
test: $(STAMP)
	@rc=0; $(ISOLATE) $(PY) -m pytest -n $(TEST_PROCS) --dist loadgroup $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest ran no tests" >&2; fi; exit $$rc

# The fault tests too long for `make test`'s 15 minutes (issue 25): an evaluation stopped by SIGTERM, with the
# pretrain it scores, and a node drained with a deadline (last: it replaces the session's second node). Skipped
# there, run here, and by CI after it.
test-slow-faults: $(STAMP)
	METAFORMER_TEST_SLOW_FAULTS=1 $(ISOLATE) $(PY) -m pytest $(PYTEST_ARGS) tests/integration/test_finetune_evaluate.py \
		tests/integration/test_drain_job.py -k "stopped_by_sigterm or drained_node"

# The embedded default (jobs/configs/default.yaml): synthetic data on a local Ray of its own (RAY_ADDRESS's if set),
# the worker layout left to the hardware (resolve_layout in metaformer_platform/training/hardware.py): one worker
# per GPU, or on a CPU-only machine one worker holding all its CPUs. `make pretrain ARGS='--config ...'`.
pretrain: $(STAMP)
	$(ISOLATE) $(PY) jobs/pretrain.py $(ARGS)

stack-up: $(STAMP)
	PYTHON=$(PY) infra/local/stack.sh up $(ARGS)

stack-down:
	PYTHON=$(PY) infra/local/stack.sh down

stack-status:
	PYTHON=$(PY) infra/local/stack.sh status

# ruff, mypy over platform/metaformer_platform, jobs/ and pipelines/, and the layers contract (lint-imports),
# all configured in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Each benchmark prints ratios measured in one run; nothing is asserted.
benchmark: $(STAMP)
	@set -e; for bench in tests/benchmarks/bench_*.py; do echo "== $$bench"; PYTHONPATH=infra/local $(ISOLATE) $(PY) $$bench $(ARGS); done

# Re-pin constraints.txt to what the venv holds now (after changing pyproject.toml and testing).
constraints: $(STAMP)
	@{ sed -n '/^#/!q;p' constraints.txt; $(PIP) freeze --all --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	touch $(STAMP)
