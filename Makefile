# Ferry: `make demo` runs the main job on the embedded default, `make test` runs the tests.
# Both set everything up themselves (virtualenv in .venv, pip, npm ci, Debian tools).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
CONTROLLER := .venv-controller
ANSIBLE := ANSIBLE_CONFIG=$(CURDIR)/ansible.cfg PATH=$(CURDIR)/$(CONTROLLER)/bin:$$PATH

.PHONY: setup lock controller-azure demo-direct test lint demo portal lab bench bench-quick bench-deps bench-replication bench-journal cutover-figures bench-scale bench-soak faults faults-quick faults-soak clean system-deps

setup: $(VENV)/.stamp $(CONTROLLER)/.stamp node_modules/.stamp system-deps

# The Ansible controller has its own virtualenv: azure.azcollection pins old Azure SDKs.
$(CONTROLLER)/.stamp: requirements/controller.txt
	test -x $(CONTROLLER)/bin/python || $(PYTHON) -m venv $(CONTROLLER)
	$(CONTROLLER)/bin/pip install -q --disable-pip-version-check -r requirements/controller.txt
	touch $@

# The azure provider's extras (the deploy job only).
controller-azure: $(CONTROLLER)/.stamp
	$(CONTROLLER)/bin/pip install -q --disable-pip-version-check -r requirements-controller-azure.txt

$(VENV)/.stamp: requirements/dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

# The lock files: one per extra of pyproject.toml, pinned by pip-compile.  Existing pins are
# kept; `make lock LOCK_ARGS=--upgrade` (or `-P name`) moves them.  Ferry itself (dev names
# it for every part) stays out of them, as do pip and setuptools.
EXTRAS := agent process-server master-target config-server cli controller dev portal
LOCK_ARGS ?=
lock: $(VENV)/.stamp
	for extra in $(EXTRAS); do \
	  CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile --quiet --strip-extras \
	    --no-emit-index-url --no-emit-find-links --annotation-style=line $(LOCK_ARGS) \
	    --unsafe-package ferry --unsafe-package pip --unsafe-package setuptools \
	    --extra $$extra -o requirements/$$extra.txt pyproject.toml || exit 1; \
	done

node_modules/.stamp: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Debian tools the tests and demo use (installed only when missing, and only as root).
SYSTEM_TOOLS := mkfs.ext4:e2fsprogs e2fsck:e2fsprogs fsfreeze:util-linux losetup:mount qemu-img:qemu-utils \
  chromium:chromium \
  qemu-system-x86_64:qemu-system-x86 debootstrap:debootstrap sfdisk:fdisk ssh:openssh-client socat:socat \
  guestfish:libguestfs-tools
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
	$(ANSIBLE) $(CONTROLLER)/bin/yamllint -s roles playbooks inventory meta galaxy.yml .github .yamllint .ansible-lint
	$(ANSIBLE) $(CONTROLLER)/bin/ansible-lint --offline

# The lab's tests (pytest -m qemu), then two modules that even out the times, run
# beside the rest (devkit/suite.py); PYTEST_ARGS runs one session of your own.
test: setup lint
	$(PY) -m devkit.suite $(PYTEST_ARGS)

demo: setup
	$(ANSIBLE) $(CONTROLLER)/bin/ansible-playbook playbooks/demo.yml

# The portal on the embedded default: Azurite, the configuration server and the portal;
# prints the URL (the operator token is in run/portal/demo.token). Ctrl-C stops it all.
portal: setup
	$(PY) -m devkit.portal

# The same main job without Ansible: the daemons straight from devkit/embedded.py.
demo-direct: setup
	$(PY) -m devkit.demo

# The lab (docs/lab.md): build or reuse the cached Debian 12 image, boot it under QEMU, run
# the lab tests (pytest -m qemu) against it, power it off and print the figures.
# LAB_ARGS=--keep leaves the guest up and prints how to SSH in (`python -m lab down` stops it).
LAB_ARGS ?=
lab: setup
	$(PY) -m lab test $(LAB_ARGS)

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

# The recovery journal's cost (RPO, master target CPU, memory, disk at 5, 10 and 20 MB/s,
# journal on against off) and the time to materialise a point an hour old; needs root,
# about 8 minutes. Figures in docs/performance.md ("Recovery journal").
bench-journal: setup bench-deps
	$(PY) -m bench.journal $(BENCH_ARGS)

# How the initial sync's cost grows (bench/scaling.py): 1, 2, 4 and 8 GiB images, time, CPU s
# per GiB and peak memory per daemon on one chart. Root; about 15 minutes the first time (it
# makes the images), SCALE_ARGS="--sizes 1,2" for less.
SCALE_ARGS ?=
bench-scale: setup bench-deps
	$(PY) -m bench.scaling $(SCALE_ARGS)

# Random writes at 20 MB/s for 30 minutes (bench/soak.py): RPO p99 per 5-minute window and each
# daemon's memory over time. Root; SOAK_ARGS="--minutes 6 --window-minutes 1" for a short run.
SOAK_ARGS ?=
bench-soak: setup bench-deps
	$(PY) -m bench.soak $(SOAK_ARGS)

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

# Cutover and test failover figures on the lab machine (docs/lab.md): root, QEMU, about
# half an hour under TCG; writes bench/results/cutover-lab.json.
cutover-figures: setup
	$(PY) -m bench.cutover_lab

# Issue #10's fault campaign (bench/faults.py): kills (also at each named step of an
# apply), storage outages, network faults before the process server and before storage,
# mangled frames and notices, clock skew, on the embedded default, each ending
# byte-identical; writes docs/reliability.md. Root, about 50 minutes; `make faults-quick`
# is a few. FAULTS_ARGS passes options (`--only ps-kill agent-kill`, `--seed N`; see
# `.venv/bin/python -m bench.faults --help`).
FAULTS_ARGS ?=
faults: setup
	$(PY) -m bench.faults $(FAULTS_ARGS)

faults-quick: setup
	$(PY) -m bench.faults --quick $(FAULTS_ARGS)

# The mixed soak: every fault of the campaign at random on one deployment for SOAK_MINUTES;
# writes only its own section of docs/reliability.md.
SOAK_MINUTES ?= 10
faults-soak: setup
	$(PY) -m bench.faults --only soak --soak-minutes $(SOAK_MINUTES) $(FAULTS_ARGS)
