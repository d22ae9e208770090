"""cloud-init arguments, rendering, the NoCloud seed ISO and SHA-512 crypt (pure; checked with real tools).

Real tools: ``ssh-keygen`` makes the keys and prints the fingerprints,
``openssl passwd -6`` and the system's crypt(3) (libxcrypt, through perl) check
SHA-512 crypt, ``xorriso`` and ``blkid`` read the seed ISO.  cloud-init's own
reader and schema validator run too:
Debian 12's cloud-init package, unpacked into the cache (``apt-get download``: nothing is installed), run by
this venv's Python, whose test extras hold cloud-init's dependencies (``QEMU_MCP_TEST_CLOUD_INIT_PYTHON``
may name another command that runs a Python which imports cloudinit).
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pycdlib
import pytest

from qemu_mcp_http.errors import InvalidInput
from qemu_mcp_http.guest.cloudinit import (
    FIELDS,
    MAX_KEY_LINE_BYTES,
    MAX_KEYS,
    MAX_NETWORK_CONFIG_BYTES,
    MAX_PASSWORD_BYTES,
    CloudInitConfig,
    build_seed_iso,
    hostname_for,
    parse_cloud_init,
    render_meta_data,
    render_network_config,
    render_user_data,
)
from qemu_mcp_http.guest.sha512crypt import sha512_crypt

UUID = "0f3c6a52-8c7e-4b7e-9a55-3f1d2b4c6e7f"
PASSWORD = "correct horse battery staple"
NETWORK_V2: dict[str, Any] = {"version": 2, "ethernets": {"eth0": {"match": {"name": "e*"}, "dhcp4": True}}}


# --------------------------------------------------------------------------- real keys from ssh-keygen


@dataclass(frozen=True)
class Key:
    line: str  # the .pub file's line, without its newline
    type: str
    fingerprint: str  # as ssh-keygen -l prints it
    comment: str


def _keygen(directory: Path, kind: str, comment: str, bits: str | None = None) -> Key:
    """A fresh key pair made by ssh-keygen; its public line and ssh-keygen's own fingerprint of it."""
    path = directory / kind
    argv = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path)]
    if bits:
        argv += ["-b", bits]
    subprocess.run(argv, check=True, capture_output=True)
    line = (directory / f"{kind}.pub").read_text().strip()
    listed = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", f"{path}.pub"], check=True, capture_output=True)
    fingerprint = listed.stdout.decode().split()[1]
    return Key(line=line, type=line.split()[0], fingerprint=fingerprint, comment=comment)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Key]:
    """An ed25519, an RSA and an ECDSA key pair (the private halves stay in the temporary directory)."""
    directory = tmp_path_factory.mktemp("keys")
    return {
        "ed25519": _keygen(directory, "ed25519", "ops@laptop"),
        "rsa": _keygen(directory, "rsa", "ci bot (rsa)", bits="2048"),
        "ecdsa": _keygen(directory, "ecdsa", "no"),
    }


