"""``ports`` and ``network`` arguments: parsing, canonical forms, QEMU hostfwd values (pure, no I/O)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qemu_mcp_http.errors import InvalidInput
from qemu_mcp_http.net.ports import (
    MAX_FORWARDS,
    NetworkSpec,
    PortForward,
    check_ports_network,
    parse_network,
    parse_ports,
)


def refused_ports(raw: object, **kwargs: Any) -> str:
    """Parse ``raw`` as ``ports``, expect InvalidInput on ``ports`` and give back its message."""
    with pytest.raises(InvalidInput) as info:
        parse_ports(raw, **kwargs)
    assert info.value.field == "ports"
    return info.value.message


def refused_network(raw: object) -> str:
    """Parse ``raw`` as ``network``, expect InvalidInput on ``network`` and give back its message."""
    with pytest.raises(InvalidInput) as info:
        parse_network(raw)
    assert info.value.field == "network"
    return info.value.message


# --------------------------------------------------------------------------- ports: good input


@pytest.mark.parametrize(
    ("text", "forward", "canonical"),
    [
        ("2222:22", PortForward(guest_port=22, host_port=2222), "2222:22"),
        ("22", PortForward(guest_port=22), "22"),
        ("53/udp", PortForward(guest_port=53, proto="udp"), "53/udp"),
        ("5353:53/udp", PortForward(guest_port=53, host_port=5353, proto="udp"), "5353:53/udp"),
        ("8080:80/tcp", PortForward(guest_port=80, host_port=8080), "8080:80"),
        ("80/tcp", PortForward(guest_port=80), "80"),
        (" 8080:80 ", PortForward(guest_port=80, host_port=8080), "8080:80"),
        ("1", PortForward(guest_port=1), "1"),
        ("65535:65535", PortForward(guest_port=65535, host_port=65535), "65535:65535"),
        ("022", PortForward(guest_port=22), "22"),
    ],
)
def test_good_forwards(text: str, forward: PortForward, canonical: str) -> None:
    """Every accepted form parses to its forward, whose spec() is the canonical form."""
    assert parse_ports([text]) == (forward,)
    assert forward.spec() == canonical


def test_no_ports() -> None:
    """None and [] are no forwards."""
    assert parse_ports(None) == ()
    assert parse_ports([]) == ()


def test_order_kept_and_protocols_independent() -> None:
    """Forwards keep their order; the same port number over tcp and udp is two different forwards."""
    forwards = parse_ports(["2222:22", "53", "53/udp", "8080:80", "8080:80/udp"])
    assert [f.spec() for f in forwards] == ["2222:22", "53", "53/udp", "8080:80", "8080:80/udp"]


@given(
    guest=st.integers(1, 65535),
    host=st.none() | st.integers(1, 65535),
    proto=st.sampled_from(["tcp", "udp"]),
)
def test_spec_round_trips(guest: int, host: int | None, proto: str) -> None:
    """spec() parses back to the same forward, for every port and protocol."""
    forward = PortForward(guest_port=guest, host_port=host, proto="udp" if proto == "udp" else "tcp")
    assert parse_ports([forward.spec()]) == (forward,)


def test_summary() -> None:
    """The summary holds the canonical form and the parts; a chosen-at-start host port is None."""
    assert PortForward(guest_port=22).summary() == {"spec": "22", "host_port": None, "guest_port": 22, "proto": "tcp"}
    assert parse_ports(["5353:53/udp"])[0].summary() == {
        "spec": "5353:53/udp",
        "host_port": 5353,
        "guest_port": 53,
        "proto": "udp",
    }


# --------------------------------------------------------------------------- ports: hostfwd


def test_hostfwd_values() -> None:
    """hostfwd gives QEMU's ``proto:addr:host-:guest`` value for fixed and chosen host ports."""
    assert PortForward(guest_port=22, host_port=2222).hostfwd("127.0.0.1", 2222) == "tcp:127.0.0.1:2222-:22"
    assert PortForward(guest_port=22).hostfwd("127.0.0.1", 40123) == "tcp:127.0.0.1:40123-:22"
    assert PortForward(guest_port=53, proto="udp").hostfwd("0.0.0.0", 5353) == "udp:0.0.0.0:5353-:53"
    assert PortForward(guest_port=80, host_port=8080).hostfwd("192.168.1.10", 8080) == "tcp:192.168.1.10:8080-:80"


