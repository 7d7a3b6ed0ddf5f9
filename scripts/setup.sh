#!/usr/bin/env bash
# The one set-up of this repository, shared by `make demo` and `make test` (and so by CI):
# on a Debian 12 / Ubuntu 22.04+ / Raspberry Pi OS machine with only git, make and python3 it
# installs what the chosen purpose needs, and skips fast whatever is already done.
#
#   scripts/setup.sh pi     .venv with Ansible (to provision a Pi: make inventory, make pi)
#   scripts/setup.sh demo   the same, plus Docker and debootstrap, and dockerd running
#   scripts/setup.sh test   the same, plus what the tests run against: Mosquitto,
#                           VictoriaMetrics, rrdtool/rrdcached, Chromium + chromedriver
#   scripts/setup.sh image  the same as pi, plus what make image-pi and make test-image-pi
#                           need: debootstrap, qemu-user-static registered in binfmt_misc (a
#                           foreign arm64 root), partitioning and file-system tools, xz,
#                           qemu-system-aarch64 (the boot test)
#
# Never pip into the system Python (PEP 668 refuses it on Debian 12 and Raspberry Pi OS): every
# Python tool lives in the project's .venv/ (override with PIHUB_VENV).
#
# Exit codes, each with one sentence on stderr: 64 usage, 69 a service or registry unreachable
# (apt, pip, dockerd), 71 an OS this does not support (no apt), 77 not root and no sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

purpose=${1:-test}
case $purpose in
  pi | demo | test | image) ;;
  *) echo "usage: scripts/setup.sh pi|demo|test|image" >&2; exit 64 ;;
esac

venv=${PIHUB_VENV:-.venv}
say() { printf '==> %s\n' "$*" >&2; }
die() { local code=$1; shift; printf 'setup: %s\n' "$*" >&2; exit "$code"; }

# --- who may install --------------------------------------------------------------------------
if [[ $(id -u) == 0 ]]; then
  sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
elif command -v sudo >/dev/null && [[ -t 0 ]]; then
  sudo=(sudo)
else
  die 77 "installing packages needs root: run this as root, or as a user who may use sudo"
fi

# --- apt packages -----------------------------------------------------------------------------
command -v apt-get >/dev/null && command -v dpkg-query >/dev/null ||
  die 71 "this needs a Debian-based OS with apt (Debian 12, Ubuntu 22.04+, Raspberry Pi OS); none found here"

packages=(make git tar ca-certificates)
if [[ $purpose == demo || $purpose == test ]]; then
  packages+=(docker.io debootstrap)
fi
if [[ $purpose == image ]]; then
  packages+=(debootstrap qemu-user-static binfmt-support qemu-system-arm parted fdisk dosfstools
    e2fsprogs mtools xz-utils qemu-utils openssh-client)
fi
if [[ $purpose == test ]]; then
  packages+=(mosquitto mosquitto-clients victoria-metrics rrdtool rrdcached chromium chromium-driver)
fi
# Debian's python3 needs python3-venv for `-m venv` (with pip); another python3 may not. (make
# bench builds the Pi's venv with Debian's own /usr/bin/python3.)
if ! python3 -c 'import ensurepip, venv' 2>/dev/null ||
  { [[ -x /usr/bin/python3 ]] && ! /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null; }; then
  packages+=(python3-venv)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing with apt: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq ||
    die 69 "apt-get update failed: the package registries cannot be reached from here (or an apt source is broken); see the lines above"
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    die 69 "apt-get install ${missing[*]} failed; see the lines above"
else
  say "apt packages: all ${#packages[@]} installed"
fi

# --- the project's venv -----------------------------------------------------------------------
# Rebuilt only when what it is made from changes: the requirements, the package's metadata,
# the Python it runs on. The stamp records that.
stamp=$venv/.pihub-setup
want=$( { python3 -c 'import sys; print(sys.version)'; cat requirements-dev.txt files/daemons/pyproject.toml; } |
  sha256sum | cut -c1-16)
if [[ -x $venv/bin/python && -e $stamp && $(cat "$stamp") == "$want" ]]; then
  say "$venv: up to date"
else
  if [[ ! -x $venv/bin/python ]]; then
    say "making the project venv $venv ($(python3 --version))"
    python3 -m venv "$venv" || die 71 "python3 -m venv failed; on Debian this needs the python3-venv package"
  fi
  say "installing the test tools, Ansible and the pihub package into $venv (a few minutes the first time)"
  "$venv/bin/python" -m pip install -q --upgrade pip ||
    die 69 "pip could not reach the package index (PyPI or your mirror); see the lines above"
  "$venv/bin/python" -m pip install -q -r requirements-dev.txt -e 'files/daemons[tsdb,web]' ||
    die 69 "pip install failed (no network to PyPI, or a package could not be built); see the lines above"
  echo "$want" >"$stamp"
fi

# --- binfmt_misc (image): debootstrap's second stage and the play run arm64 programs -----------
if [[ $purpose == image ]]; then
  if [[ ! -e /proc/sys/fs/binfmt_misc/status ]]; then
    say "mounting binfmt_misc"
    "${sudo[@]}" mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc ||
      die 71 "binfmt_misc cannot be mounted here (a container without it?): arm64 programs cannot run"
  fi
  if [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
    say "registering qemu-aarch64 in binfmt_misc"
    "${sudo[@]}" update-binfmts --enable qemu-aarch64 ||
      die 71 "update-binfmts --enable qemu-aarch64 failed; see the line above"
  fi
fi

# --- Docker -----------------------------------------------------------------------------------
docker_cmd=(docker)
if [[ $purpose == pi || $purpose == image ]]; then
  :
elif ! docker info >/dev/null 2>&1; then
  if [[ $(id -u) != 0 ]] && "${sudo[@]}" docker info >/dev/null 2>&1; then
    die 77 "Docker runs, but not for $(id -un): add yourself to the docker group (sudo usermod -aG docker $(id -un)) and log in again"
  fi
  if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
    say "Docker is not running: starting it (systemctl start docker)"
    "${sudo[@]}" systemctl start docker || true
  fi
  if ! "${docker_cmd[@]}" info >/dev/null 2>&1; then
    say "Docker is not running and no systemd here: starting dockerd in the background (log: /var/log/pihub-dockerd.log)"
    "${sudo[@]}" sh -c 'nohup dockerd >/var/log/pihub-dockerd.log 2>&1 &'
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  fi
  docker info >/dev/null 2>&1 || {
    tail -n 5 /var/log/pihub-dockerd.log >&2 2>/dev/null || true
    die 69 "dockerd did not start; its last lines are above"
  }
else
  say "Docker: running"
fi
say "set-up for '$purpose' done"
