#!/usr/bin/env bash
# Install what qemu-mcp-http needs on Debian/Ubuntu, then the locked dependencies and the package into ./.venv.
#   scripts/setup.sh          server only
#   scripts/setup.sh --test   plus what the tests need (sshd, guest image tools, test extras)
# Idempotent: packages already present are not reinstalled.
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
[[ "${1:-}" == "--test" ]] && want_tests=1

packages=(qemu-system-x86 qemu-system-arm qemu-efi-aarch64 qemu-utils openssh-client python3 python3-venv ca-certificates)
if ((want_tests)); then
    # sshd for the remote-host tests; grub/xorriso/mtools/cpio/busybox build the bootable test guest;
    # podman/runc/debootstrap build and run the container image (tests/test_container.py).
    packages+=(openssh-server grub-common grub-pc-bin xorriso mtools cpio busybox-static dpkg-dev procps iproute2)
    packages+=(podman runc debootstrap)
    # fdisk (sfdisk) partitions the Debian cloud image built by tests/cloudimg/build.sh (with debootstrap, grub-pc-bin).
    packages+=(fdisk)
    # The web console test (tests/test_web_console.py): noVNC's files as the server serves them, and a real
    # headless Chromium driven over the DevTools protocol.
    packages+=(novnc chromium)
    # The TypeScript MCP SDK as a second client (tests/test_ts_client.py): Debian's Node only when there is no node.
    command -v node >/dev/null || packages+=(nodejs npm)
    # Replicas behind a load balancer (tests/test_replicas.py): a real Redis for the shared events, and HAProxy
    # running deploy/haproxy.cfg (also checked with `haproxy -c` by tests/container/test_deploy.py).
    packages+=(redis-server haproxy)
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    sudo=""
    ((EUID == 0)) || sudo="sudo"
    echo "setup: installing ${missing[*]}" >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

python=${PYTHON:-python3}
"$python" -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
if [[ ! -x .venv/bin/python ]]; then
    "$python" -m venv .venv
fi
# Exactly the lock (requirements/*.txt, made by scripts/lock from pyproject.toml), every file checked against its
# hash: a release made since the lock cannot change what gets installed.  Then the package itself, built with the
# locked setuptools (no build isolation: nothing unpinned is fetched).
lock=requirements/runtime.txt
if ((want_tests)); then
    lock=requirements/test.txt
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --require-hashes -r "$lock"
# (setuptools warns about every editable install in its default mode; that warning says nothing about this one.)
PYTHONWARNINGS="ignore:Editable installation" \
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