@pytest.mark.parametrize(
    "address", ["", "localhost", "::1", "[::1]", "127.0.0.1,hostfwd=tcp::1-:1", "127.0.0.256", "127.0.0.1 "]
)
def test_hostfwd_refuses_bad_address(address: str) -> None:
    """Only an IPv4 address goes into hostfwd (never anything that could add -netdev options)."""
    with pytest.raises(ValueError, match="IPv4"):
        PortForward(guest_port=22).hostfwd(address, 2222)


@pytest.mark.parametrize("host_port", [0, -1, 65536, True])
def test_hostfwd_refuses_bad_host_port(host_port: int) -> None:
    """The host port chosen at start must be 1-65535."""
    with pytest.raises(ValueError, match="1-65535"):
        PortForward(guest_port=22).hostfwd("127.0.0.1", host_port)


def test_hostfwd_refuses_other_port_than_fixed() -> None:
    """A forward with a fixed host port cannot be bound elsewhere."""
    with pytest.raises(ValueError, match="fixed to host port 2222"):
        PortForward(guest_port=22, host_port=2222).hostfwd("127.0.0.1", 2223)


# --------------------------------------------------------------------------- ports: refusals


@pytest.mark.parametrize(
    "entry",
    [
        "",
        "ssh",
        "22:",
        ":22",
        "2222:22:22",
        "2222-22",
        "22/sctp",
        "22/UDP",
        "22/",
        "/udp",
        "-22",
        "+22",
        "22 /udp",
        "2222 : 22",
        "22.0",
        "0x16",
        "\u0662\u0662",  # Arabic-Indic digits: str.isdigit() but not [0-9]
        "\uff12\uff12",  # fullwidth digits
        "123456",
        "127.0.0.1:2222:22",
    ],
)
def test_bad_entries(entry: str) -> None:
    """Malformed entries are refused, naming the entry and the accepted forms."""
    message = refused_ports(["2222:22", entry])
    assert repr(entry) in message
    assert "'HOST:GUEST'" in message and "'GUEST'" in message and "/udp" in message


@pytest.mark.parametrize("entry", ["0", "65536", "0:22", "2222:0", "70000:22", "22:99999"])
def test_ports_out_of_range(entry: str) -> None:
    """Port 0 and ports over 65535 are refused, naming the entry and the range."""
    message = refused_ports([entry])
    assert repr(entry) in message and "1-65535" in message


def test_long_entry_is_cut_in_message() -> None:
    """A long bad entry is shown cut short."""
    message = refused_ports(["x" * 500])
    assert "x" * 40 + "..." in message and "x" * 41 not in message


@pytest.mark.parametrize("entry", [22, 22.0, True, None, ["22"], {"host": 2222, "guest": 22}])
def test_non_string_entries(entry: object) -> None:
    """Every entry must be a string, even a plain port number."""
    assert "is not a string" in refused_ports([entry])


@pytest.mark.parametrize("raw", ["2222:22", 22, {"ssh": "2222:22"}, True])
def test_ports_not_a_list(raw: object) -> None:
    """``ports`` must be a list, even for one forward."""
    message = refused_ports(raw)
    assert "must be a list" in message and "'2222:22'" in message


def test_too_many_forwards() -> None:
    """More forwards than the limit are refused (default 32, or the configured limit)."""
    assert len(parse_ports([str(p) for p in range(1, MAX_FORWARDS + 1)])) == MAX_FORWARDS
    assert f"at most {MAX_FORWARDS}" in refused_ports([str(p) for p in range(1, MAX_FORWARDS + 2)])
    assert "at most 2" in refused_ports(["1", "2", "3"], max_forwards=2)


@pytest.mark.parametrize(
    ("raw", "phrase"),
    [
        (["2222:22", "2222:80"], "both use host port 2222/tcp"),
        (["5353:53/udp", "5353:54/udp"], "both use host port 5353/udp"),
        (["2222:22", "22"], "both forward to guest port 22/tcp"),
        (["2222:22", "2223:22"], "both forward to guest port 22/tcp"),
        (["53/udp", "5353:53/udp"], "both forward to guest port 53/udp"),
        (["22", "22"], "both forward to guest port 22/tcp"),
        (["22", "22/tcp"], "both forward to guest port 22/tcp"),
    ],
)
def test_duplicates(raw: list[str], phrase: str) -> None:
    """The same host port and protocol twice, or the same guest port and protocol twice, is refused."""
    assert phrase in refused_ports(raw)


