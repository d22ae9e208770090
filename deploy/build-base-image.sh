#!/usr/bin/env bash
# Make `FROM debian:bookworm-slim` resolvable without a container registry: debootstrap a minimal
# Debian 12 root file system from the Debian mirror this machine's apt already uses, trim it the way
# the official slim image is trimmed, and `podman import` it as docker.io/library/debian:bookworm-slim.
#
#   deploy/build-base-image.sh            import the image unless podman already has it
#   deploy/build-base-image.sh --force    rebuild the root file system and re-import
#
# Needs root and the Debian packages podman, runc, debootstrap.  The root file system tarball is cached
# in ${QEMU_MCP_CACHE_DIR:-~/.cache/qemu-mcp-http} so a re-import takes seconds; concurrent runs wait
# for each other (flock).  Env:
#   DEBIAN_MIRROR    mirror to debootstrap from (default: the bookworm mirror in /etc/apt/sources*)
#   DEBIAN_SECURITY  security mirror written into the image's apt sources (default: likewise)
#   CONTAINERS_CONF  podman settings (default: deploy/containers.conf next to this script)
#   BASE_IMAGE       image name to create (default docker.io/library/debian:bookworm-slim)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"
image="${BASE_IMAGE:-docker.io/library/debian:bookworm-slim}"
cache="${QEMU_MCP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/qemu-mcp-http}"
force=0
[[ "${1:-}" == "--force" ]] && force=1

mkdir -p "$cache"
exec 9>"$cache/base-image.lock"
flock 9

if ((!force)) && podman image exists "$image"; then
    echo "base-image: $image already present" >&2
    exit 0
fi

# The URIs of the apt sources of this machine that serve the given suite (deb822 and one-line formats).
mirror_for_suite() {
    local suite="$1" f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] || continue
        awk -v want="$suite" '
            function flush() { if (uri != "" && hit) print uri; uri = ""; hit = 0 }
            /^[[:space:]]*$/ { flush(); next }
            /^URIs:/ { uri = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == want) hit = 1 }
            END { flush() }
        ' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f "$f" ]] || continue
        sed -E 's/\[[^]]*\]//' "$f" | awk -v want="$suite" '$1 == "deb" && $3 == want { print $2 }'
    done
    return 0
}
mirror="${DEBIAN_MIRROR:-$(mirror_for_suite bookworm | sed -n 1p)}"
mirror="${mirror:-http://deb.debian.org/debian}"
security="${DEBIAN_SECURITY:-$(mirror_for_suite bookworm-security | sed -n 1p)}"
security="${security:-http://deb.debian.org/debian-security}"
tarball="$cache/debian-bookworm-minbase.tar"

if ((force)) || [[ ! -s "$tarball" ]]; then
    command -v debootstrap >/dev/null || { echo "base-image: debootstrap is not installed" >&2; exit 1; }
    rootfs="$(mktemp -d "$cache/rootfs.XXXXXX")"
    trap 'rm -rf "$rootfs"' EXIT
    echo "base-image: debootstrap --variant=minbase bookworm from $mirror" >&2
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 || {
        tail -n 20 "$cache/debootstrap.log" >&2
        exit 1
    }
    # The official image's apt sources: the release, its updates and the security archive.
    rm -f "$rootfs/etc/apt/sources.list"
    cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # What the official slim image does: no docs, man pages or translations from later installs; no caches.
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
    find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/usr/share/info/*
    rm -rf "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    rm -f "$rootfs"/var/log/*.log "$rootfs"/etc/machine-id "$rootfs"/etc/hostname
    tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
fi

echo "base-image: importing $tarball as $image" >&2
podman import --quiet --change 'CMD ["bash"]' - "$image" <"$tarball" >/dev/null
echo "base-image: $image ready" >&2
