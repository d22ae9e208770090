#!/bin/bash
# Build a tiny bootable test guest ISO from Debian packages.
#
#   tests/guest/build.sh ARCH OUTDIR        ARCH = amd64 | arm64
#
# Produces OUTDIR/guest-ARCH.iso. Idempotent: when the ISO exists and
# OUTDIR/guest-ARCH.stamp holds the hash of this script and the guest files
# (init, udhcpc.script), nothing is done.
#
# Host apt packages needed (Debian 12; scripts/setup.sh --test installs them):
#   apt-get install -y --no-install-recommends \
#     apt dpkg coreutils binutils cpio gzip grub-common grub-pc-bin xorriso mtools
# (binutils for readelf; dpkg-dev pulls it in) and to boot the ISOs:
#   qemu-system-x86 qemu-system-arm qemu-efi-aarch64 qemu-utils
#
# Everything else (kernel, busybox, grub arm64-efi, qemu-guest-agent and its
# libraries) is fetched with `apt-get download` from the host's configured
# Debian sources, through a private apt state dir: the machine's apt
# configuration, lists and dpkg database are not modified and no root is needed.
#
# The guest (see init) loads virtio modules, configures eth0 by DHCP, starts
# acpid (power button -> poweroff -f) and qemu-guest-agent, prints
# QEMU-MCP-GUEST-READY on the serial console once it keeps writing to the
# writable virtio disk, pinging the host and burning a little CPU.
set -euo pipefail

ARCH=${1:?usage: build.sh amd64|arm64 OUTDIR}
OUTDIR=${2:?usage: build.sh amd64|arm64 OUTDIR}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

case "$ARCH" in
    amd64)
        KERNEL_META=linux-image-cloud-amd64
        TRIPLET=x86_64-linux-gnu
        CONSOLE=ttyS0
        GRUB_DIR=/usr/lib/grub/i386-pc
        ;;
    arm64)
        KERNEL_META=linux-image-arm64
        TRIPLET=aarch64-linux-gnu
        CONSOLE=ttyAMA0
        GRUB_DIR= # from the downloaded grub-efi-arm64-bin
        ;;
    *)
        echo "build.sh: unknown ARCH '$ARCH' (amd64|arm64)" >&2
        exit 2
        ;;
esac

# Kernel modules the guest needs (dependencies are added automatically).
# Missing ones (built into this kernel flavour) are skipped.
MODULES=(virtio_pci virtio_blk virtio_net virtio_console virtio_balloon evdev button gpio_keys)


ISO="$OUTDIR/guest-$ARCH.iso"
STAMP="$OUTDIR/guest-$ARCH.stamp"
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
ISO="$OUTDIR/guest-$ARCH.iso"
STAMP="$OUTDIR/guest-$ARCH.stamp"

