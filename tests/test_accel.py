"""Choosing KVM only when it really runs guests."""

from __future__ import annotations

from qemu_mcp_http.vm.accel import arm64_probe_image, kvm_verdict, x86_probe_image


def test_verdict() -> None:
    assert kvm_verdict(0.05, 0.1)  # a healthy KVM
    assert kvm_verdict(0.9, 0.1)  # the 1 s floor covers QEMU's own startup
    assert not kvm_verdict(3.8, 0.1)  # nested KVM measured on this machine kind
    assert not kvm_verdict(None, 0.1)  # KVM did not finish or failed
    assert kvm_verdict(1.5, 1.0)


def test_probe_images() -> None:
    image = x86_probe_image()
    assert len(image) == 512 and image.endswith(b"\x55\xaa")
    assert len(arm64_probe_image()) % 4 == 0