@pytest.fixture(scope="module")
def private_key(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The private half of an ed25519 key, as a client might paste it by mistake."""
    directory = tmp_path_factory.mktemp("private")
    _keygen(directory, "ed25519", "oops")
    return (directory / "ed25519").read_text()


def refused(raw: object, field: str, **kwargs: Any) -> str:
    """Parse ``raw``, expect InvalidInput on ``field`` and give back its message."""
    with pytest.raises(InvalidInput) as info:
        parse_cloud_init(raw, **kwargs)
    assert info.value.field == field, info.value.message
    return info.value.message


# --------------------------------------------------------------------------- SHA-512 crypt

#: The test vectors of Drepper's "Unix crypt using SHA-256 and SHA-512" (the SHA-512 ones).
SPEC_VECTORS = [
    (
        "$6$saltstring",
        "Hello world!",
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1",
    ),
    (
        "$6$rounds=10000$saltstringsaltstring",
        "Hello world!",
        "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/"
        "YTBmSK6H9qs/y3RnOaw5v.",
    ),
    (
        "$6$rounds=5000$toolongsaltstring",
        "This is just a test",
        "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQzQ3glMhwllF7oGDZxUhx1yxdYcz/"
        "e1JSbq3y6JMxxl8audkUEm0",
    ),
    (
        "$6$rounds=1400$anotherlongsaltstring",
        "a very much longer text to encrypt.  This one even stretches over morethan one line.",
        "$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wPvMxQ6Fm7I6IoYN3CmLs66x9t0oSwbtEW7o7UmJE"
        "iDwGqd8p4ur1",
    ),
    (
        "$6$rounds=77777$short",
        "we have a short salt string but not a short password",
        "$6$rounds=77777$short$WuQyW2YR.hBNpjjRhpYD/ifIw05xdfeEyQoMxIXbkvr0gge1a1x3yRULJ5CCaUeOxFmtlcGZelFl5CxtgfiAc0",
    ),
    (
        "$6$rounds=123456$asaltof16chars..",
        "a short string",
        "$6$rounds=123456$asaltof16chars..$BtCwjqMJGx5hrJhZywWvt0RLE8uZ4oPwcelCjmw2kSYu.Ec6ycULevoBK25fs2xXgMNrCzIMVcg"
        "EJAstJeonj1",
    ),
    (
        "$6$rounds=10$roundstoolow",
        "the minimum number is still observed",
        "$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1xhLsPuWGsUSklZt58jaTfF4ZEQpyUNGc0dqbpBYYBa"
        "HHrsX.",
    ),
]


def _setting(setting: str) -> tuple[str, int]:
    """``$6$[rounds=N$]salt`` → (salt, rounds)."""
    parts = setting.split("$")[2:]
    if parts[0].startswith("rounds="):
        return parts[1], int(parts[0].removeprefix("rounds="))
    return parts[0], 5000


@pytest.mark.parametrize(("setting", "password", "expected"), SPEC_VECTORS)
def test_sha512_crypt_specification_vectors(setting: str, password: str, expected: str) -> None:
    """Every SHA-512 vector of the specification; a salt over 16 characters is cut, rounds below 1000 are raised.

    The one vector that spells out the default ``rounds=5000`` compares without
    that prefix: sha512_crypt writes ``rounds=`` only for non-default rounds.
    """
    salt, rounds = _setting(setting)
    got = sha512_crypt(password, salt, rounds)
    assert got == expected.replace("$rounds=5000$", "$")


def openssl_crypt(password: str, salt: str, rounds: int = 5000) -> str:
    """What ``openssl passwd -6`` makes of the same password, salt and rounds."""
    spec = salt if rounds == 5000 else f"rounds={rounds}${salt}"
    done = subprocess.run(
        ["openssl", "passwd", "-6", "-salt", spec, "-stdin"],
        input=password.encode("utf-8") + b"\n",
        capture_output=True,
        check=True,
    )
    return done.stdout.decode().strip()


def libxcrypt_crypt(password: str, setting: str) -> str:
    """What the system's crypt(3) (libxcrypt, through perl) makes of the password and a ``$6$...`` setting."""
    done = subprocess.run(
        ["perl", "-e", "print crypt($ARGV[0], $ARGV[1])", "--", password.encode(), setting],
        capture_output=True,
        check=True,
    )
    return done.stdout.decode()


@pytest.mark.parametrize(
    "password",
    [
        "",
        "x",
        "p" * 63,
        "p" * 64,
        "p" * 65,
        "q" * 127,
        "q" * 128,
        "q" * 129,
        "r" * 300,
        "pässwörd ✓ 密码",
        "with spaces and $ and : and \\",
    ],
    ids=lambda p: f"len{len(p)}" if len(set(p)) == 1 else p[:8],
)
def test_sha512_crypt_matches_libxcrypt_and_openssl(password: str) -> None:
    """Passwords around the 64-byte block boundaries and UTF-8 ones hash as the system's crypt(3) and openssl do.

    openssl cuts passwords to 256 bytes and refuses an empty one, so it only
    checks the others.
    """
    got = sha512_crypt(password, "Zx9./abcDEF01234")
    assert got == libxcrypt_crypt(password, "$6$Zx9./abcDEF01234")
    if 0 < len(password.encode()) <= 256:
        assert got == openssl_crypt(password, "Zx9./abcDEF01234")


@pytest.mark.parametrize("rounds", [1000, 4999, 5001, 12345])
def test_sha512_crypt_rounds_match_openssl(rounds: int) -> None:
    """Non-default rounds are written as ``rounds=N$`` and hash as openssl and crypt(3) hash them."""
    got = sha512_crypt(PASSWORD, "saltsalt", rounds)
    assert got.startswith(f"$6$rounds={rounds}$saltsalt$")
    assert got == openssl_crypt(PASSWORD, "saltsalt", rounds)
    assert got == libxcrypt_crypt(PASSWORD, f"$6$rounds={rounds}$saltsalt")


def test_sha512_crypt_random_salt() -> None:
    """Without a salt: 16 random characters of ./0-9A-Za-z, different each time, and openssl agrees on the hash."""
    first, second = sha512_crypt(PASSWORD), sha512_crypt(PASSWORD)
    assert first != second
    for hashed in (first, second):
        _, kind, salt, encoded = hashed.split("$")
        assert kind == "6"
        assert len(salt) == 16
        assert set(salt) <= set("./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
        assert len(encoded) == 86
        assert hashed == openssl_crypt(PASSWORD, salt)


@pytest.mark.parametrize("salt", ["", "bad$salt", "colon:", "späť", "new\nline"])
def test_sha512_crypt_bad_salt(salt: str) -> None:
    """A salt outside ./0-9A-Za-z (or empty) is a programming error: ValueError."""
    with pytest.raises(ValueError, match="salt"):
        sha512_crypt(PASSWORD, salt)


# --------------------------------------------------------------------------- parse_cloud_init: good input


def test_full_config(keys: dict[str, Key]) -> None:
    """User, keys, password and hostname are kept; the password only as a SHA-512 crypt hash openssl agrees with."""
    cfg = parse_cloud_init(
        {
            "user": "ops",
            "ssh_authorized_keys": [keys["ed25519"].line, keys["rsa"].line],
            "password": PASSWORD,
            "hostname": "web.example.com",
        }
    )
    assert cfg.user == "ops"
    assert cfg.ssh_authorized_keys == (keys["ed25519"].line, keys["rsa"].line)
    assert cfg.hostname == "web.example.com"
    assert cfg.password_set
    assert cfg.password_hash is not None
    salt = cfg.password_hash.split("$")[2]
    assert cfg.password_hash == openssl_crypt(PASSWORD, salt)
    assert cfg.user_data is None and cfg.network_config is None


def test_empty_and_null_fields() -> None:
    """``{}`` and JSON nulls are an empty configuration (the distribution's default user, locked)."""
    assert parse_cloud_init({}) == CloudInitConfig()
    assert parse_cloud_init(dict.fromkeys(FIELDS)) == CloudInitConfig()
    assert parse_cloud_init({"ssh_authorized_keys": []}) == CloudInitConfig()


def test_keys_are_normalised(keys: dict[str, Key]) -> None:
    """A .pub line keeps its comment (spaces inside too); surrounding blanks, its newline and extra gaps go."""
    kind, blob = keys["ed25519"].line.split()[:2]
    cfg = parse_cloud_init({"ssh_authorized_keys": [f"  {kind}   {blob}  ops at  laptop \n", f"{keys['rsa'].line}\n"]})
    assert cfg.ssh_authorized_keys == (f"{kind} {blob} ops at  laptop", keys["rsa"].line)
    bare = parse_cloud_init({"ssh_authorized_keys": [f"{kind} {blob}"]})
    assert bare.ssh_authorized_keys == (f"{kind} {blob}",)
    assert bare.summary()["ssh_authorized_keys"][0]["comment"] is None


@pytest.mark.parametrize("user", ["ops", "_svc", "a", "deploy-bot_2", "a" * 32, "no"])
def test_good_users(user: str) -> None:
    """POSIX user names are accepted as given."""
    assert parse_cloud_init({"user": user}).user == user


@pytest.mark.parametrize("hostname", ["web", "Web-1", "1web", "a" * 63, "web.example.com", "x1.y2.z3", "a.b-c.d"])
def test_good_hostnames(hostname: str) -> None:
    """RFC 1123 host names, single label or dotted, are accepted as given."""
    assert parse_cloud_init({"hostname": hostname}).hostname == hostname


@pytest.mark.parametrize(
    "user_data",
    [
        "#cloud-config\npackages: [nginx]\n",
        "#!/bin/sh\necho hi\n",
        "#include\nhttps://example.com/cloud.cfg\n",
        "#include-once\nhttps://example.com/cloud.cfg\n",
        "#cloud-boothook\n#!/bin/sh\necho early\n",
        "#part-handler\ndef list_types(): return []\n",
        "#cloud-config-archive\n- type: text/cloud-config\n",
        "## template: jinja\n#cloud-config\nhostname: {{ v1.local_hostname }}\n",
        "\n  #CLOUD-CONFIG\n{}\n",
        'Content-Type: multipart/mixed; boundary="X"\nMIME-Version: 1.0\n\n'
        "--X\nContent-Type: text/cloud-config\n\n{}\n--X--\n",
        "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=X\n\n--X--\n",
        "From: ops\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=X\n\n--X--\n",
        "#cloud-config\nruncmd: ['echo héllo wörld ✓']\n",
    ],
    ids=lambda text: text.strip().splitlines()[0][:24],
)
def test_good_user_data(user_data: str) -> None:
    """First lines cloud-init dispatches on (leading blanks and case ignored, as cloud-init does) are accepted."""
    cfg = parse_cloud_init({"user_data": user_data, "hostname": "web"})
    assert cfg.user_data == user_data
    assert cfg.custom_user_data


def test_user_data_limit_is_in_utf8_bytes() -> None:
    """The user-data limit counts UTF-8 bytes: exactly at the limit passes, one byte more is refused."""
    text = "#cloud-config\n#" + "é" * 40  # 15 + 80 bytes
    assert parse_cloud_init({"user_data": text}, max_user_data_bytes=95).user_data == text
    message = refused({"user_data": text}, "cloud_init.user_data", max_user_data_bytes=94)
    assert "95 bytes" in message and "94" in message


@pytest.mark.parametrize(
    "network_config",
    [
        NETWORK_V2,
        {"network": {"version": 1, "config": [{"type": "physical", "name": "eth0", "subnets": [{"type": "dhcp"}]}]}},
        "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n",
    ],
    ids=["v2-object", "v1-wrapped", "v2-yaml-string"],
)
def test_good_network_config(network_config: dict[str, Any] | str) -> None:
    """Network config v1/v2 as an object, or as YAML text, is kept as given."""
    assert parse_cloud_init({"network_config": network_config}).network_config == network_config


# --------------------------------------------------------------------------- parse_cloud_init: refusals


@pytest.mark.parametrize("raw", [None, "user=ops", ["ops"], 5, True])
def test_not_an_object(raw: object) -> None:
    """Anything but a JSON object is refused with an example of one."""
    assert "ssh_authorized_keys" in refused(raw, "cloud_init")


def test_unknown_fields() -> None:
    """Unknown fields are named, with the accepted ones; a misspelled secret is named by its key only."""
    message = refused({"user": "ops", "pasword": "hunter2-secret", "sshkeys": []}, "cloud_init")
    assert "'pasword'" in message and "'sshkeys'" in message
    assert all(name in message for name in FIELDS)
    assert "hunter2-secret" not in message


@pytest.mark.parametrize("user", ["", "Ops", "1ops", "-ops", "a" * 33, "o ps", "ops;rm", "ops\n", "é", 5, ["ops"]])
def test_bad_users(user: object) -> None:
    """Non-POSIX user names are refused with the rule and an example."""
    assert "'ops'" in refused({"user": user}, "cloud_init.user")


def test_root_user_refused() -> None:
    """``root`` is refused: cloud-init would skip the existing user and its password."""
    assert "already exists" in refused({"user": "root"}, "cloud_init.user")


@pytest.mark.parametrize("raw", ["ssh-ed25519 AAAA", {"key": "x"}, 5])
def test_keys_not_a_list(raw: object) -> None:
    """``ssh_authorized_keys`` must be a list, even for one key."""
    assert "must be a list" in refused({"ssh_authorized_keys": raw}, "cloud_init.ssh_authorized_keys")


def _bad_key_cases(keys: dict[str, Key]) -> dict[str, tuple[object, str]]:
    """Name → (bad key entry, a phrase its message must hold)."""
    ed = keys["ed25519"].line
    kind, blob = ed.split()[:2]
    rsa_blob = keys["rsa"].line.split()[1]
    return {
        "not-a-string": (5, "must be a string"),
        "empty": ("", "not an OpenSSH public key line"),
        "type-only": ("ssh-ed25519", "not an OpenSSH public key line"),
        "blob-only": (blob, "not an OpenSSH public key line"),
        "truncated-blob": (f"{kind} {blob[:20]}", "not an OpenSSH public key line"),
        "not-base64": (f"{kind} !!!!notbase64!!!! me@x", "not an OpenSSH public key line"),
        "type-mismatch": (f"ssh-rsa {blob} me@x", "not an OpenSSH public key line"),
        "other-type-blob": (f"ssh-ed25519 {rsa_blob}", "not an OpenSSH public key line"),
        "inner-newline": (f"{ed}\n{keys['rsa'].line}", "newline"),
        "carriage-return": (f"{kind} {blob}\rme@x", "newline"),
        "nul": (f"{kind} {blob} me\0x", "NUL"),
        "escape": (f"{kind} {blob} \x1b[31mred", "control character"),
        "options": (f'from="10.0.0.1",no-pty {ed}', "options"),
        "certificate": (f"ssh-ed25519-cert-v01@openssh.com {blob}", "certificates"),
        "dsa": ("ssh-dss AAAAB3NzaC1kc3MAAACBAP me@x", "DSA"),
        "ed448": ("ssh-ed448 AAAACXNzaC1lZDQ0OAAAADk me@x", "key type OpenSSH accepts"),
        "too-long": (f"{ed} {'c' * MAX_KEY_LINE_BYTES}", f"longer than {MAX_KEY_LINE_BYTES}"),
        "surrogate": (f"{kind} {blob} \udc80", "lone surrogate"),
    }


BAD_KEY_NAMES = [
    "not-a-string",
    "empty",
    "type-only",
    "blob-only",
    "truncated-blob",
    "not-base64",
    "type-mismatch",
    "other-type-blob",
    "inner-newline",
    "carriage-return",
    "nul",
    "escape",
    "options",
    "certificate",
    "dsa",
    "ed448",
    "too-long",
    "surrogate",
]


@pytest.mark.parametrize("case", BAD_KEY_NAMES)
def test_bad_keys(keys: dict[str, Key], case: str) -> None:
    """Each bad key line is refused, named by its position in the list, never echoed."""
    bad, phrase = _bad_key_cases(keys)[case]
    message = refused({"ssh_authorized_keys": [keys["ed25519"].line, bad]}, "cloud_init.ssh_authorized_keys")
    assert "ssh_authorized_keys[1]" in message
    assert phrase in message
    for key in keys.values():
        assert key.line.split()[1][12:40] not in message


def test_private_key_refused_not_echoed(private_key: str) -> None:
    """A pasted private key is refused as such (asyncssh alone would take its public half) and never echoed."""
    message = refused({"ssh_authorized_keys": [private_key]}, "cloud_init.ssh_authorized_keys")
    assert "private key" in message
    body = private_key.splitlines()[1]
    assert body[:20] not in message


def test_private_key_in_comment_is_fine(keys: dict[str, Key]) -> None:
    """Only a private key's armour is refused, not a comment that mentions one."""
    line = f"{keys['ed25519'].line} my PRIVATE KEY is elsewhere"
    assert parse_cloud_init({"ssh_authorized_keys": [line]}).ssh_authorized_keys == (line,)


@pytest.mark.parametrize(
    "pasted",
    ["-----BEGIN RSA PRIVATE KEY-----", "PuTTY-User-Key-File-3: ssh-ed25519", "-----BEGIN PRIVATE KEY----- MIIE"],
)
def test_other_private_key_forms_refused(pasted: str) -> None:
    """PEM and PuTTY private keys (or their first line) are refused as private keys."""
    assert "private key" in refused({"ssh_authorized_keys": [pasted]}, "cloud_init.ssh_authorized_keys")


def test_too_many_keys(keys: dict[str, Key]) -> None:
    """More than MAX_KEYS entries are refused before any is parsed."""
    message = refused(
        {"ssh_authorized_keys": [keys["ed25519"].line] * (MAX_KEYS + 1)}, "cloud_init.ssh_authorized_keys"
    )
    assert f"at most {MAX_KEYS}" in message


def test_duplicate_key(keys: dict[str, Key]) -> None:
    """The same key twice (even with another comment) is refused, naming both positions."""
    kind, blob = keys["ed25519"].line.split()[:2]
    raw = [keys["ed25519"].line, keys["rsa"].line, f"{kind} {blob} other-comment"]
    message = refused({"ssh_authorized_keys": raw}, "cloud_init.ssh_authorized_keys")
    assert "ssh_authorized_keys[2]" in message and "ssh_authorized_keys[0]" in message


@pytest.mark.parametrize(
    ("password", "phrase"),
    [
        ("", "non-empty"),
        (12345678, "non-empty string"),
        (["secret-pass"], "non-empty string"),
        ("secret\0pass", "NUL"),
        ("s" * (MAX_PASSWORD_BYTES + 1), f"longer than {MAX_PASSWORD_BYTES}"),
        ("é" * (MAX_PASSWORD_BYTES // 2 + 1), f"longer than {MAX_PASSWORD_BYTES}"),
        ("secret\udc80pass", "lone surrogate"),
    ],
    ids=["empty", "number", "list", "nul", "too-long", "too-long-utf8", "surrogate"],
)
def test_bad_passwords(password: object, phrase: str) -> None:
    """Bad passwords are refused without the password in the message."""
    message = refused({"user": "ops", "password": password}, "cloud_init.password")
    assert phrase in message
    if isinstance(password, str) and password:
        assert password not in message and "secret" not in message


def test_password_needs_user() -> None:
    """A password without ``user`` is refused, saying to add one, and not echoed."""
    message = refused({"password": PASSWORD, "ssh_authorized_keys": []}, "cloud_init.password")
    assert "'user'" in message and PASSWORD not in message


@pytest.mark.parametrize(
    "hostname",
    [
        "",
        "-web",
        "web-",
        "a" * 64,
        "web_1",
        "web.",
        ".web",
        "web..example",
        "1.2.3.4",
        "123",
        "wéb",
        "a b",
        7,
        ["web"],
        ".".join(["a" * 63] * 4) + ".com",
    ],
    ids=lambda h: repr(h)[:20],
)
def test_bad_hostnames(hostname: object) -> None:
    """Anything but an RFC 1123 host name (or one ending in an all-digit label) is refused with an example."""
    assert "'web.example.com'" in refused({"hostname": hostname}, "cloud_init.hostname")


@pytest.mark.parametrize(
    ("user_data", "phrase"),
    [
        (5, "must be a string"),
        ({"packages": ["nginx"]}, "must be a string"),
        ("", "would ignore it"),
        ("packages: [nginx]\n", "would ignore it"),
        ("#cloudconfig\n{}", "would ignore it"),
        ("# cloud-config\n{}", "would ignore it"),
        ("echo hi\n", "would ignore it"),
        ("Content-Type: multipart/mixed; boundary=X\n\n--X--\n", "would ignore it"),
        ("#cloud-config\n\0", "NUL"),
        ("#cloud-config\n# \udc80", "lone surrogate"),
    ],
    ids=[
        "number",
        "object",
        "empty",
        "no-header",
        "typo",
        "space",
        "plain-text",
        "mime-no-version",
        "nul",
        "surrogate",
    ],
)
def test_bad_user_data(user_data: object, phrase: str) -> None:
    """User data cloud-init would ignore, or that no file can carry, is refused; the accepted first lines are listed."""
    message = refused({"user_data": user_data}, "cloud_init.user_data")
    assert phrase in message
    if phrase == "would ignore it":
        assert "#cloud-config" in message and "#!" in message


def test_user_data_content_not_echoed() -> None:
    """A refused user-data's content (which may hold secrets) is not in the message."""
    message = refused({"user_data": "chpasswd: {list: 'root:TopSecret'}\n"}, "cloud_init.user_data")
    assert "TopSecret" not in message


def test_oversized_user_data() -> None:
    """User data over the default 64 KiB is refused with its size and the limit."""
    message = refused({"user_data": "#cloud-config\n" + "#" * 65536}, "cloud_init.user_data")
    assert "65550 bytes" in message and "65536" in message


@pytest.mark.parametrize(
    ("mixture", "named"),
    [
        ({"user": "ops"}, "user"),
        ({"ssh_authorized_keys": "KEY"}, "ssh_authorized_keys"),
        ({"user": "ops", "password": PASSWORD}, "user, password"),
    ],
)
def test_user_data_mixture_refused(keys: dict[str, Key], mixture: dict[str, Any], named: str) -> None:
    """user_data with user / keys / password is refused: it replaces the generated #cloud-config."""
    raw = {k: ([keys["ed25519"].line] if v == "KEY" else v) for k, v in mixture.items()}
    message = refused({**raw, "user_data": "#cloud-config\n{}\n"}, "cloud_init.user_data")
    assert f"combined with {named}" in message
    assert "replaces the generated" in message
    assert PASSWORD not in message


@pytest.mark.parametrize(
    ("network_config", "phrase"),
    [
        ({"ethernets": {}}, "version 1 or 2"),
        ({"version": 3}, "version 1 or 2"),
        ({"version": "2"}, "version 1 or 2"),
        ({"version": True}, "version 1 or 2"),
        ({"network": "v2"}, "version 1 or 2"),
        ({"version": 2, "x": {1, 2}}, "plain JSON"),
        ({"version": 2, "mtu": float("nan")}, "plain JSON"),
        ({"version": 2, "name": "\udc80"}, "plain JSON"),
        ([NETWORK_V2], "must be an object"),
        (2, "must be an object"),
        ("", "non-empty"),
        ("  \n", "non-empty"),
        ("version: 2\0", "without NUL"),
        ("version: 2 # \udc80", "lone surrogate"),
        ("#" * (MAX_NETWORK_CONFIG_BYTES + 1), "at most"),
        ({"version": 2, "pad": "x" * MAX_NETWORK_CONFIG_BYTES}, "at most"),
    ],
    ids=[
        "no-version",
        "version-3",
        "version-string",
        "version-bool",
        "network-not-object",
        "not-json",
        "nan",
        "surrogate-in-object",
        "list",
        "number",
        "empty",
        "blank",
        "nul",
        "surrogate",
        "string-too-big",
        "object-too-big",
    ],
)
def test_bad_network_config(network_config: object, phrase: str) -> None:
    """Network config that is not v1/v2, not plain JSON/text, or too large is refused."""
    assert phrase in refused({"network_config": network_config}, "cloud_init.network_config")


# --------------------------------------------------------------------------- summary, repr, vm.json


def test_summary_fingerprints_match_ssh_keygen(keys: dict[str, Key]) -> None:
    """The summary shows each key's type, ssh-keygen's SHA256 fingerprint and the comment; no secrets."""
    cfg = parse_cloud_init(
        {
            "user": "ops",
            "ssh_authorized_keys": [k.line for k in keys.values()],
            "password": PASSWORD,
            "hostname": "web",
            "network_config": NETWORK_V2,
        }
    )
    summary = cfg.summary()
    assert summary["ssh_authorized_keys"] == [
        {"type": k.type, "fingerprint": k.fingerprint, "comment": k.comment} for k in keys.values()
    ]
    assert summary["user"] == "ops" and summary["hostname"] == "web"
    assert summary["password_set"] is True
    assert summary["custom_user_data"] is False and summary["user_data_bytes"] is None
    assert summary["custom_network_config"] is True
    assert summary["network_config_bytes"] == len(render_network_config(cfg).encode())
    assert cfg.password_hash is not None
    for text in (json.dumps(summary), repr(cfg), str(cfg), json.dumps(cfg.to_json())):
        assert PASSWORD not in text
        assert cfg.password_hash not in text
        assert cfg.password_hash.split("$")[3][:20] not in text


def test_summary_of_custom_user_data() -> None:
    """Custom user data shows as a flag and its UTF-8 size, never its content (neither does repr)."""
    text = "#cloud-config\nruncmd: ['echo ✓ secret-token']\n"
    cfg = parse_cloud_init({"user_data": text})
    summary = cfg.summary()
    assert summary["custom_user_data"] is True
    assert summary["user_data_bytes"] == len(text.encode())
    assert summary["password_set"] is False and summary["custom_network_config"] is False
    assert "secret-token" not in json.dumps(summary) and "secret-token" not in repr(cfg)


def test_json_round_trip_keeps_all_but_the_hash(keys: dict[str, Key]) -> None:
    """vm.json keeps everything but the hash; ``password_set`` survives, and the summary is the same."""
    cfg = parse_cloud_init(
        {
            "user": "ops",
            "ssh_authorized_keys": [keys["ed25519"].line],
            "password": PASSWORD,
            "hostname": "web",
            "network_config": NETWORK_V2,
        }
    )
    stored = json.loads(json.dumps(cfg.to_json()))
    assert "password_hash" not in stored and "password" not in stored
    back = CloudInitConfig.from_json(stored)
    assert back.password_hash is None and back.password_set
    assert back.summary() == cfg.summary()
    assert back.to_json() == cfg.to_json()
    custom = parse_cloud_init({"user_data": "#!/bin/sh\necho ✓\n", "network_config": "version: 2\n"})
    assert CloudInitConfig.from_json(json.loads(json.dumps(custom.to_json()))) == custom


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"user": "ops", "password_hash": "$6$x$y"},
        {"password": "x"},
        {"user": "Bad User"},
        {"ssh_authorized_keys": ["ssh-ed25519 AAAA"]},
        {"password_set": "yes"},
        {"user_data": "not cloud-init"},
        {"network_config": {"version": 9}},
    ],
    ids=["list", "hash", "password", "user", "key", "password_set", "user_data", "network_config"],
)
def test_from_json_refuses_bad_data(data: Any) -> None:
    """Stored data that is not a configuration this version writes is a ValueError, as VMDefinition.from_json."""
    with pytest.raises(ValueError, match="not a cloud-init configuration"):
        CloudInitConfig.from_json(data)


def test_hash_field_refuses_a_password() -> None:
    """``password_hash`` only takes a SHA-512 crypt hash: putting a password there is a ValueError."""
    with pytest.raises(ValueError, match=r"\$6\$"):
        CloudInitConfig(user="ops", password_hash=PASSWORD)
    assert CloudInitConfig(user="ops", password_hash=sha512_crypt(PASSWORD)).password_set


# --------------------------------------------------------------------------- rendering


def cloud_config_body(text: str) -> dict[str, Any]:
    """The JSON body after the ``#cloud-config`` line."""
    first, _, body = text.partition("\n")
    assert first == "#cloud-config"
    parsed = json.loads(body)
    assert isinstance(parsed, dict)
    return parsed


def test_user_data_with_user_and_password(keys: dict[str, Key]) -> None:
    """A named user gets the keys, passwordless sudo, bash, the hash as ``passwd``, and SSH password login."""
    cfg = parse_cloud_init(
        {"user": "ops", "ssh_authorized_keys": [keys["ed25519"].line], "password": PASSWORD, "hostname": "web"}
    )
    body = cloud_config_body(render_user_data(cfg))
    assert body == {
        "hostname": "web",
        "users": [
            {
                "name": "ops",
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "shell": "/bin/bash",
                "ssh_authorized_keys": [keys["ed25519"].line],
                "lock_passwd": False,
                "passwd": cfg.password_hash,
            }
        ],
        "ssh_pwauth": True,
    }
    assert PASSWORD not in render_user_data(cfg)


def test_user_data_with_user_without_password(keys: dict[str, Key]) -> None:
    """Without a password the user's password stays locked and SSH password login is not touched."""
    cfg = parse_cloud_init({"user": "no", "ssh_authorized_keys": [keys["ecdsa"].line]})
    body = cloud_config_body(render_user_data(cfg))
    assert body["users"][0]["lock_passwd"] is True
    assert body["users"][0]["name"] == "no"  # a string in JSON, where bare YAML would read a boolean
    assert "passwd" not in body["users"][0] and "ssh_pwauth" not in body and "hostname" not in body


def test_user_data_for_default_user(keys: dict[str, Key]) -> None:
    """Without ``user`` the keys go to the distribution's default user."""
    cfg = parse_cloud_init({"ssh_authorized_keys": [keys["ed25519"].line, keys["rsa"].line]})
    assert cloud_config_body(render_user_data(cfg)) == {
        "users": ["default"],
        "ssh_authorized_keys": [keys["ed25519"].line, keys["rsa"].line],
    }
    assert cloud_config_body(render_user_data(CloudInitConfig())) == {"users": ["default"]}


def test_custom_user_data_is_written_as_given() -> None:
    """Raw user data replaces the generated one byte for byte."""
    text = "#!/bin/sh\necho 'héllo' > /root/x\n"
    assert render_user_data(parse_cloud_init({"user_data": text, "hostname": "web"})) == text


def test_stored_config_with_password_cannot_render() -> None:
    """A configuration read back from vm.json has no hash, so it cannot make a seed with the password."""
    stored = parse_cloud_init({"user": "ops", "password": PASSWORD}).to_json()
    back = CloudInitConfig.from_json(stored)
    with pytest.raises(ValueError, match="new cloud_init"):
        render_user_data(back)
    with pytest.raises(ValueError, match="new cloud_init"):
        build_seed_iso(back, instance_id=UUID, hostname="web")


def test_meta_data() -> None:
    """meta-data holds the instance id and the host name, quoted so that they stay strings."""
    assert render_meta_data(UUID, "web") == f'instance-id: "{UUID}"\nlocal-hostname: "web"\n'


@pytest.mark.parametrize(("instance_id", "hostname"), [("", "web"), ("a b", "web"), ("x\ny", "web"), (UUID, "web_1")])
def test_meta_data_refuses_bad_values(instance_id: str, hostname: str) -> None:
    """A bad instance id or host name is a programming error (ValueError), never written."""
    with pytest.raises(ValueError):
        render_meta_data(instance_id, hostname)


@pytest.mark.parametrize(
    ("vm_name", "hostname"),
    [("web", "web"), ("Db_2.prod", "db-2-prod"), ("-x-", "x"), ("123", "vm-123"), ("___", "vm"), ("a" * 63, "a" * 63)],
)
def test_hostname_for(vm_name: str, hostname: str) -> None:
    """VM names become valid single-label host names."""
    assert hostname_for(vm_name) == hostname
    render_meta_data(UUID, hostname)


# --------------------------------------------------------------------------- the seed ISO


def read_iso(data: bytes) -> tuple[str, dict[str, bytes]]:
    """Volume id and files of an ISO read back with pycdlib, checking the three namespaces agree."""
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    try:
        volume = iso.pvd.volume_identifier.decode().strip()
        files: dict[str, bytes] = {}
        for child in iso.list_children(rr_path="/"):
            if child.is_dot() or child.is_dotdot():
                continue
            name = child.rock_ridge.name().decode()
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            files[name] = out.getvalue()
            joliet = io.BytesIO()
            iso.get_file_from_iso_fp(joliet, joliet_path=f"/{name}")
            assert joliet.getvalue() == files[name]
            plain = io.BytesIO()
            iso.get_file_from_iso_fp(plain, iso_path=iso.full_path_from_dirrecord(child))
            assert plain.getvalue() == files[name]
    finally:
        iso.close()
    return volume, files


@pytest.fixture
def full_cfg(keys: dict[str, Key]) -> CloudInitConfig:
    """A configuration with every generated part and a network config."""
    return parse_cloud_init(
        {
            "user": "ops",
            "ssh_authorized_keys": [keys["ed25519"].line],
            "password": PASSWORD,
            "hostname": "web",
            "network_config": NETWORK_V2,
        }
    )


def test_seed_iso_reads_back_with_pycdlib(full_cfg: CloudInitConfig) -> None:
    """Volume ``cidata``; meta-data, user-data and network-config under Rock Ridge, Joliet and ISO 9660 names."""
    volume, files = read_iso(build_seed_iso(full_cfg, instance_id=UUID, hostname="ignored"))
    assert volume == "cidata"
    assert files == {
        "meta-data": render_meta_data(UUID, "web").encode(),
        "user-data": render_user_data(full_cfg).encode(),
        "network-config": render_network_config(full_cfg).encode(),
    }


def test_seed_iso_without_network_config_uses_given_hostname() -> None:
    """No network-config file without one; local-hostname falls back to the ``hostname`` argument."""
    cfg = parse_cloud_init({"user_data": "#cloud-config\nruncmd: ['echo ✓ ünïcode']\n"})
    _, files = read_iso(build_seed_iso(cfg, instance_id=UUID, hostname="db-2"))
    assert set(files) == {"meta-data", "user-data"}
    assert files["meta-data"] == render_meta_data(UUID, "db-2").encode()
    assert files["user-data"].decode("utf-8") == cfg.user_data


def test_seed_iso_never_holds_the_password(full_cfg: CloudInitConfig) -> None:
    """Only the hash is in the seed, in no encoding the password itself."""
    data = build_seed_iso(full_cfg, instance_id=UUID, hostname="web")
    assert full_cfg.password_hash is not None and full_cfg.password_hash.encode() in data
    assert PASSWORD.encode() not in data and PASSWORD.encode("utf-16-be") not in data


def test_seed_iso_with_xorriso(full_cfg: CloudInitConfig, tmp_path: Path) -> None:
    """xorriso lists the three files, reports volume id ``cidata`` and extracts them unchanged (UTF-8 too)."""
    cfg = CloudInitConfig(
        user_data="#cloud-config\nruncmd: ['echo ✓ ünïcode 密码']\n", network_config=full_cfg.network_config
    )
    iso = tmp_path / "seed.iso"
    iso.write_bytes(build_seed_iso(cfg, instance_id=UUID, hostname="web"))
    listed = subprocess.run(
        ["xorriso", "-indev", str(iso), "-pvd_info", "-ls", "/"], capture_output=True, text=True, check=True
    )
    assert "Volume Id    : cidata" in listed.stdout
    names = {line.strip("'") for line in listed.stdout.splitlines() if line.startswith("'") and line != "'/':"}
    assert names == {"meta-data", "user-data", "network-config"}
    out = tmp_path / "out"
    subprocess.run(
        ["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/", str(out)], capture_output=True, check=True
    )
    assert (out / "meta-data").read_text() == render_meta_data(UUID, "web")
    assert (out / "user-data").read_text(encoding="utf-8") == cfg.user_data
    assert json.loads((out / "network-config").read_text()) == NETWORK_V2


def test_seed_iso_label_as_blkid_sees_it(full_cfg: CloudInitConfig, tmp_path: Path) -> None:
    """blkid (what cloud-init's LABEL=cidata lookup uses) sees an iso9660 filesystem labelled ``cidata``."""
    iso = tmp_path / "seed.iso"
    iso.write_bytes(build_seed_iso(full_cfg, instance_id=UUID, hostname="web"))
    probed = subprocess.run(["blkid", "-p", "-o", "export", str(iso)], capture_output=True, text=True, check=True)
    fields = dict(line.split("=", 1) for line in probed.stdout.splitlines() if "=" in line)
    assert fields["TYPE"] == "iso9660"
    assert fields["LABEL"] == "cidata"


# --------------------------------------------------------------------------- cloud-init itself (when at hand)


def _cloud_init_python() -> list[str]:
    """A command running a Python that can import cloudinit: the one the environment names, or this venv's
    Python (its test extras hold cloud-init's dependencies) over Debian's cloud-init package, downloaded and
    unpacked once into the cache (nothing is installed on the machine)."""
    configured = os.environ.get("QEMU_MCP_TEST_CLOUD_INIT_PYTHON")
    if configured:
        return shlex.split(configured)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qemu-mcp-http" / "cloud-init-deb"
    root = base / "root"
    if not (root / "usr/lib/python3/dist-packages/cloudinit").is_dir():
        base.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=base))
        try:
            subprocess.run(["apt-get", "download", "cloud-init"], cwd=work, check=True, capture_output=True)
            deb = next(work.glob("cloud-init_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True, capture_output=True)
            shutil.rmtree(root, ignore_errors=True)
            (work / "root").rename(root)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return ["env", f"PYTHONPATH={root}/usr/lib/python3/dist-packages", sys.executable]


@pytest.fixture(scope="module")
def cloud_init() -> Iterator[list[str]]:
    """cloud-init's own code (Debian 12's package), to run its schema validator and its NoCloud reader."""
    yield _cloud_init_python()


#: Reads an extracted seed directory the way DataSourceNoCloud reads a mounted seed, and dispatches user-data.
_NOCLOUD_READER = """
import json, sys
from cloudinit import util
from cloudinit.handlers import type_from_starts_with
from cloudinit.sources.DataSourceNoCloud import _merge_new_seed
seeded = util.pathprefix2dict(
    sys.argv[1], required=["user-data", "meta-data"], optional=["vendor-data", "network-config"]
)
data = _merge_new_seed({"meta-data": {}, "user-data": b"", "vendor-data": b"", "network-config": None}, seeded)
kind = type_from_starts_with(data["user-data"])
config = util.load_yaml(data["user-data"]) if kind == "text/cloud-config" else None
print(json.dumps({"meta-data": data["meta-data"], "network-config": data.get("network-config"),
                  "type": kind, "cloud-config": config}))
"""


def _user_data_cases(keys: dict[str, Key]) -> dict[str, dict[str, Any]]:
    """Name → a cloud_init argument whose generated user-data cloud-init must accept."""
    return {
        "user-password": {
            "user": "ops",
            "ssh_authorized_keys": [k.line for k in keys.values()],
            "password": PASSWORD,
            "hostname": "web.example.com",
        },
        "user-yaml-words": {"user": "no", "ssh_authorized_keys": [keys["ecdsa"].line], "hostname": "on"},
        "default-user": {"ssh_authorized_keys": [keys["ed25519"].line]},
        "empty": {},
    }


@pytest.mark.parametrize("case", ["user-password", "user-yaml-words", "default-user", "empty"])
def test_cloud_init_schema_accepts_generated_user_data(
    cloud_init: list[str], keys: dict[str, Key], tmp_path: Path, case: str
) -> None:
    """cloud-init's own schema validator accepts the generated #cloud-config (JSON body)."""
    path = tmp_path / "user-data"
    path.write_text(render_user_data(parse_cloud_init(_user_data_cases(keys)[case])))
    done = subprocess.run(
        [*cloud_init, "-m", "cloudinit.cmd.main", "schema", "--config-file", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Valid cloud-config" in done.stdout


def test_cloud_init_schema_is_a_real_check(cloud_init: list[str], tmp_path: Path) -> None:
    """The validator above does refuse a wrong user entry (so its passing means something)."""
    path = tmp_path / "user-data"
    path.write_text('#cloud-config\n{"users": [{"name": "ops", "lock_passwd": "no"}], "ssh_pwauth": [1]}\n')
    done = subprocess.run(
        [*cloud_init, "-m", "cloudinit.cmd.main", "schema", "--config-file", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0


def test_cloud_init_reads_the_seed(cloud_init: list[str], keys: dict[str, Key], tmp_path: Path) -> None:
    """cloud-init's NoCloud reader takes the extracted seed: meta-data, cloud-config and network-config as meant."""
    cfg = parse_cloud_init({**_user_data_cases(keys)["user-yaml-words"], "network_config": NETWORK_V2})
    iso = tmp_path / "seed.iso"
    iso.write_bytes(build_seed_iso(cfg, instance_id=UUID, hostname="web"))
    _, files = read_iso(iso.read_bytes())
    seed = tmp_path / "seed"
    seed.mkdir()
    for name, data in files.items():
        (seed / name).write_bytes(data)
    done = subprocess.run([*cloud_init, "-c", _NOCLOUD_READER, str(seed)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["meta-data"] == {"instance-id": UUID, "local-hostname": "on"}
    assert seen["type"] == "text/cloud-config"
    assert seen["cloud-config"] == cloud_config_body(render_user_data(cfg))
    assert seen["cloud-config"]["users"][0]["name"] == "no"
    assert seen["network-config"] == NETWORK_V2
