#!/usr/bin/env bash
# Builds the stand-in Pi: a Debian 12 (bookworm) image with systemd and python3, made with
# debootstrap and `docker import`, the way a fresh Raspberry Pi OS Lite looks to Ansible.
# Used by `make demo` and by Molecule.
#
# Cached: the image carries a label with this script's hash; when an image with that label exists
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
hash=$(sha256sum "$here/build.sh" | cut -c1-16)

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

# The first non-security Debian mirror the host itself uses (deb822 sources or sources.list).
host_mirror() {
  local f uri=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -e $f ]] || continue
    uri=$(awk '
      /^[[:space:]]*$/ { if (u != "" && s !~ /security/ && s ~ /'"$suite"'/) { print u; exit } u = ""; s = "" }
      /^URIs:/ { u = $2 } /^Suites:/ { s = $0 }
      END { if (u != "" && s !~ /security/ && s ~ /'"$suite"'/) print u }' "$f" | head -n1)
    [[ -n $uri ]] && { echo "$uri"; return; }
  done
  if [[ -e /etc/apt/sources.list ]]; then
    uri=$(awk '$1 == "deb" && $3 == "'"$suite"'" { print $2; exit }' /etc/apt/sources.list)
    [[ -n $uri ]] && { echo "$uri"; return; }
  fi
  echo "no $suite mirror found in the host's apt sources" >&2
  return 1
}

mirror=$(host_mirror)
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
rm -f "$root/etc/apt/sources.list"
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
  [[ -e $f ]] && cp "$f" "$root$f"
done
# Only the settings that make apt reach the mirror (e.g. Check-Valid-Until on a snapshot mirror).
for f in /etc/apt/apt.conf.d/*; do
  [[ -f $f ]] && grep -q '^[[:space:]]*Acquire::' "$f" && cp "$f" "$root/etc/apt/apt.conf.d/"
done
[[ -e /etc/ssl/certs/ca-certificates.crt ]] && cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
[[ -e /etc/pip.conf ]] && cp /etc/pip.conf "$root/etc/pip.conf"

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
