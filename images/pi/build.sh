#!/usr/bin/env bash
# Builds the pihub SD card image for a Raspberry Pi (arm64): pihub-<version>-arm64.img.xz, from
# Debian 12's packages only (docs/image.md):
#   1. base       images/pi/base.sh: debootstrap, Debian's kernel and raspi-firmware (emulated)
#   2. provision  playbooks/site.yml through Ansible's chroot connection, with inventory/image/
#                 (emulated: apt, pip); exactly the play that provisions a Pi over SSH
#   3. assemble   a FAT boot partition and an ext4 root on a loop device, the first-boot service
#                 (images/pi/firstboot/), nothing made per device left in it; then xz
# Stages 1 and 2 are cached under PIHUB_IMAGE_CACHE (default /var/cache/pihub/image) by the hash
# of what makes them (1: base.sh and images/lib.sh; 2: that, roles/, playbooks/, files/daemons/,
# inventory/image/, ansible.cfg and provision.sh), so that a second build is fast. FORCE=1 builds
# everything again.
#
# Usage: images/pi/build.sh [OUT_DIR]   (default: build/; root; scripts/setup.sh image first)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out_dir=$(mkdir -p "${1:-$repo/build}" && cd "${1:-$repo/build}" && pwd)
cache=${PIHUB_IMAGE_CACHE:-/var/cache/pihub/image}
venv=${PIHUB_VENV:-$repo/.venv}
. "$here/../lib.sh"
log() { printf '==> %s\n' "$*" >&2; }
[[ $(id -u) == 0 ]] || { echo "building the image needs root (debootstrap, chroot, loop devices)" >&2; exit 1; }
for tool in debootstrap sfdisk mkfs.vfat mcopy mkfs.ext4 losetup xz; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: scripts/setup.sh image" >&2; exit 1; }
done
[[ -x $venv/bin/ansible-playbook ]] || { echo "no $venv/bin/ansible-playbook: scripts/setup.sh image" >&2; exit 1; }

version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$repo/files/daemons/src/pihub/__init__.py")
image=$out_dir/pihub-$version-arm64.img
started=$(date +%s)
mkdir -p "$cache"

