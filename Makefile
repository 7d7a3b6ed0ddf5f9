# pihub — `make help` lists the targets; `make test` is what CI runs.
# `make demo` and `make test` do their own set-up (scripts/setup.sh: apt packages, the project's
# .venv with every Python tool, dockerd); the other targets use that .venv.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
PYTEST ?= $(PYTHON) -m pytest
# Ansible, Molecule, ansible-lint, yamllint: the venv's, never the system's.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

.PHONY: setup
setup: ## Install what the tests need (apt, .venv, dockerd); fast when done (scripts/setup.sh)
	scripts/setup.sh test

# Targets that need the venv make it when it is missing; `make setup` refreshes it.
$(PYTHON):
	scripts/setup.sh test

.PHONY: test
test: setup ## Set up, then every test: unit tests, linters, the fresh-machine set-up, Molecule
	$(MAKE) test-unit
	$(MAKE) lint
	$(MAKE) test-fresh-machine
	$(MAKE) molecule
	$(MAKE) molecule-fleet
	$(MAKE) molecule-raspberrypi

.PHONY: test-all
test-all: test test-homeassistant test-image-pi molecule-backup molecule-upgrade molecule-arm64 ## Every proof, the heavy ones too: make test, then a real Home Assistant, the Pi image booted in qemu, backup → restore onto a second stand-in, an upgrade in place, the stack on an emulated arm64 stand-in

.PHONY: test-homeassistant
test-homeassistant: $(PYTHON) ## A real Home Assistant core (its own venv) reads pihub's entities back
	tests/homeassistant_real/install.sh
	HA_PYTHON=/var/tmp/pihub-homeassistant/venv/bin/python $(PYTEST) tests/homeassistant_real/real_homeassistant.py -v

TESTS ?= tests
.PHONY: test-unit
test-unit: $(PYTHON) ## Python tests of the daemons against a real Mosquitto (and friends)
	$(PYTEST) $(TESTS)

.PHONY: test-fresh-machine
test-fresh-machine: ## scripts/setup.sh in a fresh Debian 12 container (git, make, python3 only); 2nd run a no-op
	tests/fresh_machine/run.sh

.PHONY: lint-python
lint-python: $(PYTHON) ## ruff and mypy on the pihub package
	$(PYTHON) -m ruff check files/daemons tests bench testkit scripts
	$(PYTHON) -m mypy files/daemons/src

.PHONY: lint
lint: lint-python lint-ansible ## Every linter

.PHONY: bench
bench: $(PYTHON) bench-venv ## Idle memory and time-to-READY of every daemon, and the whole stack's memory, as deployed (figures in README)
	$(PYTHON) bench/daemon_footprint.py --python $(BENCH_VENV)/bin/python --save
	$(PYTHON) bench/stack_memory.py --python $(BENCH_VENV)/bin/python --save deployed
	$(PYTHON) bench/figures.py --write

# The daemons as the Pi runs them: a venv on Debian's python3 with pihub installed (not editable).
BENCH_VENV ?= .cache/bench-venv
.PHONY: bench-venv
bench-venv:
	test -x $(BENCH_VENV)/bin/python || /usr/bin/python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade './files/daemons[tsdb,web]'

# --- Provisioning (roles/, playbooks/, molecule/, images/standin/) --------------------------
STANDIN_IMAGE ?= pihub-standin:bookworm
export PIHUB_STANDIN_IMAGE := $(STANDIN_IMAGE)
# Molecule's second stand-in: Debian 13 (trixie), as Raspberry Pi OS trixie
STANDIN_TRIXIE_IMAGE ?= pihub-standin:trixie
export PIHUB_STANDIN_TRIXIE_IMAGE := $(STANDIN_TRIXIE_IMAGE)

.PHONY: lint-ansible
lint-ansible: $(PYTHON) ## ansible-lint (production profile) and yamllint on roles, playbooks, inventory, Molecule
	yamllint --strict .
	ansible-lint --profile production

.PHONY: image
image: ## Build the stand-in Pi image (debootstrap, cached by the build script's hash)
	images/standin/build.sh $(STANDIN_IMAGE)
	images/standin/build.sh $(STANDIN_TRIXIE_IMAGE)

# The raspberrypi role's real tasks on two stand-ins that pretend to be a Pi 5 and a Pi 3
# (molecule/raspberrypi/: a fake board model and Raspberry Pi OS's boot files).
.PHONY: molecule-raspberrypi
molecule-raspberrypi: $(PYTHON) image ## Molecule: the raspberrypi role on a pretend Pi 5 and Pi 3 (overlays, GPIO, reboot flag)
	molecule test -s raspberrypi

# Molecule installs this copy of files/daemons, taken once at the start, so that converge,
# idempotence and verify see the same code while the working tree is being edited.
MOLECULE_PACKAGE_SOURCE ?= .cache/molecule-package-source
.PHONY: molecule
molecule: $(PYTHON) image ## Molecule: create, converge, idempotence, verify, destroy on the stand-in
	rm -rf $(MOLECULE_PACKAGE_SOURCE) && mkdir -p $(MOLECULE_PACKAGE_SOURCE)
	tar -C files/daemons --exclude=__pycache__ --exclude=*.egg-info --exclude=build \
	  --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.pytest_cache -cf - . \
	  | tar -C $(MOLECULE_PACKAGE_SOURCE) -xf -
	PIHUB_MOLECULE_PACKAGE_SOURCE=$(abspath $(MOLECULE_PACKAGE_SOURCE)) molecule test