# --------------------------------------------------------------------------- network


@pytest.mark.parametrize(
    ("raw", "spec"),
    [
        (None, NetworkSpec()),
        ("user", NetworkSpec(mode="user")),
        ("none", NetworkSpec(mode="none")),
        ("bridge=br0", NetworkSpec(mode="bridge", bridge="br0")),
        ("bridge=virbr0", NetworkSpec(mode="bridge", bridge="virbr0")),
        (" bridge = br-lan.10 ", NetworkSpec(mode="bridge", bridge="br-lan.10")),
        ("bridge=" + "b" * 15, NetworkSpec(mode="bridge", bridge="b" * 15)),
        ("bridge=_x", NetworkSpec(mode="bridge", bridge="_x")),
    ],
)
def test_good_networks(raw: str | None, spec: NetworkSpec) -> None:
    """``user`` (also the default), ``none`` and ``bridge=<name>`` parse; spec() gives the canonical form back."""
    parsed = parse_network(raw)
    assert parsed == spec
    assert parse_network(parsed.spec()) == parsed


@pytest.mark.parametrize(
    "raw",
    ["", "nat", "USER", "User", "tap=tap0", "bridge", "br0", "bridge:br0", "socket=x", "user,hostfwd=tcp::1-:22"],
)
def test_bad_networks(raw: str) -> None:
    """Anything but the three forms is refused with the accepted forms."""
    message = refused_network(raw)
    assert "'user'" in message and "'none'" in message and "'bridge=<name>'" in message


@pytest.mark.parametrize(
    "name",
    ["", "-br0", "b" * 16, "br 0", "br/0", "br:0", ".", "..", "br0,helper=/tmp/evil", "brü", "br\n0"],
)
def test_bad_bridge_names(name: str) -> None:
    """Bridge names Linux would refuse (or that could add -netdev options) are refused with the rule."""
    message = refused_network(f"bridge={name}")
    assert "1-15 characters" in message and "'bridge=br0'" in message


@pytest.mark.parametrize("raw", [5, True, ["user"], {"mode": "user"}])
def test_network_not_a_string(raw: object) -> None:
    """``network`` must be a string."""
    assert "must be a string" in refused_network(raw)


def test_network_json_and_summary() -> None:
    """to_json / from_json round-trip through JSON; the summary names mode and bridge."""
    for spec in (NetworkSpec(), NetworkSpec(mode="none"), NetworkSpec(mode="bridge", bridge="br0")):
        assert NetworkSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert NetworkSpec(mode="bridge", bridge="br0").summary() == {"mode": "bridge", "bridge": "br0"}
    assert NetworkSpec().summary() == {"mode": "user", "bridge": None}


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"mode": "nat"},
        {"mode": "bridge"},
        {"mode": "user", "bridge": "br0"},
        {"mode": "bridge", "bridge": "-x"},
        {"mode": "bridge", "bridge": 5},
        {"mode": "user", "extra": 1},
    ],
)
def test_network_from_json_refuses_bad_data(data: Any) -> None:
    """Stored data that is not a network this version writes is a ValueError."""
    with pytest.raises(ValueError):
        NetworkSpec.from_json(data)


@pytest.mark.parametrize(
    ("mode", "bridge"), [("bridge", None), ("user", "br0"), ("none", "br0"), ("bridge", "bad name"), ("nat", None)]
)
def test_network_spec_invariants(mode: Any, bridge: str | None) -> None:
    """A NetworkSpec has a valid bridge name exactly when its mode is ``bridge``."""
    with pytest.raises(ValueError):
        NetworkSpec(mode=mode, bridge=bridge)


def test_ports_need_user_network() -> None:
    """Forwards work through user networking only; without forwards any network is fine."""
    ports = parse_ports(["2222:22"])
    check_ports_network(ports, NetworkSpec())
    check_ports_network((), NetworkSpec(mode="none"))
    check_ports_network((), NetworkSpec(mode="bridge", bridge="br0"))
    for network in (NetworkSpec(mode="none"), NetworkSpec(mode="bridge", bridge="br0")):
        with pytest.raises(InvalidInput) as info:
            check_ports_network(ports, network)
        assert info.value.field == "ports"
        assert "network 'user'" in info.value.message and repr(network.spec()) in info.value.message
