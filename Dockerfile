# qemu-mcp-http: the MCP server and QEMU (x86_64 + arm64 guests) in one image.
#
#   podman build --format docker -t qemu-mcp-http .
#   podman run -d --name qemu-mcp -p 127.0.0.1:8000:8000 \
#     -v qemu-vms:/var/lib/qemu -v "$PWD/qemu-mcp-token:/run/secrets/qemu-mcp-token:ro" \
#     --device /dev/kvm --group-add "$(stat -c %g /dev/kvm)" \
#     --read-only --tmpfs /tmp --cap-drop=all --security-opt no-new-privileges qemu-mcp-http
#
# deploy/README.md: the token file, KVM, volumes, SSH keys, compose, systemd, the podman flags that hosts
# without systemd or with hybrid cgroups need (deploy/containers.conf), and the base image without a registry.
#
# Build inputs (all optional; nothing of them reaches the final image):
#   --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt   CA bundle for pip (TLS-intercepting proxy)
#   --secret id=pip_conf,src=pip.conf                              a pip config: index-url, proxy, credentials
#   --build-arg KVM_GID=<gid of the host's kvm group>               the image's kvm group gets that gid
# With podman/buildah build --format docker: the OCI image format has no HEALTHCHECK.

ARG BASE_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------------------------------------
# python: Debian's python3 with an empty venv at the path the runtime stage uses, and pip wrapped so that
# the optional build secrets are used when passed: a CA bundle (PIP_CERT) and a pip config (index, proxy).
# They are mounted for one RUN at a time and never written to a layer.
FROM ${BASE_IMAGE} AS python
ARG DEBIAN_FRONTEND=noninteractive
# Versions come from Debian 12 (stable, security updates): pinning them would break the build at each update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/qemu-mcp-http \
    && printf '%s\n' '#!/bin/sh' 'set -eu' \
        'if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi' \
        'if [ -s /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi' \
        'exec /opt/qemu-mcp-http/bin/pip "$@"' >/usr/local/bin/venv-pip \
    && chmod 0755 /usr/local/bin/venv-pip
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore PIP_DEFAULT_TIMEOUT=120

# builder: the locked dependencies (requirements/runtime.txt, every file checked against its hash), then the
# package, into the venv; copied whole into the runtime stage (same Debian, same /usr/bin/python3, same path),
# so no pip, wheel cache or build tooling reaches the final image.  The lock is copied alone first: a layer is
# cached by its inputs, so edits to the code reuse the dependency layer.
FROM python AS builder
COPY requirements/runtime.txt /src/requirements/runtime.txt
RUN --mount=type=secret,id=pip_ca,required=false \
    --mount=type=secret,id=pip_conf,required=false \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    venv-pip install --require-hashes -r /src/requirements/runtime.txt
COPY pyproject.toml README.md /src/
COPY qemu_mcp_http /src/qemu_mcp_http
# The package alone, built with the locked setuptools (no build isolation: nothing unpinned is fetched).
RUN --mount=type=secret,id=pip_ca,required=false \
    --mount=type=secret,id=pip_conf,required=false \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    venv-pip install --no-deps --no-build-isolation /src \
    && venv-pip uninstall -y -q pip setuptools \
    && /opt/qemu-mcp-http/bin/qemu-mcp-http --help >/dev/null

# novnc: the web console's noVNC files only (1.2 MB), taken out of Debian's package: installing it would
# pull in nodejs, websockify and numpy (+232 MB) that the server never runs.
FROM ${BASE_IMAGE} AS novnc
WORKDIR /tmp/novnc
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get download novnc \
    && dpkg-deb --fsys-tarfile novnc_*.deb | tar -x -C / ./usr/share/novnc \
    && rm -rf /var/lib/apt/lists/* /tmp/novnc/*.deb

# ---------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
# python3-venv is only needed to create the venv (builder stage); tini is PID 1: it forwards the stop
# signal to the server and reaps the daemonized QEMU processes that are re-parented to PID 1.
# qemu-efi-aarch64 ships three 64 MiB UEFI variable stores; the server uses AAVMF_CODE.fd and
# AAVMF_VARS.fd only, so the Microsoft/snakeoil secure-boot variants (and their descriptors) are skipped.
# hadolint ignore=DL3008
RUN printf '%s\n' \
        'path-exclude /usr/share/AAVMF/AAVMF_VARS.ms.fd' \
        'path-exclude /usr/share/AAVMF/AAVMF_VARS.snakeoil.fd' \
        'path-exclude /usr/share/qemu/firmware/40-edk2-aarch64-secure-enrolled.json' \
        'path-exclude /usr/share/qemu/firmware/50-edk2-aarch64-secure.json' \
        >/etc/dpkg/dpkg.cfg.d/qemu-mcp-http-excludes \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
        qemu-system-x86 qemu-system-arm qemu-efi-aarch64 qemu-utils openssh-client python3 tini \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log

# The user: uid 10001, in group kvm so that `--device /dev/kvm` works when the device is group kvm.  A
# device node keeps the host's numeric gid, so build with --build-arg KVM_GID=$(stat -c %g /dev/kvm), or
# run with --group-add <that gid> (deploy/README.md).
ARG KVM_GID=
RUN set -eu; \
    if ! getent group kvm >/dev/null; then groupadd --system ${KVM_GID:+--gid "$KVM_GID"} kvm; fi; \
    useradd --uid 10001 --user-group --groups kvm --home-dir /home/qemu --create-home \
        --shell /usr/sbin/nologin qemu; \
    install -d -o qemu -g qemu -m 0750 /var/lib/qemu; \
    install -d -o qemu -g qemu -m 0700 /home/qemu/.ssh

COPY --from=builder /opt/qemu-mcp-http /opt/qemu-mcp-http
# The web console's noVNC files (served at /console/static; nothing is fetched at run time).
COPY --from=novnc /usr/share/novnc /usr/share/novnc

# Configuration: QEMU_MCP_* variables only (qemu-mcp-http --help lists them).  Secrets are mounted files:
#   /run/secrets/qemu-mcp-token   the bearer token (QEMU_MCP_TOKEN_FILE)
#   /home/qemu/.ssh/              SSH keys and known_hosts for remote hosts
# (QEMU_MCP_TOKEN_FILE is the path of the mounted secret, not a secret: hence DL3064 is ignored.)
# hadolint ignore=DL3064
ENV PATH=/opt/qemu-mcp-http/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    QEMU_MCP_HOST=0.0.0.0 \
    QEMU_MCP_PORT=8000 \
    QEMU_MCP_VM_DIR=/var/lib/qemu \
    QEMU_MCP_TOKEN_FILE=/run/secrets/qemu-mcp-token \
    QEMU_MCP_SSH_KNOWN_HOSTS=/home/qemu/.ssh/known_hosts

USER 10001
WORKDIR /var/lib/qemu
VOLUME /var/lib/qemu
EXPOSE 8000

# /healthz is unauthenticated; it reports the version and the accelerator chosen (kvm or tcg).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request; port = os.environ.get('QEMU_MCP_PORT', '8000'); sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:' + port + '/healthz', timeout=4).status == 200 else 1)"]

# SIGINT: uvicorn's graceful shutdown (tini forwards it).  Running VMs die with the container.
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/bin/tini", "--", "qemu-mcp-http"]
CMD []
