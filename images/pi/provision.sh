#!/usr/bin/env bash
# Stage 2 of the Pi image (images/pi/build.sh): the base root (stage 1's tarball) provisioned by
# playbooks/site.yml through Ansible's chroot connection (inventory/image/build.yml), written as
# a tarball. The play runs exactly as over SSH, with pihub_image_build: true (units enabled,
# nothing started: docs/image.md). build.sh caches the result by the content of what makes it.
#
# Usage: images/pi/provision.sh BASE.tar OUT.tar LOG_DIR
set -euo pipefail
base_tar=$1 out=$2 log_dir=$3
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
venv=${PIHUB_VENV:-$repo/.venv}
log() { printf '==> provision: %s\n' "$*" >&2; }

work=$(mktemp -d /var/tmp/pihub-image-provision.XXXXXX)
root=$work/rootfs
cleanup() {
  grep -o " $root/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l || true
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

mkdir -p "$root"
tar -C "$root" --numeric-owner --xattrs -xf "$base_tar"
# The base has no package lists: dated at 0, as on a Pi not updated for a while, the play's
# first task (role base) fetches them.
touch -d @0 "$root/var/lib/apt/lists"
rm -f "$root/var/lib/apt/periodic/update-success-stamp"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --bind /dev "$root/dev"
mount -t devpts devpts "$root/dev/pts"
mount -t tmpfs tmpfs "$root/run"
mount -t tmpfs tmpfs "$root/tmp"
# The build host's resolver while the play runs (the image's own is systemd-resolved's stub),
# and no package's script starts anything.
mv "$root/etc/resolv.conf" "$work/resolv.conf.image"
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d" && chmod +x "$root/usr/sbin/policy-rc.d"

log "playbooks/site.yml through the chroot connection (inventory/image/build.yml)"
(cd "$repo" && PIHUB_IMAGE_ROOT=$root ANSIBLE_FORCE_COLOR=0 "$venv/bin/ansible-playbook" \
  -i inventory/image/build.yml playbooks/site.yml) >"$work/play.log" 2>&1 || {
  tail -n 60 "$work/play.log" >&2
  cp "$work/play.log" "$log_dir/provision-failed.log"
  echo "the play failed; its whole log: $log_dir/provision-failed.log" >&2
  exit 1
}
cp "$work/play.log" "$log_dir/provision.log"
grep -A2 '^PLAY RECAP' "$work/play.log" >&2

rm -f "$root/usr/sbin/policy-rc.d"
rm -f "$root/etc/resolv.conf" && mv "$work/resolv.conf.image" "$root/etc/resolv.conf"
chroot "$root" apt-get clean
# No package lists (their directory keeps the build's date): base refreshes them when older
# than base_apt_cache_valid_time.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
grep -o " $root/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l
tar -C "$root" --numeric-owner --xattrs -cf "$out.part" . && mv "$out.part" "$out"