tree_hash() {  # the content of files (tracked or not; caches and build products left out)
  (cd "$repo" && find "$@" -type f ! -path '*/__pycache__/*' ! -path '*.egg-info/*' ! -path '*/.*_cache/*' \
    ! -path '*/build/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16
}
base_key=$(cat "$here/base.sh" "$here/../lib.sh" | sha256sum | cut -c1-16)
prov_key=$( (echo "$base_key"; cat "$here/provision.sh"
  tree_hash roles playbooks files/daemons inventory/image ansible.cfg) | sha256sum | cut -c1-16)
base_tar=$cache/base-$base_key.tar
prov_tar=$cache/provisioned-$prov_key.tar

work=$(mktemp -d /var/tmp/pihub-image.XXXXXX)
root=$work/rootfs
loop=""
cleanup() {
  grep -o " $work/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l || true
  [[ -n $loop ]] && losetup -d $loop 2>/dev/null || true
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

# --- 1. base ----------------------------------------------------------------------------------
if [[ ${FORCE:-0} == 1 || ! -e $base_tar ]]; then
  t=$(date +%s)
  "$here/base.sh" "$base_tar"
  log "base: $(( $(date +%s) - t )) s"
else
  log "base: cached ($base_tar)"
fi

# --- 2. provision -----------------------------------------------------------------------------
if [[ ${FORCE:-0} == 1 || ! -e $prov_tar ]]; then
  t=$(date +%s)
  "$here/provision.sh" "$base_tar" "$prov_tar" "$out_dir"
  log "provision: $(( $(date +%s) - t )) s"
else
  log "provision: cached ($prov_tar)"
fi

# --- 3. assemble ------------------------------------------------------------------------------
t=$(date +%s)
boot_mib=256
content_mib=$(( $(tar -tvf "$prov_tar" | awk '{ s += $3 } END { print int(s / 1048576) }') ))
# Room for the file system's own structures and a first boot's logs; the first boot grows the
# root to the card.
root_mib=$(( content_mib * 12 / 10 + 300 ))
log "assemble: $image (boot ${boot_mib} MiB FAT, root ${root_mib} MiB ext4 for ${content_mib} MiB of files)"
rm -f "$image" "$image.xz"
truncate -s $(( (1 + boot_mib + root_mib) * 1048576 )) "$image"
# MBR: the Pi's boot ROM reads the first FAT partition (type c, FAT32 LBA).
sfdisk --quiet "$image" <<PARTS
label: dos
start=1MiB, size=${boot_mib}MiB, type=c, bootable
start=$(( 1 + boot_mib ))MiB, type=83
PARTS
# One loop device per partition, by offset (a container may have no udev to make the
# partition nodes of --partscan).
loop_boot=$(losetup --find --show --offset 1048576 --sizelimit $(( boot_mib * 1048576 )) "$image")
loop_root=$(losetup --find --show --offset $(( (1 + boot_mib) * 1048576 )) "$image")
loop="$loop_boot $loop_root"
mkfs.vfat -F 32 -n RASPIFIRM "$loop_boot" >/dev/null
mkfs.ext4 -q -L RASPIROOT "$loop_root"
mkdir -p "$work/root"
mount "$loop_root" "$work/root"
tar -C "$work/root" --numeric-owner --xattrs -xf "$prov_tar"
root=$work/root
# The boot partition: raspi-firmware's files (kernel, initrd, device trees, config.txt,
# cmdline.txt) and the settings file the owner edits (docs/image.md), written with mtools (no
# vfat mount needed: a build container's kernel may have no vfat).
cp "$here/firstboot/pihub.txt" "$root/boot/firmware/pihub.txt"
MTOOLS_SKIP_CHECK=1 mcopy -s -i "$loop_boot" "$root/boot/firmware/"* ::
rm -rf "${root:?}/boot/firmware/"*

# The root: the first-boot service, mounts, the network.
install -m 0755 "$here/firstboot/pihub-firstboot" "$root/usr/local/sbin/pihub-firstboot"
install -m 0644 "$here/firstboot/pihub-firstboot.service" "$root/etc/systemd/system/pihub-firstboot.service"
mkdir -p "$root/etc/systemd/system/sysinit.target.wants"
ln -sf /etc/systemd/system/pihub-firstboot.service "$root/etc/systemd/system/sysinit.target.wants/pihub-firstboot.service"
cat >"$root/etc/fstab" <<'FSTAB'
# pihub image (images/pi/build.sh): partitions by label, as Debian's Raspberry Pi images.
LABEL=RASPIROOT /              ext4 rw,noatime,commit=600 0 1
LABEL=RASPIFIRM /boot/firmware vfat rw,noatime,umask=0022 0 2
FSTAB
install -m 0644 "$here/firstboot/wired.network" "$root/etc/systemd/network/20-wired.network"
install -m 0644 "$here/firstboot/wireless.network" "$root/etc/systemd/network/25-wireless.network"
ln -sf /lib/systemd/system/systemd-networkd.service "$root/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
ln -sf /lib/systemd/system/systemd-resolved.service "$root/etc/systemd/system/multi-user.target.wants/systemd-resolved.service"
ln -sfn /run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"
echo pihub >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tpihub\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
echo "pihub $version $(date -u +%Y-%m-%dT%H:%MZ) inventory=pihub-image" >"$root/etc/pihub-image"
# Nothing that must differ between two cards: the first boot makes each of them.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id" "$root"/etc/ssh/ssh_host_* "$root/etc/pihub/secrets/mqtt.secret"
rm -rf "$root/var/lib/systemd/random-seed" "$root"/var/log/journal/* "$root"/tmp/* "$root/root/.ansible"
umount "$work/root"
e2fsck -fy "$loop_root" >/dev/null || [[ $? -le 1 ]]
losetup -d $loop; loop=""
log "assemble: $(( $(date +%s) - t )) s"

t=$(date +%s)
log "xz: $image.xz"
xz -T0 -6 -k "$image"
log "xz: $(( $(date +%s) - t )) s"
log "built $image.xz ($(stat -c %s "$image" | numfmt --to=iec) raw, $(stat -c %s "$image.xz" | numfmt --to=iec) xz) in $(( $(date +%s) - started )) s"
