# Ferry: `make demo` runs the main job on the embedded default, `make test` runs the tests.
# Both set everything up themselves (virtualenv in .venv, pip, npm ci, Debian tools).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
CONTROLLER := .venv-controller
ANSIBLE := ANSIBLE_CONFIG=$(CURDIR)/ansible.cfg PATH=$(CURDIR)/$(CONTROLLER)/bin:$$PATH

.PHONY: setup controller-azure demo-direct test lint demo portal bench bench-quick bench-deps bench-replication faults faults-quick clean system-deps

setup: $(VENV)/.stamp $(CONTROLLER)/.stamp node_modules/.stamp system-deps

# The Ansible controller has its own virtualenv: azure.azcollection pins old Azure SDKs.
$(CONTROLLER)/.stamp: requirements-controller.txt
	test -x $(CONTROLLER)/bin/python || $(PYTHON) -m venv $(CONTROLLER)
	$(CONTROLLER)/bin/pip install -q --disable-pip-version-check -r requirements-controller.txt
	touch $@

# The azure provider's extras (the deploy job only).
controller-azure: $(CONTROLLER)/.stamp
	$(CONTROLLER)/bin/pip install -q --disable-pip-version-check -r requirements-controller-azure.txt

$(VENV)/.stamp: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

node_modules/.stamp: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Debian tools the tests and demo use (installed only when missing, and only as root).
SYSTEM_TOOLS := mkfs.ext4:e2fsprogs e2fsck:e2fsprogs fsfreeze:util-linux losetup:mount qemu-img:qemu-utils \
  chromium:chromium
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
	$(VENV)/bin/mypy
	$(ANSIBLE) $(CONTROLLER)/bin/yamllint -s roles playbooks inventory .github .yamllint .ansible-lint
	$(ANSIBLE) $(CONTROLLER)/bin/ansible-lint --offline

test: setup lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: setup
	$(ANSIBLE) $(CONTROLLER)/bin/ansible-playbook playbooks/demo.yml

# The portal on the embedded default: Azurite, the configuration server and the portal;
# prints the URL (the operator token is in run/portal/demo.token). Ctrl-C stops it all.
portal: setup
	$(PY) -m devkit.portal

# The same main job without Ansible: the daemons straight from devkit/embedded.py.
demo-direct: setup
	$(PY) -m devkit.demo

clean:
	rm -rf $(VENV) $(CONTROLLER) node_modules run .pytest_cache .mypy_cache

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

# Issue #10's fault campaign (bench/faults.py): kills, storage outages and network faults
# on the embedded default, each ending byte-identical; writes docs/reliability.md. Root,
# about 20 minutes; `make faults-quick` is a few. FAULTS_ARGS passes options
# (`--only ps-kill agent-kill`, `--seed N`; see `.venv/bin/python -m bench.faults --help`).
FAULTS_ARGS ?=
faults: setup
	$(PY) -m bench.faults $(FAULTS_ARGS)

faults-quick: setup
	$(PY) -m bench.faults --quick $(FAULTS_ARGS)
