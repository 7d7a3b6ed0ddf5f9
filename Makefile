# pihub — `make help` lists the targets; `make test` is what CI runs.
SHELL := /bin/bash
PYTHON ?= python3
PYTEST ?= $(PYTHON) -m pytest

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

.PHONY: dev
dev: ## Install the test tools and the pihub package (editable) into the current Python
	$(PYTHON) -m pip install -r requirements-dev.txt
	$(PYTHON) -m pip install -e 'files/daemons[tsdb,web]'

.PHONY: test
test: ## Run every test: unit tests, linters, then Molecule (in that order)
	$(MAKE) test-unit
	$(MAKE) lint
	$(MAKE) molecule

.PHONY: test-all
test-all: test ## Every proof, the heavy ones too (arm64, fleet, upgrade, image boot will go here; today: make test)

.PHONY: test-unit
test-unit: ## Python tests of the daemons against a real Mosquitto (and friends)
	$(PYTEST) tests

.PHONY: lint-python
lint-python: ## ruff and mypy on the pihub package
	$(PYTHON) -m ruff check files/daemons tests bench testkit
	$(PYTHON) -m mypy files/daemons/src

.PHONY: lint
lint: lint-python lint-ansible ## Every linter

.PHONY: bench
bench: bench-venv ## Idle memory and time-to-READY of every daemon, as deployed (figures in README)
	$(PYTHON) bench/daemon_footprint.py --python $(BENCH_VENV)/bin/python

# The daemons as the Pi runs them: a venv on Debian's python3 with pihub installed (not editable).
BENCH_VENV ?= .cache/bench-venv
.PHONY: bench-venv
bench-venv:
	test -x $(BENCH_VENV)/bin/python || /usr/bin/python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade './files/daemons[tsdb,web]'

# --- Provisioning (roles/, playbooks/, molecule/, images/standin/) --------------------------
STANDIN_IMAGE ?= pihub-standin:bookworm
export PIHUB_STANDIN_IMAGE := $(STANDIN_IMAGE)

.PHONY: lint-ansible
lint-ansible: ## ansible-lint (production profile) and yamllint on roles, playbooks, inventory, Molecule
	yamllint --strict .
	ansible-lint --profile production

.PHONY: image
image: ## Build the stand-in Pi image (debootstrap, cached by the build script's hash)
	images/standin/build.sh $(STANDIN_IMAGE)

# Molecule installs this copy of files/daemons, taken once at the start, so that converge,
# idempotence and verify see the same code while the working tree is being edited.
MOLECULE_PACKAGE_SOURCE ?= .cache/molecule-package-source
.PHONY: molecule
molecule: image ## Molecule: create, converge, idempotence, verify, destroy on the stand-in
	rm -rf $(MOLECULE_PACKAGE_SOURCE) && mkdir -p $(MOLECULE_PACKAGE_SOURCE)
	tar -C files/daemons --exclude=__pycache__ --exclude=*.egg-info --exclude=build \
	  --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.pytest_cache -cf - . \
	  | tar -C $(MOLECULE_PACKAGE_SOURCE) -xf -
	PIHUB_MOLECULE_PACKAGE_SOURCE=$(abspath $(MOLECULE_PACKAGE_SOURCE)) molecule test

.PHONY: demo
demo: ## Stand-in Pi provisioned by playbooks/site.yml, then 60 s of live heartbeats
	images/standin/demo.sh