# The fleet (issue 19): a central and two satellite stand-ins, bridged over TLS, on a private
# Docker network (molecule/fleet/); its own copy of files/daemons, as above.
MOLECULE_FLEET_PACKAGE_SOURCE ?= .cache/molecule-fleet-package-source
.PHONY: molecule-fleet
molecule-fleet: $(PYTHON) image ## Molecule fleet: a central and two satellites bridged over TLS; link cut, ACL, monitor
	rm -rf $(MOLECULE_FLEET_PACKAGE_SOURCE) && mkdir -p $(MOLECULE_FLEET_PACKAGE_SOURCE)
	tar -C files/daemons --exclude=__pycache__ --exclude=*.egg-info --exclude=build \
	  --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.pytest_cache -cf - . \
	  | tar -C $(MOLECULE_FLEET_PACKAGE_SOURCE) -xf -
	PIHUB_MOLECULE_PACKAGE_SOURCE=$(abspath $(MOLECULE_FLEET_PACKAGE_SOURCE)) molecule test -s fleet

# The full stack on an arm64 stand-in (issue 18): pihub-standin:bookworm-arm64, built by foreign
# debootstrap and run under qemu-user-static (binfmt_misc); converge, then default's checks of the
# services, heartbeats and a stored measurement (molecule/arm64/); its own copy of files/daemons.
STANDIN_ARM64_IMAGE ?= pihub-standin:bookworm-arm64
export PIHUB_STANDIN_ARM64_IMAGE := $(STANDIN_ARM64_IMAGE)
MOLECULE_ARM64_PACKAGE_SOURCE ?= .cache/molecule-arm64-package-source
.PHONY: molecule-arm64
molecule-arm64: $(PYTHON) ## Molecule arm64: the full stack converged on an emulated arm64 stand-in, heartbeats, a stored measurement
	scripts/setup.sh image
	images/standin/build.sh $(STANDIN_ARM64_IMAGE)
	rm -rf $(MOLECULE_ARM64_PACKAGE_SOURCE) && mkdir -p $(MOLECULE_ARM64_PACKAGE_SOURCE)
	tar -C files/daemons --exclude=__pycache__ --exclude=*.egg-info --exclude=build \
	  --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.pytest_cache -cf - . \
	  | tar -C $(MOLECULE_ARM64_PACKAGE_SOURCE) -xf -
	PIHUB_MOLECULE_PACKAGE_SOURCE=$(abspath $(MOLECULE_ARM64_PACKAGE_SOURCE)) molecule test -s arm64

# Backup and restore (issue 18): two stand-ins, data written on A, backed up with
# playbooks/backup.yml, restored onto B with playbooks/restore.yml, compared (molecule/backup/);
# its own copy of files/daemons, as above.
MOLECULE_BACKUP_PACKAGE_SOURCE ?= .cache/molecule-backup-package-source
.PHONY: molecule-backup
molecule-backup: $(PYTHON) image ## Molecule backup: data on stand-in A, backup.yml, restore.yml onto B, the same points and RRD rows on both
	rm -rf $(MOLECULE_BACKUP_PACKAGE_SOURCE) && mkdir -p $(MOLECULE_BACKUP_PACKAGE_SOURCE)
	tar -C files/daemons --exclude=__pycache__ --exclude=*.egg-info --exclude=build \
	  --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.pytest_cache -cf - . \
	  | tar -C $(MOLECULE_BACKUP_PACKAGE_SOURCE) -xf -
	PIHUB_MOLECULE_PACKAGE_SOURCE=$(abspath $(MOLECULE_BACKUP_PACKAGE_SOURCE)) molecule test -s backup