HASH=$(cat "${BASH_SOURCE[0]}" "$HERE/init" "$HERE/udhcpc.script" | sha256sum | cut -d' ' -f1)
if [[ -f "$ISO" && -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" ]]; then
    echo "build.sh: $ISO is up to date" >&2
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb readelf cpio gzip grub-mkrescue xorriso mformat sha256sum; do
    command -v "$tool" >/dev/null || {
        echo "build.sh: missing host tool '$tool' (see the package list in $0)" >&2
        exit 1
    }
done

WORK=$(mktemp -d "$OUTDIR/.build-$ARCH.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
log() { echo "build.sh[$ARCH] ${SECONDS}s: $*" >&2; }

# --- private apt state ---------------------------------------------------
APT_DIR="$WORK/apt"
mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
: >"$APT_DIR/status"
APT_OPTS=(
    -o "Dir::State=$APT_DIR"
    -o "Dir::State::Lists=$APT_DIR/lists"
    -o "Dir::State::status=$APT_DIR/status"
    -o "Dir::Cache=$APT_DIR/cache"
    -o "APT::Architecture=$ARCH"
    -o "APT::Architectures::=$ARCH"
    -o "Debug::NoLocking=1"
    # As root, apt drops to _apt for downloads; _apt cannot write our private dir.
    -o "APT::Sandbox::User=root"
)
log "apt-get update (private state in $APT_DIR)"
apt-get "${APT_OPTS[@]}" -qq update >"$WORK/apt-update.log" 2>&1 || {
    cat "$WORK/apt-update.log" >&2
    exit 1
}

# Resolve the versioned kernel package behind the meta package.
KERNEL_PKG=$(apt-cache "${APT_OPTS[@]}" depends "$KERNEL_META" |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1)
[[ -n "$KERNEL_PKG" ]] || {
    log "cannot resolve the kernel package behind $KERNEL_META"
    exit 1
}
log "kernel package: $KERNEL_PKG"

# qemu-guest-agent and the packages of its shared libraries: its dependency closure, resolved here
# rather than listed, since library package names change between releases (e.g. the t64 renames).
mapfile -t QGA_PACKAGES < <(apt-cache "${APT_OPTS[@]}" depends --recurse --no-recommends --no-suggests \
    --no-conflicts --no-breaks --no-replaces --no-enhances --no-pre-depends qemu-guest-agent |
    grep '^[a-z0-9]' | sort -u)
PKGS=("$KERNEL_PKG" busybox-static "${QGA_PACKAGES[@]}")
[[ "$ARCH" == arm64 ]] && PKGS+=(grub-efi-arm64-bin)

log "apt-get download ${PKGS[*]}"
mkdir -p "$WORK/debs" "$WORK/x"
(cd "$WORK/debs" && apt-get "${APT_OPTS[@]}" -qq download "${PKGS[@]}") >"$WORK/apt-download.log" 2>&1 || {
    cat "$WORK/apt-download.log" >&2
    exit 1
}
for deb in "$WORK"/debs/*.deb; do
    dpkg-deb -x "$deb" "$WORK/x"
done
X="$WORK/x"

# --- initramfs -----------------------------------------------------------
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,dev,proc,sys,tmp,run,etc/acpi/PWRF,usr/bin,usr/sbin,usr/share/udhcpc,var/run}
cp "$X/bin/busybox" "$R/bin/busybox"
ln -s busybox "$R/bin/sh"
install -m 0755 "$HERE/init" "$R/init"
install -m 0755 "$HERE/udhcpc.script" "$R/usr/share/udhcpc/default.script"
# busybox acpid maps KEY_POWER to the action file PWRF/00000080 under its conf dir.
printf '#!/bin/sh\necho "guest: power button pressed, powering off" >/dev/console\nsync\npoweroff -f\n' \
    >"$R/etc/acpi/PWRF/00000080"
chmod 0755 "$R/etc/acpi/PWRF/00000080"
echo 'root:x:0:0:root:/:/bin/sh' >"$R/etc/passwd"
echo 'root:x:0:' >"$R/etc/group"

# Kernel modules, in dependency order (deps first), listed in /lib/modules/load-order.
KVER=
for d in "$X"/lib/modules/*/; do
    KVER=$(basename "$d")
    break
done
[[ -n "$KVER" ]] || {
    log "no /lib/modules in $KERNEL_PKG"
    exit 1
}
MODDIR="$X/lib/modules/$KVER/kernel"
mkdir -p "$R/lib/modules"
declare -A MOD_DONE=()
ORDER=()
# Debian 12 ships plain .ko files; later releases compress them (busybox insmod wants them plain).
modfile() { find "$MODDIR" \( -name "$1.ko*" -o -name "${1//_/-}.ko*" \) -print -quit; }
add_module() {
    local name=$1 file ko dep
    [[ -n "${MOD_DONE[$name]:-}" ]] && return 0
    MOD_DONE[$name]=1
    file=$(modfile "$name")
    if [[ -z "$file" ]]; then
        log "module $name: not a module in $KVER (built in or absent), skipped"
        return 0
    fi
    ko=$(basename "$file")
    ko=${ko%%.ko*}.ko
    case "$file" in
        *.ko) cp "$file" "$R/lib/modules/$ko" ;;
        *.ko.xz) xz -dc "$file" >"$R/lib/modules/$ko" ;;
        *.ko.zst) zstd -qdc "$file" >"$R/lib/modules/$ko" ;;
        *.ko.gz) gzip -dc "$file" >"$R/lib/modules/$ko" ;;
        *)
            log "module $name: unknown compression of $file"
            exit 1
            ;;
    esac
    for dep in $(tr '\0' '\n' <"$R/lib/modules/$ko" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '); do
        add_module "${dep//-/_}"
    done
    ORDER+=("$ko")
}
for m in "${MODULES[@]}"; do add_module "$m"; done
printf '%s\n' "${ORDER[@]}" >"$R/lib/modules/load-order"
log "modules: ${ORDER[*]}"

