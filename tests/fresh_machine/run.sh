#!/usr/bin/env bash
# `make test-fresh-machine`: the set-up that `make demo` and `make test` share (scripts/setup.sh),
# run in a fresh Debian 12 container that has nothing but git, make and python3, as a newcomer's
# machine. Checks that it installs every tool (the unit tests then start and pass a first file),
# and that a second run is a no-op: no apt, no pip, nothing started. Prints both durations (a
# figure for README, not a pass/fail limit).
#
# The container uses the host's Docker through its socket, as Molecule would from there.
# The base image is cached by the hash of this script and images/lib.sh (FORCE=1 rebuilds).
set -euo pipefail
cd "$(dirname "$0")/../.."
. images/lib.sh

image=${PIHUB_FRESH_IMAGE:-pihub-fresh:bookworm}
container=${PIHUB_FRESH_CONTAINER:-pihub-fresh-machine}
suite=bookworm
hash=$(cat tests/fresh_machine/run.sh images/lib.sh | sha256sum | cut -c1-16)
log() { printf '==> %s\n' "$*" >&2; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

if [[ $(docker image inspect -f '{{ index .Config.Labels "pihub.fresh.hash" }}' "$image" 2>/dev/null) != "$hash" ]]; then
  work=$(mktemp -d /var/tmp/pihub-fresh.XXXXXX)
  trap 'grep -o " $work/rootfs/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l || true; rm -rf --one-file-system "$work"' EXIT
  log "building $image: debootstrap $suite with git, make, python3 only"
  debootstrap --variant=minbase --include=git,make,python3 "$suite" "$work/rootfs" \
    "$(host_mirror "$suite")" >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
  copy_host_sources "$work/rootfs"
  chroot "$work/rootfs" apt-get clean
  rm -rf "$work"/rootfs/var/lib/apt/lists/*
  tar -C "$work/rootfs" --numeric-owner -c . | docker import --change "LABEL pihub.fresh.hash=$hash" \
    --change 'ENV LANG=C.UTF-8' - "$image" >/dev/null
fi

docker rm -f "$container" >/dev/null 2>&1 || true
trap 'docker rm -f "$container" >/dev/null 2>&1 || true' EXIT
docker run -d --name "$container" -v /var/run/docker.sock:/var/run/docker.sock \
  "$image" sleep 3600 >/dev/null
# This checkout as a clone would have it (tracked and new files; nothing ignored, no .venv).
git ls-files -z --cached --others --exclude-standard | tar --null -T - -c |
  docker exec -i "$container" sh -c 'mkdir -p /src && tar -C /src -x'
in_container() { docker exec "$container" bash -c "cd /src && $1"; }

log "first run of scripts/setup.sh test on the fresh container"
start=$(date +%s)
in_container 'scripts/setup.sh test' || fail "the set-up failed on a fresh Debian 12"
first=$(($(date +%s) - start))

log "the tools are there: a first test file runs with make test-unit"
in_container 'make test-unit TESTS="tests/test_launch.py tests/test_topics.py" PYTEST_ADDOPTS=-q' ||
  fail "make test-unit could not run after the set-up"
# as the Makefile runs them: the venv's bin first on PATH (molecule calls ansible-config)
in_container 'PATH=$PWD/.venv/bin:$PATH; ansible-playbook --version && molecule --version' >/dev/null ||
  fail "Ansible and Molecule do not run from the project's venv"
in_container 'test ! -e /usr/local/bin/ansible-playbook && ! python3 -c "import ansible" 2>/dev/null' ||
  fail "something was pip-installed into the system Python"

log "second run: must do nothing"
start=$(date +%s)
second_out=$(in_container 'scripts/setup.sh test' 2>&1) || { echo "$second_out" >&2; fail "the second run failed"; }
second=$(($(date +%s) - start))
echo "$second_out" >&2
grep -q '^==> apt packages: all' <<<"$second_out" || fail "the second run went to apt"
grep -q '^==> .venv: up to date' <<<"$second_out" || fail "the second run rebuilt the venv"
grep -q '^==> Docker: running' <<<"$second_out" || fail "the second run started Docker"
if grep -qE '^==> (installing|making|Docker is not running)' <<<"$second_out"; then fail "the second run did work"; fi

log "fresh-machine set-up: first run ${first} s, second run ${second} s"
