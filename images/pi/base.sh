#!/usr/bin/env bash
# Stage 1 of the Pi image (images/pi/build.sh): an arm64 Debian 12 root with Debian's own kernel
# and Raspberry Pi firmware, made by foreign debootstrap (qemu-user-static via binfmt_misc), and
# nothing of pihub yet. Written as a tarball to OUT; build.sh caches it under the hash of this
# file and images/lib.sh, so it is made again only when the package list or this script change.
#
# Usage: images/pi/base.sh OUT.tar
set -euo pipefail
out=$1
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../lib.sh"
log() { printf '==> base: %s\n' "$*" >&2; }

suite=bookworm
# debootstrap's own set: what every later apt-get needs.
bootstrap=(systemd systemd-sysv dbus udev kmod python3 python3-venv python3-apt sudo
  ca-certificates iproute2 procps less)
# Then, with apt in the root: a Pi's kernel, firmware and boot files from Debian (Debian's own
# Raspberry Pi images use the same: linux-image-arm64, raspi-firmware from non-free-firmware),
# Wi-Fi, SSH, the network and clock, and the tools the first boot uses (growpart, resize2fs).
packages=(linux-image-arm64 initramfs-tools zstd raspi-firmware firmware-brcm80211
  wpasupplicant openssh-server systemd-resolved systemd-timesyncd
  cloud-guest-utils fdisk e2fsprogs dosfstools)

[[ $(id -u) == 0 ]] || { echo "debootstrap needs root" >&2; exit 1; }
[[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]] || {
  echo "an arm64 root needs qemu-user-static registered in binfmt_misc (scripts/setup.sh image)" >&2
  exit 1
}
mirror=$(host_mirror "$suite")
work=$(mktemp -d /var/tmp/pihub-image-base.XXXXXX)
root=$work/rootfs
cleanup() {
  grep -o " $root/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l || true
  grep -q " $root " /proc/mounts && umount -l "$root"
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

log "debootstrap $suite (arm64) into $root"
debootstrap --arch=arm64 --variant=minbase --components=main,non-free-firmware \
  --include="$(IFS=,; echo "${bootstrap[*]}")" "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 40 "$work/debootstrap.log" >&2
  exit 1
}

log "the host's apt sources (with non-free-firmware), apt settings and CA bundle"
copy_host_sources "$root" "$suite"
for f in "$root"/etc/apt/sources.list.d/*.sources; do
  [[ -e $f ]] && sed -i -E '/^Components:/{/non-free-firmware/!s/$/ non-free-firmware/}' "$f"
done
[[ -e $root/etc/apt/sources.list ]] &&
  sed -i -E '/^deb /{/non-free-firmware/!s/$/ non-free-firmware/}' "$root/etc/apt/sources.list"

mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --bind /dev "$root/dev"
mount -t devpts devpts "$root/dev/pts"
# Nothing starts in the root while it is built; the initramfs is made once, at the end (making
# it under emulation takes minutes, and every kernel/firmware package would ask for it again).
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d" && chmod +x "$root/usr/sbin/policy-rc.d"
chroot "$root" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs
ln -s /bin/true "$root/usr/sbin/update-initramfs"
mkdir -p "$root/boot/firmware"
# raspi-firmware writes cmdline.txt from this: the root by label, as Debian's Pi images do.
mkdir -p "$root/etc/default"
printf 'ROOTPART=LABEL=RASPIROOT\nCONSOLES="ttyS1,115200 tty0"\n' >"$root/etc/default/raspi-firmware"

log "apt-get install ${packages[*]}"
chroot "$root" apt-get update -qq
DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y -qq --no-install-recommends \
  -o Dpkg::Options::=--force-confold "${packages[@]}" >"$work/apt.log" 2>&1 || {
  tail -n 40 "$work/apt.log" >&2
  exit 1
}

log "one initramfs (MODULES=most: it boots a Pi's SD card and the emulator's virtio disk alike)"
rm "$root/usr/sbin/update-initramfs"
chroot "$root" dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs
kernel=$(basename "$(ls -d "$root"/lib/modules/*)")
chroot "$root" update-initramfs -c -k "$kernel" >"$work/initramfs.log" 2>&1 || {
  tail -n 40 "$work/initramfs.log" >&2
  exit 1
}
# raspi-firmware's kernel hook copies the kernel, initrd, device trees and a config.txt to
# /boot/firmware (the FAT partition's content).
chroot "$root" /etc/kernel/postinst.d/z50-raspi-firmware "$kernel" >>"$work/initramfs.log" 2>&1 || {
  tail -n 40 "$work/initramfs.log" >&2
  exit 1
}
rm -f "$root/usr/sbin/policy-rc.d"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin

grep -o " $root/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l
log "writing $out"
tar -C "$root" --numeric-owner --xattrs -cf "$out.part" . && mv "$out.part" "$out"
