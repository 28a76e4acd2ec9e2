# filch: build, test and run on one machine (Debian 12; `make deps` wants root).
#
#   make test      everything CI runs: system packages, venv, lint, the whole test suite
#   make run       a 3-node local cluster under supervisord, in the foreground (Ctrl-C stops it);
#                  installs only what running needs (no test or dev toolchain)
#   make image     the node image localhost/filch-node (podman/buildah; see images/README.md)
#   make bench     filch vs tuned Slurm vs this machine's ceilings (see bench/README.md)
#   make soak      the nemesis soak: random overlapping faults under a mixed workload, every
#                  invariant checked (SEED=N MINUTES=M; default a random seed, 10 minutes)
#   make bench-scale  fill one cluster to SCALE_N (1,000,000) pending, measuring on the way
#   make lint      ruff + mypy --strict + lint-imports (the package layers of node/)
#   make proto     regenerate node/_gen/ from proto/ (commit the result)
#   make clean     remove run/ state and caches (distclean: the venv too)

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
# Rebuilt only when pyproject.toml changes (or the venv is gone): the package with its dev
# and test extras, or (`make run`) the package alone.
VENV_STAMP := $(VENV)/.installed
RUN_VENV_STAMP := $(VENV)/.installed-run

# Debian packages as command=package. The command is checked first, so `make deps` costs
# nothing on a machine that has them all. Running a node needs these ...
RUN_DEPS := etcd=etcd-server etcdctl=etcd-client runc=runc supervisord=supervisor ip=iproute2 \
	nft=nftables mkfs.ext4=e2fsprogs
# ... the tests, the image and the benchmark these as well.
TEST_DEPS := promtool=prometheus openssl=openssl podman=podman buildah=buildah \
	debootstrap=debootstrap chromium=chromium chromedriver=chromium-driver \
	iptables=iptables gcc=gcc

.PHONY: help deps run-deps install-deps venv run-venv proto check-proto lint test run image bench \
	bench-scale clean \
	distclean

help:
	@sed -n 's/^#   //p' $(MAKEFILE_LIST)

deps:
	@$(MAKE) -s install-deps PAIRS="$(RUN_DEPS) $(TEST_DEPS)"

run-deps:
	@$(MAKE) -s install-deps PAIRS="$(RUN_DEPS)"

install-deps:
	@missing=""; \
	for pair in $(PAIRS); do \
	  command -v "$${pair%%=*}" >/dev/null || missing="$$missing $${pair#*=}"; \
	done; \
	$(PYTHON) -m ensurepip --version >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "missing Debian packages:$$missing; run this make target as root" >&2; exit 1; \
	fi; \
	echo "installing$$missing"; \
	export DEBIAN_FRONTEND=noninteractive; \
	if ! find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -60 | grep -q .; then \
	  apt-get update -qq; \
	fi; \
	apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	if [[ -d /run/systemd/system ]]; then \
	  echo "disabling Debian's etcd and prometheus services: filch runs its own"; \
	  systemctl disable --now etcd.service prometheus.service >/dev/null 2>&1 || true; \
	fi

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@ $(RUN_VENV_STAMP)

run-venv: $(RUN_VENV_STAMP)

# The package and its runtime dependencies only (a dev venv has them too: its target
# touches this stamp).
$(RUN_VENV_STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e .
	touch $@

proto: venv
	PYTHON=$(VENV)/bin/python scripts/gen_proto.sh

# The same check tests/unit/test_generated.py makes, with a readable diff.
check-proto: venv
	@out=$$(mktemp -d); trap 'rm -rf "$$out"' EXIT; \
	log=$$(PYTHON=$(VENV)/bin/python scripts/gen_proto.sh "$$out" 2>&1) || { echo "$$log" >&2; exit 1; }; \
	diff -ru -x __pycache__ "$$out" node/_gen \
	  && echo "node/_gen/ matches proto/" \
	  || { echo "node/_gen/ is stale: run 'make proto' and commit it" >&2; exit 1; }

lint: venv
	$(VENV)/bin/ruff check node tests soak bench
	$(VENV)/bin/mypy --strict node
	$(VENV)/bin/lint-imports

# pytest runs last, so its summary line is the last thing `make test` prints.
test: deps venv lint
	$(VENV)/bin/pytest tests -q -ra --durations=15

run: run-deps run-venv
	scripts/run-local.sh

image: deps venv
	images/build.sh

bench: deps venv
	$(VENV)/bin/python -m bench.run

# Issue 18's million: measured at 1,000, SCALE_N/10 and SCALE_N pending during one fill
# (bench/README.md, "A million queued"). SCALE_TIME bounds the fill (seconds; what it
# reached is measured), and the whole run is stopped 30 minutes after it. SCALE_QUOTA is
# the agents' --etcd-quota-bytes.
SCALE_N ?= 1000000
SCALE_TIME ?= 10800
SCALE_QUOTA ?= 8589934592
bench-scale: deps venv
	timeout --signal=TERM $$(( $(SCALE_TIME) + 1800 )) $(VENV)/bin/python -m bench.scale \
	  --n $(SCALE_N) --time-bound $(SCALE_TIME) --quota $(SCALE_QUOTA)

# The nemesis soak (soak/run.py): writes soak/results/<date>-<seed>.json and ends with
# `soak: seed N, T tasks, A attempts, F faults, V violations`; fails unless V is 0.
SEED ?=
MINUTES ?= 10
.PHONY: soak
soak: deps venv
	$(VENV)/bin/python -m soak.run $(if $(SEED),--seed $(SEED)) --minutes $(MINUTES)

clean:
	@if [ -f run/supervisord.pid ] && kill -0 "$$(cat run/supervisord.pid)" 2>/dev/null; then \
	  echo "the local cluster (make run) is still running; stop it first" >&2; exit 1; \
	fi
	rm -rf run build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
