# Ferry: `make demo` runs the main job on the embedded default, `make test` runs the tests.
# Both set everything up themselves (virtualenv in .venv, pip, npm ci, Debian tools).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test lint demo bench bench-quick bench-deps bench-replication clean system-deps

setup: $(VENV)/.stamp node_modules/.stamp system-deps

$(VENV)/.stamp: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

node_modules/.stamp: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Debian tools the tests and demo use (installed only when missing, and only as root).
SYSTEM_TOOLS := mkfs.ext4:e2fsprogs e2fsck:e2fsprogs fsfreeze:util-linux losetup:mount
system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  tool=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$tool >/dev/null 2>&1 || PATH=$$PATH:/usr/sbin:/sbin command -v $$tool >/dev/null 2>&1 \
	    || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing (install them as root)"; fi; \
	fi

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m ferry.demo

clean:
	rm -rf $(VENV) node_modules run .pytest_cache

# Benchmarks against cp, rsync, casync and rdiff (docs/performance.md); needs root, about
# 20 minutes. Writes bench/results/<date>-<host>.{json,md} and charts, and refreshes the
# figures in docs/performance.md. `make bench-quick` is a 3-minute run to iterate with;
# BENCH_ARGS passes options (see `.venv/bin/python -m bench.replication --help`).
BENCH_ARGS ?=
BENCH_TOOLS := fio:fio rsync:rsync casync:casync rdiff:rdiff
bench: setup bench-deps
	$(PY) -m bench.replication $(BENCH_ARGS)

bench-quick: setup bench-deps
	$(PY) -m bench.replication --quick $(BENCH_ARGS)

bench-replication: bench

bench-deps: $(VENV)/.bench-stamp
	@missing=""; for pair in $(BENCH_TOOLS); do \
	  tool=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$tool >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing (run make bench as root)"; exit 1; fi; \
	fi

$(VENV)/.bench-stamp: bench/requirements.txt $(VENV)/.stamp
	$(PY) -m pip install -q --disable-pip-version-check -r bench/requirements.txt
	touch $@