# qemu-guest-agent with its shared libraries (closure of DT_NEEDED).
QGA_BIN="$X/usr/sbin/qemu-ga"
LIBDIR="$R/lib/$TRIPLET"
mkdir -p "$LIBDIR"
cp "$QGA_BIN" "$R/usr/sbin/qemu-ga"
find_lib() {
    local d
    for d in "$X/usr/lib/$TRIPLET" "$X/lib/$TRIPLET" "$X/usr/lib" "$X/lib"; do
        [[ -e "$d/$1" ]] && {
            echo "$d/$1"
            return 0
        }
    done
    return 1
}
declare -A LIB_DONE=()
add_needed() {
    local lib path
    for lib in $(readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        [[ -n "${LIB_DONE[$lib]:-}" ]] && continue
        LIB_DONE[$lib]=1
        path=$(find_lib "$lib") || {
            log "qemu-ga: shared library $lib not found in the downloaded packages"
            exit 1
        }
        cp -L "$path" "$LIBDIR/$lib"
        add_needed "$path"
    done
}
add_needed "$QGA_BIN"
INTERP=$(readelf -l "$QGA_BIN" | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p')
mkdir -p "$R$(dirname "$INTERP")"
cp -L "$(find_lib "$(basename "$INTERP")")" "$R$INTERP"
# No ld.so.cache in the guest: tell ld.so where the libraries are.
echo "/lib/$TRIPLET" >"$R/etc/qga-libpath"

mkdir -p "$WORK/iso/boot/grub"
(cd "$R" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner=0:0 --quiet) |
    gzip -6 >"$WORK/iso/boot/initrd.gz"
if [[ "$ARCH" == arm64 ]]; then
    # Debian's arm64 vmlinuz is an uncompressed Image (~33 MB); grub's gzio
    # module decompresses it on load (insmod gzio in grub.cfg).
    gzip -6 -c "$X/boot/vmlinuz-$KVER" >"$WORK/iso/boot/vmlinuz"
else
    cp "$X/boot/vmlinuz-$KVER" "$WORK/iso/boot/vmlinuz"
fi

cat >"$WORK/iso/boot/grub/grub.cfg" <<EOF
set timeout=0
set default=0
insmod gzio
menuentry "qemu-mcp-http test guest ($ARCH)" {
    linux /boot/vmlinuz console=$CONSOLE quiet loglevel=3
    initrd /boot/initrd.gz
}
EOF

[[ -z "$GRUB_DIR" ]] && GRUB_DIR="$X/usr/lib/grub/arm64-efi"
log "grub-mkrescue -d $GRUB_DIR"
# grub-mkrescue's embedded config loads every partition map in partmap.lst: ship them all
# (a few KB), or GRUB prints "file not found" for each on the console.
GRUB_MODULES="linux normal iso9660 configfile echo gzio search test $(tr '\n' ' ' <"$GRUB_DIR/partmap.lst")"
grub-mkrescue -d "$GRUB_DIR" --fonts= --locales= --themes= \
    --install-modules="$GRUB_MODULES" \
    -o "$WORK/guest.iso" "$WORK/iso" >"$WORK/mkrescue.log" 2>&1 || {
    cat "$WORK/mkrescue.log" >&2
    exit 1
}
if [[ "$ARCH" == amd64 ]]; then
    # A second ISO whose GRUB menu waits for a key (two entries): what the screen and keys tests drive.
    cat >"$WORK/iso/boot/grub/grub.cfg" <<EOF
set timeout=-1
set default=0
insmod gzio
menuentry "qemu-mcp-http test guest ($ARCH)" {
    linux /boot/vmlinuz console=$CONSOLE quiet loglevel=3
    initrd /boot/initrd.gz
}
menuentry "qemu-mcp-http test guest ($ARCH), second entry" {
    linux /boot/vmlinuz console=$CONSOLE quiet loglevel=3
    initrd /boot/initrd.gz
}
EOF
    grub-mkrescue -d "$GRUB_DIR" --fonts= --locales= --themes= \
        --install-modules="$GRUB_MODULES" \
        -o "$WORK/guest-menu.iso" "$WORK/iso" >"$WORK/mkrescue.log" 2>&1 || {
        cat "$WORK/mkrescue.log" >&2
        exit 1
    }
    mv -f "$WORK/guest-menu.iso" "$(dirname "$ISO")/guest-menu-$ARCH.iso"
fi
mv -f "$WORK/guest.iso" "$ISO"
echo "$HASH" >"$STAMP"
log "built $ISO ($(du -h "$ISO" | cut -f1))"