# Upgrade in place (issue 18): the stand-in provisioned by an older release of this repository,
# git ref UPGRADE_FROM (its playbooks, roles, example inventory and files/daemons, unpacked with
# git archive into MOLECULE_UPGRADE_FROM_DIR), measurements flowing, then converged by this tree
# and its own copy of files/daemons, as above (molecule/upgrade/). The default ref is the release
# whose make test ran make molecule-fleet first (052f804); UPGRADE_FROM=<ref> tries another.
UPGRADE_FROM ?= 052f80470500a74f16060d0576b45f99374dcb44
# The roles the upgrade converges with: this tree's (another copy to watch verify fail).
UPGRADE_ROLES ?= roles
MOLECULE_UPGRADE_FROM_DIR ?= .cache/molecule-upgrade-from
MOLECULE_UPGRADE_PACKAGE_SOURCE ?= .cache/molecule-upgrade-package-source
.PHONY: molecule-upgrade
molecule-upgrade: $(PYTHON) image ## Molecule upgrade: an older release (UPGRADE_FROM) converged, data flowing, this tree converged over it
	rm -rf $(MOLECULE_UPGRADE_FROM_DIR) && mkdir -p $(MOLECULE_UPGRADE_FROM_DIR)
	git archive --format=tar $(UPGRADE_FROM) | tar -C $(MOLECULE_UPGRADE_FROM_DIR) -xf -
	rm -rf $(MOLECULE_UPGRADE_PACKAGE_SOURCE) && mkdir -p $(MOLECULE_UPGRADE_PACKAGE_SOURCE)
	tar -C files/daemons --exclude=__pycache__ --exclude=*.egg-info --exclude=build \
	  --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.pytest_cache -cf - . \
	  | tar -C $(MOLECULE_UPGRADE_PACKAGE_SOURCE) -xf -
	PIHUB_UPGRADE_FROM=$(UPGRADE_FROM) PIHUB_UPGRADE_FROM_DIR=$(abspath $(MOLECULE_UPGRADE_FROM_DIR)) \
	  PIHUB_UPGRADE_ROLES=$(abspath $(UPGRADE_ROLES)) \
	  PIHUB_MOLECULE_PACKAGE_SOURCE=$(abspath $(MOLECULE_UPGRADE_PACKAGE_SOURCE)) molecule test -s upgrade

# --- The Pi image (issue 20; docs/image.md) ---------------------------------------------------
# A flashable SD card image made by playbooks/site.yml through the chroot connection; stages
# cached under /var/cache/pihub/image by content (a second build takes minutes). Needs root.
.PHONY: image-pi
image-pi: ## Build build/pihub-<version>-arm64.img.xz: Debian 12, its kernel and Pi firmware, provisioned by site.yml (chroot)
	scripts/setup.sh image
	images/pi/build.sh build

.PHONY: test-image-pi
test-image-pi: image-pi ## Boot the image in qemu-system-aarch64: first boot, every daemon's heartbeat, the play over SSH changes nothing
	$(PYTHON) images/pi/boot_test.py --save

# --- Your Pi ------------------------------------------------------------------------------
# make inventory NAME=home HOST=192.168.1.20 [SSH_USER=pi], then make pi-check / make pi.
SSH_USER ?= pi
INVENTORY ?= inventory/$(NAME)
VAULT_PASS ?= $(HOME)/.config/pihub/$(notdir $(INVENTORY)).vault-pass
PLAY = ansible-playbook -i $(INVENTORY) playbooks/site.yml --vault-password-file $(VAULT_PASS)

.PHONY: inventory
inventory: ## New inventory/NAME for the Pi at HOST, with a generated, encrypted vault
	@test -n "$(NAME)" -a -n "$(HOST)" || { echo "usage: make inventory NAME=home HOST=192.168.1.20 [SSH_USER=pi]" >&2; exit 64; }
	scripts/setup.sh pi
	$(PYTHON) scripts/new_inventory.py $(INVENTORY) $(HOST) --user $(SSH_USER)

.PHONY: pi-check
pi-check: ## Dry run on your Pi: what make pi would change (--check --diff), INVENTORY=inventory/NAME
	@test -f $(INVENTORY)/hosts.yml || { echo "no $(INVENTORY)/hosts.yml: make inventory NAME=... HOST=... first" >&2; exit 64; }
	scripts/setup.sh pi
	$(PLAY) --check --diff

.PHONY: pi
pi: ## Provision your Pi with playbooks/site.yml, INVENTORY=inventory/NAME
	@test -f $(INVENTORY)/hosts.yml || { echo "no $(INVENTORY)/hosts.yml: make inventory NAME=... HOST=... first" >&2; exit 64; }
	scripts/setup.sh pi
	$(PLAY)

# Backup and restore (docs/provisioning.md, "Backup and restore"): archives land in
# $(INVENTORY)/backups/<host>/ (gitignored); make restore ARCHIVE=<one of them> [HOST=<host>].
.PHONY: backup
backup: ## Back up every hub of INVENTORY to INVENTORY/backups/<host>/ (data keeps flowing)
	@test -f $(INVENTORY)/hosts.yml || { echo "no $(INVENTORY)/hosts.yml: make backup INVENTORY=inventory/NAME" >&2; exit 64; }
	ansible-playbook -i $(INVENTORY) playbooks/backup.yml --vault-password-file $(VAULT_PASS)

.PHONY: restore
restore: ## Restore ARCHIVE onto a hub of INVENTORY provisioned with make pi (HOST= when it has several)
	@test -f $(INVENTORY)/hosts.yml -a -n "$(ARCHIVE)" || { echo "usage: make restore INVENTORY=inventory/NAME ARCHIVE=inventory/NAME/backups/<host>/pihub-....tar.gz [HOST=<host>]" >&2; exit 64; }
	ansible-playbook -i $(INVENTORY) playbooks/restore.yml --vault-password-file $(VAULT_PASS) \
	  -e pihub_restore_archive=$(abspath $(ARCHIVE)) $(if $(HOST),-l $(HOST))

.PHONY: demo
demo: ## Set up, then the whole hub live in a stand-in Pi container (stays up; stop command printed)
	scripts/setup.sh demo
	images/standin/demo.sh
