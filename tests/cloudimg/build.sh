#!/bin/bash
# Build a real Debian 12 (bookworm) amd64 cloud image from Debian packages.
#
#   bash tests/cloudimg/build.sh OUTDIR
#
# Produces OUTDIR/debian-12-cloud-amd64.qcow2 (compressed qcow2, 2 GiB virtual, BIOS boot).
# Idempotent: when the image exists and OUTDIR/debian-12-cloud-amd64.stamp holds the hash of the
# files of this directory, nothing is done. Runs as root (debootstrap, chroot).
#
# Host apt packages needed (Debian 12; scripts/setup.sh --test installs them):
#   apt-get install -y --no-install-recommends \
#     debootstrap e2fsprogs fdisk grub-common grub-pc-bin qemu-utils coreutils
#
# The guest: systemd, udev, dbus (systemd-logind handles the ACPI power button), cloud-init 22.4
# restricted to the NoCloud datasource, openssh-server (host keys are made at first boot, never
# baked in), qemu-guest-agent (started by udev when the virtio-serial port org.qemu.guest_agent.0
# appears; 7.2 has no command block list by default, so guest-exec is allowed), sudo, GRUB for BIOS,
# the Debian cloud kernel (virtio drivers; no AHCI, e1000 or usb-storage).
#
# Networking: cloud-init 22.4 picks the first available renderer of eni, sysconfig, netplan,
# network-manager, ..., networkd. A minbase system has no ifupdown (no ifup/ifquery, no
# /etc/network/interfaces), so cloud-init renders systemd-networkd .network files (DHCP on the NIC,
# matched by MAC). systemd-networkd is enabled here (Debian leaves it disabled) and
# systemd-resolved takes the DNS servers from DHCP.
#
# Steps: debootstrap --variant=minbase into a private temp dir -> configure the tree ->
# mkfs.ext4 -d TREE on a separate file -> copy it into partition 1 of an MBR-partitioned raw disk ->
# GRUB for BIOS -> qemu-img convert -c -O qcow2. The temp dir and any mount debootstrap left are
# removed by the EXIT trap, also on failure, SIGINT or SIGTERM.
#
# GRUB without grub-install: grub-install wants its --boot-directory on the mounted target
# filesystem (it probes that directory's device for the UUID and prefix it embeds), and
# grub-bios-setup insists on opening the block device that holds its -d directory, which fails in
# a container (overlayfs root, host disk not openable). So the image gets what
# `grub-install --target=i386-pc` would write, made by hand: the GRUB files in
# /boot/grub/i386-pc, a core.img from grub-mkimage that finds the root filesystem by UUID, boot.img
# in the MBR (its first 440 bytes; the partition table stays) and core.img embedded in the gap
# from sector 1 (boot.img's default start sector; core.img's default block list follows it). No
# loop device and no mount. In the guest, grub-pc's own postinst runs grub-install on /dev/vda
# (preseeded below) when GRUB is upgraded.
set -euo pipefail

OUTDIR=${1:?usage: build.sh OUTDIR}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

SUITE=bookworm
MIRROR=http://deb.debian.org/debian
NAME=debian-12-cloud-amd64
DISK_MIB=2048       # virtual size; the product grows disks, cloud-init grows partition and filesystem
PART_START_MIB=1    # partition 1 starts at sector 2048; the gap before it holds GRUB's core.img
FS_LABEL=cloudimg-rootfs
PACKAGES=(
    linux-image-cloud-amd64 systemd-sysv udev dbus libpam-systemd systemd-resolved
    cloud-init cloud-guest-utils openssh-server qemu-guest-agent sudo grub-pc
    iproute2 netbase zstd
    # debootstrap's resolver ignores virtual packages: python3-cryptography (cloud-init -> oauthlib)
    # needs python3-cffi-backend-api-{min,max}, which only this package provides.
    python3-cffi-backend
)
# Kernel command line: the serial console last, so that it is /dev/console (the product reads boot logs there).
CMDLINE="console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200 consoleblank=0"

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
IMAGE="$OUTDIR/$NAME.qcow2"
STAMP="$OUTDIR/$NAME.stamp"

