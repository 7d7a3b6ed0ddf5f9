#!/usr/bin/env bash
# Builds the stand-in Pi: a Debian 12 (bookworm) image with systemd and python3, made with
# debootstrap and `docker import`, the way a fresh Raspberry Pi OS Lite looks to Ansible.
# Used by `make demo` and by Molecule.
#
# Cached: the image carries a label with the hash of this script and ../lib.sh; when an image with that label exists
# the build is skipped. FORCE=1 rebuilds.
#
# The package mirrors, apt settings, CA bundle and pip config are the build host's own, copied into
# the image at build time, so the stand-in reaches exactly the registries the host reaches.
#
# Usage: images/standin/build.sh [IMAGE]   (default pihub-standin:bookworm)
set -euo pipefail

image=${1:-${PIHUB_STANDIN_IMAGE:-pihub-standin:bookworm}}
suite=bookworm
here=$(cd "$(dirname "$0")" && pwd)
hash=$(cat "$here/build.sh" "$here/../lib.sh" | sha256sum | cut -c1-16)

packages=(
  systemd systemd-sysv dbus
  python3 python3-venv python3-apt
  sudo ca-certificates iproute2 procps less
)

log() { printf '==> %s\n' "$*" >&2; }

if [[ ${FORCE:-0} != 1 ]] &&
  [[ $(docker image inspect -f '{{ index .Config.Labels "pihub.standin.hash" }}' "$image" 2>/dev/null) == "$hash" ]]; then
  log "$image is up to date (build script hash $hash)"
  exit 0
fi

[[ $(id -u) == 0 ]] || { echo "debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }

# host_mirror, copy_host_sources: the host's own mirror and apt/CA/pip settings.
. "$here/../lib.sh"

mirror=$(host_mirror "$suite")
work=$(mktemp -d /var/tmp/pihub-standin.XXXXXX)
cleanup() {
  # debootstrap mounts /proc (and more) inside the root; never delete through a mount.
  grep -o " $work/rootfs/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l || true
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
root=$work/rootfs

log "debootstrap $suite into $root (packages: ${packages[*]})"
debootstrap --variant=minbase --include="$(IFS=,; echo "${packages[*]}")" \
  "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 40 "$work/debootstrap.log" >&2
  exit 1
}

log "copying the host's apt sources, apt fetch settings, CA bundle and pip config"
copy_host_sources "$root"

log "making it boot as a container"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
# An empty, old package list, as on a Pi not updated for a while: the first play refreshes it.
touch -d @0 "$root/var/lib/apt/lists"
: >"$root/etc/machine-id"
echo pihub-standin >"$root/etc/hostname"
# Units that only make sense on real hardware or a console.
for unit in getty.target console-getty.service systemd-udevd.service systemd-udev-trigger.service \
  systemd-remount-fs.service sys-kernel-debug.mount sys-kernel-tracing.mount \
  systemd-firstboot.service systemd-modules-load.service; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
printf 'LANG=C.UTF-8\n' >"$root/etc/default/locale"

log "importing as $image"
tar -C "$root" --numeric-owner -c . | docker import \
  --change 'ENV container=docker' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/lib/systemd/systemd"]' \
  --change "LABEL pihub.standin.hash=$hash" \
  --change "LABEL org.opencontainers.image.description=\"pihub stand-in Pi (Debian $suite, systemd)\"" \
  - "$image" >/dev/null
log "built $image ($(docker image inspect -f '{{ .Size }}' "$image" | numfmt --to=iec))"
