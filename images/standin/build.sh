#!/usr/bin/env bash
# Builds the stand-in Pi: a Debian 12 (bookworm) or Debian 13 (trixie) image with systemd and
# python3, made with debootstrap and `docker import`, the way a fresh Raspberry Pi OS Lite looks
# to Ansible. Used by `make demo` and by Molecule.
#
# Cached: the image carries a label with the hash of this script and ../lib.sh; when an image with that label exists
# the build is skipped. FORCE=1 rebuilds.
#
# The package mirrors, apt settings, CA bundle and pip config are the build host's own, copied into
# the image at build time, so the stand-in reaches exactly the registries the host reaches.
#
# Usage: images/standin/build.sh [IMAGE]   (default pihub-standin:bookworm)
# The Debian suite and architecture are the image's tag: pihub-standin:trixie is trixie for this
# machine's architecture, pihub-standin:bookworm-arm64 is an arm64 bookworm (a Pi's), built by
# foreign debootstrap and run under qemu-user-static (binfmt_misc; scripts/setup.sh image).
# Other tags: SUITE (default bookworm) and ARCH (default this machine's).
set -euo pipefail

image=${1:-${PIHUB_STANDIN_IMAGE:-pihub-standin:bookworm}}
tag=${image##*:}
case ${tag%-*} in
  bookworm | trixie) suite=${tag%-*} ;;
  *) suite=${SUITE:-bookworm} ;;
esac
case $tag in
  *-arm64) arch=arm64 ;;
  *) arch=${ARCH:-$(dpkg --print-architecture)} ;;
esac
here=$(cd "$(dirname "$0")" && pwd)
hash=$( (cat "$here/build.sh" "$here/../lib.sh"; echo "$suite $arch") | sha256sum | cut -c1-16)

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

# A bookworm host lists no trixie mirror: trixie comes from the same Debian mirror (the host's
# keyring has trixie's keys).
mirror=$(host_mirror "$suite" 2>/dev/null || host_mirror bookworm)
work=$(mktemp -d /var/tmp/pihub-standin.XXXXXX)
cleanup() {
  # debootstrap mounts /proc (and more) inside the root; never delete through a mount.
  grep -o " $work/rootfs/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l || true
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
root=$work/rootfs

if [[ $arch != "$(dpkg --print-architecture)" ]]; then
  # debootstrap runs the foreign root's second stage through binfmt_misc and qemu-user-static.
  [[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]] || {
    echo "building $arch needs qemu-user-static registered in binfmt_misc (scripts/setup.sh image)" >&2
    exit 1
  }
fi
log "debootstrap $suite ($arch) into $root (packages: ${packages[*]})"
debootstrap --arch="$arch" --variant=minbase --include="$(IFS=,; echo "${packages[*]}")" \
  "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 40 "$work/debootstrap.log" >&2
  exit 1
}

log "copying the host's apt sources, apt fetch settings, CA bundle and pip config"
copy_host_sources "$root" "$suite"

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
if [[ $arch != "$(dpkg --print-architecture)" ]]; then
  # Under qemu-user systemd cannot set up a unit's credentials (its mount calls fail with EINVAL),
  # so the few units that load some fail at boot; they need none in a stand-in.
  for unit in procps systemd-sysctl systemd-sysusers systemd-tmpfiles-clean \
    systemd-tmpfiles-setup-dev systemd-tmpfiles-setup; do
    mkdir -p "$root/etc/systemd/system/$unit.service.d"
    printf '[Service]\nLoadCredential=\n' >"$root/etc/systemd/system/$unit.service.d/no-credentials.conf"
  done
fi

log "importing as $image"
# (The image's metadata says this machine's architecture whatever $arch is: this Docker cannot
# set another on import; binfmt_misc runs an arm64 root all the same.)
tar -C "$root" --numeric-owner -c . | docker import \
  --change 'ENV container=docker' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/lib/systemd/systemd"]' \
  --change "LABEL pihub.standin.hash=$hash" \
  --change "LABEL org.opencontainers.image.description=\"pihub stand-in Pi (Debian $suite $arch, systemd)\"" \
  - "$image" >/dev/null
log "built $image ($(docker image inspect -f '{{ .Size }}' "$image" | numfmt --to=iec))"