HASH=$(cd "$HERE" && find . -maxdepth 1 -type f -print0 | LC_ALL=C sort -z | xargs -0 cat | sha256sum | cut -d' ' -f1)
if [[ -f "$IMAGE" && -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" ]]; then
    echo "build.sh: $IMAGE is up to date" >&2
    exit 0
fi

((EUID == 0)) || {
    echo "build.sh: must run as root (debootstrap, chroot)" >&2
    exit 1
}
for tool in debootstrap chroot mkfs.ext4 sfdisk grub-mkimage grub-editenv qemu-img sha256sum; do
    command -v "$tool" >/dev/null || {
        echo "build.sh: missing host tool '$tool' (see the package list in $0)" >&2
        exit 1
    }
done

log() { echo "build.sh ${SECONDS}s: $*" >&2; }

# Unmount whatever is mounted below $1 (deepest first), then remove it without crossing into
# another filesystem. Never removes a dir still holding a mount: debootstrap mounts /proc and /sys
# in the tree and, in a container, bind-mounts the host's device nodes into it.
release_dir() {
    local dir=$1 mnt
    [[ -d "$dir" ]] || return 0
    while read -r mnt; do
        umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
    done < <(awk '{print $2}' /proc/self/mounts | grep -F "$dir/" | sort -r)
    if awk '{print $2}' /proc/self/mounts | grep -qF "$dir/"; then
        echo "build.sh: mounts remain below $dir; not removing it" >&2
        return 1
    fi
    rm -rf --one-file-system "$dir"
}

# Leftovers of a build killed before its trap ran (the caller serializes builds in OUTDIR).
for leftover in "$OUTDIR"/.build-cloudimg.*; do
    [[ -e "$leftover" ]] || continue
    log "removing leftover $leftover"
    release_dir "$leftover" || true
done

WORK=$(mktemp -d "$OUTDIR/.build-cloudimg.XXXXXX")
cleanup() {
    local rc=$?
    set +e
    release_dir "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP
ROOT="$WORK/root"

# --- debootstrap ---------------------------------------------------------------------------------
log "debootstrap --variant=minbase $SUITE from $MIRROR"
debootstrap --variant=minbase --arch=amd64 --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.out" 2>&1 || {
    tail -n 40 "$WORK/debootstrap.out" >&2
    [[ -f "$ROOT/debootstrap/debootstrap.log" ]] && tail -n 60 "$ROOT/debootstrap/debootstrap.log" >&2
    log "debootstrap failed"
    exit 1
}
KVER=$(find "$ROOT/boot" -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' | sed 's/^vmlinuz-//' | sort -V | tail -n1)
[[ -n "$KVER" && -f "$ROOT/boot/initrd.img-$KVER" ]] || {
    log "no kernel or initrd in $ROOT/boot"
    exit 1
}
log "kernel $KVER, $(du -sh --one-file-system "$ROOT" | cut -f1) installed"

# --- configure the tree --------------------------------------------------------------------------
UUID=$(cat /proc/sys/kernel/random/uuid)

# No docs, man pages or translations: removed now, and kept out of later installs.
cat >"$ROOT/etc/dpkg/dpkg.cfg.d/01-nodoc" <<'EOF'
# qemu-mcp-http test image: no documentation, man pages or translations.
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/groff/*
path-exclude=/usr/share/lintian/*
path-exclude=/usr/share/linda/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
EOF
find "$ROOT/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
find "$ROOT/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$ROOT"/usr/share/{man,info,groff,lintian,linda}/*
find "$ROOT/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +

cat >"$ROOT/etc/fstab" <<EOF
# <file system>  <mount point>  <type>  <options>  <dump>  <pass>
UUID=$UUID  /  ext4  rw,discard,errors=remount-ro  0  1
EOF
# The initramfs' fsck hook probes the device of / for its type, which fails in a chroot: without this
# the initramfs has no fsck.ext4 ("fsck not present, so skipping root file system") at boot.
echo "FSTYPE=ext4" >"$ROOT/etc/initramfs-tools/conf.d/fstype.conf"
chroot "$ROOT" update-initramfs -u -k "$KVER" >"$WORK/initramfs.out" 2>&1 || {
    cat "$WORK/initramfs.out" >&2
    exit 1
}
grep '^[WE]:' "$WORK/initramfs.out" >&2 || true
echo debian >"$ROOT/etc/hostname"
cat >"$ROOT/etc/hosts" <<'EOF'
127.0.0.1	localhost
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
cat >"$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
EOF

# cloud-init: NoCloud only (no probing of clouds); C.UTF-8 needs no locale-gen at first boot; no DSA
# host key (deprecated, and every key costs seconds under TCG).
cat >"$ROOT/etc/cloud/cloud.cfg.d/99_qemu-mcp.cfg" <<'EOF'
# qemu-mcp-http test image
datasource_list: [NoCloud, None]
locale: C.UTF-8
ssh_genkeytypes: [rsa, ecdsa, ed25519]
EOF

# systemd-networkd renders cloud-init's network config; wait-online should not hold up
# cloud-init (ordered after it) for two minutes when the guest has no NIC.
systemctl --root="$ROOT" enable systemd-networkd.service systemd-resolved.service >/dev/null 2>&1
mkdir -p "$ROOT/etc/systemd/system/systemd-networkd-wait-online.service.d"
cat >"$ROOT/etc/systemd/system/systemd-networkd-wait-online.service.d/any.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=30
EOF
# resolved's stub: DNS servers from DHCP (systemd-resolved's postinst makes this link; be sure).
ln -sf ../run/systemd/resolve/stub-resolv.conf "$ROOT/etc/resolv.conf"

# SSH host keys are generated at first boot (cloud-init's ssh module); should cloud-init not run,
# sshd makes its own instead of failing.
rm -f "$ROOT"/etc/ssh/ssh_host_*
mkdir -p "$ROOT/etc/systemd/system/ssh.service.d"
cat >"$ROOT/etc/systemd/system/ssh.service.d/hostkeys.conf" <<'EOF'
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
EOF

# qemu-guest-agent: Debian's unit is started by its udev rule when the port appears. Check it is there.
grep -qs 'org.qemu.guest_agent.0' "$ROOT"/lib/udev/rules.d/*qemu-guest-agent*.rules || {
    log "qemu-guest-agent's udev rule is missing"
    exit 1
}

# GRUB: BIOS, no menu, serial console. update-grub in the guest regenerates grub.cfg from this.
cat >"$ROOT/etc/default/grub" <<EOF
# qemu-mcp-http test image
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_TIMEOUT_STYLE=hidden
GRUB_DISTRIBUTOR=\`lsb_release -i -s 2> /dev/null || echo Debian\`
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="$CMDLINE"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --speed=115200"
GRUB_DISABLE_OS_PROBER=true
EOF
# grub-pc's postinst (on upgrades in the guest) installs GRUB to the virtio disk.
echo "grub-pc grub-pc/install_devices multiselect /dev/vda" | chroot "$ROOT" debconf-set-selections

mkdir -p "$ROOT/boot/grub/i386-pc"
cp "$ROOT"/usr/lib/grub/i386-pc/*.{mod,lst,img} "$ROOT/boot/grub/i386-pc/"
grub-editenv "$ROOT/boot/grub/grubenv" create
cat >"$ROOT/boot/grub/grub.cfg" <<EOF
# Written by tests/cloudimg/build.sh; update-grub in the guest regenerates it from /etc/default/grub.
set default=0
set timeout=0
set timeout_style=hidden
serial --speed=115200
terminal_input console serial
terminal_output console serial
insmod part_msdos
insmod ext2
search --no-floppy --fs-uuid --set=root $UUID
menuentry 'Debian GNU/Linux 12 ($KVER)' {
    linux /boot/vmlinuz-$KVER root=UUID=$UUID ro $CMDLINE
    initrd /boot/initrd.img-$KVER
}
EOF
# core.img as grub-install builds it: find the root filesystem by UUID, load the rest from it.
cat >"$WORK/load.cfg" <<EOF
search.fs_uuid $UUID root hd0,msdos1
set prefix=(\$root)/boot/grub
EOF
grub-mkimage -d "$ROOT/usr/lib/grub/i386-pc" -O i386-pc -c "$WORK/load.cfg" -p /boot/grub \
    -o "$ROOT/boot/grub/i386-pc/core.img" biosdisk part_msdos ext2 search_fs_uuid

# Per-instance state: none baked in.
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id"
rm -rf "$ROOT"/var/lib/cloud/*
chroot "$ROOT" apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/debconf/*-old "$ROOT"/var/log/*.log \
    "$ROOT"/var/log/apt/* "$ROOT"/tmp/* "$ROOT"/var/tmp/* "$ROOT/debootstrap"
mkdir -p "$ROOT/var/lib/apt/lists/partial"

# --- disk image ----------------------------------------------------------------------------------
DISK="$WORK/disk.raw"
FS="$WORK/rootfs.ext4"
PART_MIB=$((DISK_MIB - PART_START_MIB))
log "mkfs.ext4 -d (${PART_MIB} MiB, UUID $UUID)"
truncate -s "${PART_MIB}M" "$FS"
mkfs.ext4 -q -F -d "$ROOT" -U "$UUID" -L "$FS_LABEL" "$FS" >"$WORK/mkfs.out" 2>&1 || {
    cat "$WORK/mkfs.out" >&2
    exit 1
}
truncate -s "${DISK_MIB}M" "$DISK"
printf 'label: dos\nstart=%d, type=83, bootable\n' $((PART_START_MIB * 2048)) | sfdisk -q "$DISK"
dd if="$FS" of="$DISK" bs=1M seek="$PART_START_MIB" conv=notrunc,sparse status=none
rm -f "$FS"

CORE="$ROOT/boot/grub/i386-pc/core.img"
(($(stat -c %s "$CORE") < (PART_START_MIB * 2048 - 1) * 512)) || {
    log "core.img does not fit before partition 1"
    exit 1
}
dd if="$ROOT/boot/grub/i386-pc/boot.img" of="$DISK" bs=440 count=1 conv=notrunc status=none
dd if="$CORE" of="$DISK" bs=512 seek=1 conv=notrunc status=none

log "qemu-img convert -c -O qcow2"
qemu-img convert -c -O qcow2 "$DISK" "$WORK/$NAME.qcow2"
mv -f "$WORK/$NAME.qcow2" "$IMAGE"
echo "$HASH" >"$STAMP"
log "built $IMAGE ($(du -h "$IMAGE" | cut -f1))"
