"""cloud-init for new VMs: the ``cloud_init`` argument and the NoCloud seed ISO (passwords: :mod:`.sha512crypt`).

Pure functions: no I/O here.  The seed ISO is built in memory (pycdlib) so the
product can write it locally or upload it over SFTP to a host that has no
genisoimage.

The generated user-data is ``#cloud-config`` followed by a JSON body: JSON is
YAML (cloud-init reads user-data with ``yaml.safe_load``), and JSON strings are
always quoted, so values such as ``no``, ``0755`` or ``1e3`` in a user name,
key comment or hostname stay strings instead of turning into YAML booleans or
numbers.

A password never leaves :func:`parse_cloud_init` in clear: it is hashed at once
(SHA-512 crypt); the hash is written to the seed only, and is left out of
:meth:`CloudInitConfig.summary`, :meth:`CloudInitConfig.to_json` and ``repr``.

Why one module of 600 lines: two thirds of it are the checks of each field a client sends (each
refusal says what was wrong and how to fix it), and they are read against the renderers below them,
which rely on what the checks guarantee; split apart, that guarantee would span files.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncssh
import pycdlib

from ..errors import InvalidInput
from .sha512crypt import sha512_crypt

__all__ = [
    "FIELDS",
    "MAX_KEYS",
    "MAX_KEY_LINE_BYTES",
    "MAX_NETWORK_CONFIG_BYTES",
    "MAX_PASSWORD_BYTES",
    "MAX_USER_DATA_BYTES",
    "OPENSSH_KEY_TYPES",
    "CloudInitConfig",
    "build_seed_iso",
    "hostname_for",
    "parse_cloud_init",
    "render_meta_data",
    "render_network_config",
    "render_user_data",
]

#: The fields ``cloud_init`` accepts, in the order messages list them.
FIELDS = ("user", "ssh_authorized_keys", "password", "hostname", "user_data", "network_config")
MAX_USER_DATA_BYTES = 65536
MAX_NETWORK_CONFIG_BYTES = 65536
MAX_KEYS = 64
MAX_KEY_LINE_BYTES = 8192
MAX_PASSWORD_BYTES = 1024
SUDO_RULE = "ALL=(ALL) NOPASSWD:ALL"
SHELL = "/bin/bash"

_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_INSTANCE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: First-line prefixes cloud-init (``handlers.INCLUSION_TYPES_MAP``) dispatches on, compared lower-case.
_USER_DATA_PREFIXES = (
    "#cloud-config",
    "#!",
    "#include",
    "#cloud-boothook",
    "#part-handler",
    "## template: jinja",
)
#: Public key types a guest's OpenSSH accepts in authorized_keys (asyncssh reads more: Ed448, secp256k1, DSA).
OPENSSH_KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)


# --------------------------------------------------------------------------- the configuration


@dataclass(frozen=True)
class _KeyInfo:
    """The parts of one OpenSSH public key line."""

    type: str
    blob: str
    comment: str | None

    @property
    def fingerprint(self) -> str:
        """``SHA256:<base64 without padding>``, as ``ssh-keygen -l`` prints it."""
        digest = hashlib.sha256(base64.b64decode(self.blob)).digest()
        return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _split_key_line(line: str) -> _KeyInfo:
    """A key line already validated by :func:`_parse_key` → its type, base64 blob and comment."""
    parts = line.split(None, 2)
    return _KeyInfo(type=parts[0], blob=parts[1], comment=parts[2] if len(parts) > 2 else None)


@dataclass(frozen=True)
class CloudInitConfig:
    """A validated ``cloud_init`` argument.

    ``ssh_authorized_keys`` holds normalised OpenSSH public key lines
    (``type base64 [comment]``).  ``password_hash`` is the SHA-512 crypt hash of
    the client's password, never the password; it is not stored in vm.json, so
    after :meth:`from_json` it is None while ``password_set`` stays True.
    ``user_data`` (raw, replacing the generated one) and ``network_config`` (a
    JSON object or a YAML/JSON string) are as the client gave them.
    """

    user: str | None = None
    ssh_authorized_keys: tuple[str, ...] = ()
    password_hash: str | None = field(default=None, repr=False)
    hostname: str | None = None
    user_data: str | None = field(default=None, repr=False)
    network_config: dict[str, Any] | str | None = None
    password_set: bool = False

    def __post_init__(self) -> None:
        """:raise ValueError: ``password_hash`` is not a SHA-512 crypt hash."""
        if self.password_hash is not None:
            if not self.password_hash.startswith("$6$"):
                raise ValueError("password_hash must be a SHA-512 crypt hash ($6$...), never a password")
            object.__setattr__(self, "password_set", True)

    @property
    def custom_user_data(self) -> bool:
        """True when the client's raw user-data replaces the generated one."""
        return self.user_data is not None

    def summary(self) -> dict[str, Any]:
        """The configuration as clients see it; never the password, its hash or the user-data itself."""
        keys = [_split_key_line(line) for line in self.ssh_authorized_keys]
        network_bytes = len(render_network_config(self).encode("utf-8")) if self.network_config is not None else None
        return {
            "user": self.user,
            "ssh_authorized_keys": [
                {"type": key.type, "fingerprint": key.fingerprint, "comment": key.comment} for key in keys
            ],
            "hostname": self.hostname,
            "password_set": self.password_set,
            "custom_user_data": self.custom_user_data,
            "user_data_bytes": len(self.user_data.encode("utf-8")) if self.user_data is not None else None,
            "custom_network_config": self.network_config is not None,
            "network_config_bytes": network_bytes,
        }

    def to_json(self) -> dict[str, Any]:
        """What vm.json stores: everything but the password hash (``password_set`` records that there was one)."""
        return {
            "user": self.user,
            "ssh_authorized_keys": list(self.ssh_authorized_keys),
            "hostname": self.hostname,
            "password_set": self.password_set,
            "user_data": self.user_data,
            "network_config": self.network_config,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CloudInitConfig:
        """The configuration :meth:`to_json` stored, checked again field by field; ``password_hash`` is None.

        No size limit is applied to ``user_data`` here: it was checked against
        the limit in force when the VM was created.

        :raise ValueError: the data is not a configuration this version understands.
        """
        if not isinstance(data, Mapping):
            raise ValueError("not a cloud-init configuration: not an object")
        known = {"user", "ssh_authorized_keys", "hostname", "password_set", "user_data", "network_config"}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ValueError(f"not a cloud-init configuration: unknown fields {unknown}")
        password_set = data.get("password_set", False)
        if not isinstance(password_set, bool):
            raise ValueError("not a cloud-init configuration: password_set is not a boolean")
        try:
            return cls(
                user=_parse_user(data.get("user")),
                ssh_authorized_keys=_parse_keys(data.get("ssh_authorized_keys")),
                hostname=_parse_hostname(data.get("hostname")),
                user_data=_parse_user_data(data.get("user_data"), max_bytes=None),
                network_config=_parse_network_config(data.get("network_config")),
                password_set=password_set,
            )
        except InvalidInput as exc:
            raise ValueError(f"not a cloud-init configuration: {exc.message}") from exc


# --------------------------------------------------------------------------- parsing


def _utf8(value: str, field_name: str, where: str = "it") -> bytes:
    """``value`` as UTF-8; ``where`` names the value in the message.

    :raise InvalidInput: ``value`` holds a lone surrogate, which no UTF-8 file can carry.
    """
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(  # noqa: B904 - the codec error would only repeat the position
            f"cloud_init.{field_name}",
            f"{where} is not valid Unicode text (it holds a lone surrogate); send UTF-8 text",
        )


def _parse_user(raw: object) -> str | None:
    """:raise InvalidInput: not a POSIX user name, or ``root``."""
    if raw is None:
        return None
    if not isinstance(raw, str) or not _USER_RE.fullmatch(raw):
        shown = repr(raw) if isinstance(raw, str) and len(raw) <= 64 else "the value"
        raise InvalidInput(
            "cloud_init.user",
            f"{shown} is not a user name; use 1-32 characters of a-z 0-9 _ - starting with a-z or _, e.g. 'ops'",
        )
    if raw == "root":
        raise InvalidInput(
            "cloud_init.user",
            "'root' already exists in every image; name a new user (it gets passwordless sudo), e.g. 'ops'",
        )
    return raw


def _parse_key(raw: object, index: int) -> str:
    """One OpenSSH public key line → its normalised form ``type base64 [comment]``.

    Messages name the key by its position only: a client who pasted a private
    key by mistake must not see it echoed.

    :raise InvalidInput: not a string, too long, holds control characters, a
        private key, or not a public key asyncssh can read.
    """
    where = f"ssh_authorized_keys[{index}]"
    if not isinstance(raw, str):
        raise InvalidInput(
            "cloud_init.ssh_authorized_keys", f"{where} must be a string such as 'ssh-ed25519 AAAA... me@host'"
        )
    line = raw.strip()
    if "PRIVATE KEY-----" in line or line.startswith("PuTTY-User-Key-File"):
        raise InvalidInput(
            "cloud_init.ssh_authorized_keys",
            f"{where} is a private key; give the public key (the one line of the .pub file) "
            "and keep the private key secret",
        )
    if len(_utf8(line, "ssh_authorized_keys", where)) > MAX_KEY_LINE_BYTES:
        raise InvalidInput(
            "cloud_init.ssh_authorized_keys",
            f"{where} is longer than {MAX_KEY_LINE_BYTES} bytes; give one public key line",
        )
    if _CONTROL_RE.search(line):
        raise InvalidInput(
            "cloud_init.ssh_authorized_keys",
            f"{where} holds a newline, NUL or other control character; give each key as its own list entry, "
            "one line 'type base64 [comment]'",
        )
    parts = line.split(None, 2)
    if parts and parts[0] == "ssh-dss":
        raise InvalidInput(
            "cloud_init.ssh_authorized_keys",
            f"{where} is a DSA key, which OpenSSH disabled in 7.0 and removed in 9.8; "
            "use an ed25519 key (ssh-keygen -t ed25519)",
        )
    if len(parts) >= 2 and parts[0] not in OPENSSH_KEY_TYPES:
        raise InvalidInput(
            "cloud_init.ssh_authorized_keys",
            f"{where} does not start with a key type OpenSSH accepts ({', '.join(OPENSSH_KEY_TYPES)}); "
            "authorized_keys options and certificates are not accepted",
        )
    try:
        # The type check above also rules out the PEM / RFC 4716 forms asyncssh would read.
        asyncssh.import_public_key(line)
    except ValueError:  # asyncssh.KeyImportError, and binascii/struct troubles of a malformed blob
        parsed = False
    else:
        parsed = len(parts) >= 2
    if not parsed:
        raise InvalidInput(
            "cloud_init.ssh_authorized_keys",
            f"{where} is not an OpenSSH public key line; give 'type base64 [comment]' as in a .pub file, "
            "e.g. 'ssh-ed25519 AAAAC3Nza... me@laptop' (authorized_keys options and certificates are not accepted)",
        )
    return " ".join(parts[:2]) + (f" {parts[2]}" if len(parts) > 2 else "")


def _parse_keys(raw: object) -> tuple[str, ...]:
    """:raise InvalidInput: not a list, more than :data:`MAX_KEYS`, a bad key, or a key given twice."""
    if raw is None:
        return ()
    if not isinstance(raw, list | tuple):
        raise InvalidInput(
            "cloud_init.ssh_authorized_keys",
            "must be a list of public key lines, e.g. ['ssh-ed25519 AAAA... me@laptop']",
        )
    if len(raw) > MAX_KEYS:
        raise InvalidInput("cloud_init.ssh_authorized_keys", f"{len(raw)} keys given; at most {MAX_KEYS} are accepted")
    keys: list[str] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(raw):
        line = _parse_key(item, index)
        blob = line.split()[1]
        if blob in seen:
            raise InvalidInput(
                "cloud_init.ssh_authorized_keys",
                f"ssh_authorized_keys[{index}] is the same key as ssh_authorized_keys[{seen[blob]}]; "
                "give each key once",
            )
        seen[blob] = index
        keys.append(line)
    return tuple(keys)


def _check_password(raw: object) -> str | None:
    """The password as given, checked; never echoed in a message.

    :raise InvalidInput: not a string, empty, too long or holding a NUL.
    """
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw:
        raise InvalidInput("cloud_init.password", "must be a non-empty string")
    if "\0" in raw:
        raise InvalidInput("cloud_init.password", "may not contain a NUL character")
    if len(_utf8(raw, "password")) > MAX_PASSWORD_BYTES:
        raise InvalidInput("cloud_init.password", f"is longer than {MAX_PASSWORD_BYTES} bytes; choose a shorter one")
    return raw


def _check_hostname(name: str) -> str | None:
    """The reason ``name`` is not an RFC 1123 host name, or None when it is one."""
    if not name or len(name) > 253:
        return "must be 1-253 characters"
    labels = name.split(".")
    for label in labels:
        if not _LABEL_RE.fullmatch(label):
            return (
                "has a bad label; each dot-separated label is 1-63 characters of A-Z a-z 0-9 and '-', "
                "not starting or ending with '-'"
            )
    if labels[-1].isdigit():
        return "may not end in an all-digit label (it would read as an IP address)"
    return None


def _parse_hostname(raw: object) -> str | None:
    """:raise InvalidInput: not an RFC 1123 host name."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise InvalidInput("cloud_init.hostname", "must be a string such as 'web' or 'web.example.com'")
    reason = _check_hostname(raw)
    if reason:
        shown = repr(raw) if len(raw) <= 253 else "the value"
        raise InvalidInput("cloud_init.hostname", f"{shown} {reason}, e.g. 'web' or 'web.example.com'")
    return raw


def _user_data_recognised(text: str) -> bool:
    """Whether cloud-init dispatches ``text`` to a handler (lower-cased, leading blanks ignored, as cloud-init does)."""
    head = text.lstrip().lower()
    if head.startswith(_USER_DATA_PREFIXES):
        return True
    # cloud-init reads user-data as MIME when 'MIME-Version:' is in its first 4096 bytes (convert_string).
    return b"mime-version:" in text.encode("utf-8")[:4096].lower()


def _parse_user_data(raw: object, *, max_bytes: int | None) -> str | None:
    """Raw user-data, checked; its content is never echoed (it may hold secrets).

    :raise InvalidInput: not a string, over ``max_bytes`` UTF-8 bytes, holding
        a NUL, or with a first line cloud-init does not recognise.
    """
    if raw is None:
        return None
    accepted = "#cloud-config, #!, #include, #cloud-boothook, #part-handler, ## template: jinja, or a MIME multipart"
    if not isinstance(raw, str):
        raise InvalidInput("cloud_init.user_data", f"must be a string whose first line is {accepted}")
    size = len(_utf8(raw, "user_data"))
    if max_bytes is not None and size > max_bytes:
        raise InvalidInput(
            "cloud_init.user_data", f"is {size} bytes; at most {max_bytes} bytes (UTF-8) are accepted by this server"
        )
    if "\0" in raw:
        raise InvalidInput("cloud_init.user_data", "may not contain NUL characters; give text, not a binary file")
    if not _user_data_recognised(raw):
        raise InvalidInput(
            "cloud_init.user_data",
            f"cloud-init would ignore it: the first line must start with {accepted} "
            "(a MIME message needs its MIME-Version header within the first 4096 bytes)",
        )
    return raw


def _parse_network_config(raw: object) -> dict[str, Any] | str | None:
    """:raise InvalidInput: not an object or string, too large, or an object without ``version`` 1 or 2."""
    if raw is None:
        return None
    value: dict[str, Any] | str
    if isinstance(raw, dict):
        try:
            text = json.dumps(raw, ensure_ascii=False, allow_nan=False)
            size = len(text.encode("utf-8"))
        except (TypeError, ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
            raise InvalidInput(  # noqa: B904 - the JSON error says less than the message
                "cloud_init.network_config", "must be plain JSON (objects, lists, strings, numbers) in UTF-8"
            )
        copy: dict[str, Any] = json.loads(text)  # plain JSON types, not shared with the caller
        value = copy
        inner = copy.get("network", copy)
        version = inner.get("version") if isinstance(inner, dict) else None
        if isinstance(version, bool) or version not in (1, 2):
            raise InvalidInput(
                "cloud_init.network_config",
                "an object must be cloud-init network config version 1 or 2, e.g. "
                '{"version": 2, "ethernets": {"all": {"match": {"name": "e*"}, "dhcp4": true}}}',
            )
    elif isinstance(raw, str):
        value = raw
        size = len(_utf8(raw, "network_config"))
        if not raw.strip() or "\0" in raw:
            raise InvalidInput(
                "cloud_init.network_config", "must be non-empty network config v1 or v2 text (YAML or JSON) without NUL"
            )
    else:
        raise InvalidInput(
            "cloud_init.network_config", "must be an object (network config v1 or v2 as JSON) or a YAML string"
        )
    if size > MAX_NETWORK_CONFIG_BYTES:
        raise InvalidInput(
            "cloud_init.network_config", f"is {size} bytes; at most {MAX_NETWORK_CONFIG_BYTES} bytes are accepted"
        )
    return value


def parse_cloud_init(raw: object, *, max_user_data_bytes: int = MAX_USER_DATA_BYTES) -> CloudInitConfig:
    """The ``cloud_init`` argument as it arrives from JSON → a :class:`CloudInitConfig`.

    Every field is optional; a JSON ``null`` counts as not given.  A
    ``password`` is hashed here (SHA-512 crypt, random salt); only the hash is
    kept.  Messages never hold the password and never the user-data content.

    :raise InvalidInput: ``raw`` is not an object; it has unknown fields; a
        field is malformed (see the ``_parse_*`` helpers); ``password`` is
        given without ``user``; ``user_data`` is given together with ``user``,
        ``ssh_authorized_keys`` or ``password``.
    """
    if not isinstance(raw, dict):
        raise InvalidInput(
            "cloud_init",
            f"must be an object with any of the fields {', '.join(FIELDS)}, "
            'e.g. {"user": "ops", "ssh_authorized_keys": ["ssh-ed25519 AAAA... me@laptop"]}',
        )
    unknown = [str(k) for k in raw if k not in FIELDS]
    if unknown:
        names = ", ".join(repr(k[:64]) for k in sorted(unknown)[:10])
        raise InvalidInput("cloud_init", f"unknown field(s) {names}; the accepted fields are {', '.join(FIELDS)}")
    user = _parse_user(raw.get("user"))
    keys = _parse_keys(raw.get("ssh_authorized_keys"))
    password = _check_password(raw.get("password"))
    hostname = _parse_hostname(raw.get("hostname"))
    user_data = _parse_user_data(raw.get("user_data"), max_bytes=max_user_data_bytes)
    network_config = _parse_network_config(raw.get("network_config"))
    if password is not None and user is None:
        raise InvalidInput(
            "cloud_init.password",
            'needs \'user\': the password is set for the user cloud-init creates; add e.g. "user": "ops"',
        )
    if user_data is not None:
        mixed = [
            name for name, value in (("user", user), ("ssh_authorized_keys", keys), ("password", password)) if value
        ]
        if mixed:
            raise InvalidInput(
                "cloud_init.user_data",
                f"cannot be combined with {', '.join(mixed)}: user_data replaces the generated #cloud-config; "
                "put the user, keys and password into your user_data, or drop user_data",
            )
    return CloudInitConfig(
        user=user,
        ssh_authorized_keys=keys,
        password_hash=sha512_crypt(password) if password is not None else None,
        hostname=hostname,
        user_data=user_data,
        network_config=network_config,
    )


# --------------------------------------------------------------------------- rendering


def hostname_for(vm_name: str) -> str:
    """A host name (one RFC 1123 label) derived from a VM name: ``Db_2.prod`` → ``db-2-prod``.

    For meta-data's ``local-hostname`` when the configuration names no hostname.
    Never raises: anything unusable becomes ``vm``.
    """
    label = re.sub(r"[^a-z0-9-]+", "-", vm_name.lower())[:63].strip("-")
    if not label:
        return "vm"
    return f"vm-{label}"[:63] if label.isdigit() else label


def render_user_data(cfg: CloudInitConfig) -> str:
    """The user-data file: the client's raw user_data, or a generated ``#cloud-config`` with a JSON body.

    With ``user``: that user with the keys, passwordless sudo and bash; its
    password is locked unless a password was given (then ``passwd`` holds the
    hash and ``ssh_pwauth`` is on).  Without ``user``: the distribution's default
    user, with the keys at top level.

    :raise ValueError: a password was set but its hash is not at hand (a
        configuration read back from vm.json cannot regenerate the seed).
    """
    if cfg.user_data is not None:
        return cfg.user_data
    if cfg.password_set and cfg.password_hash is None:
        raise ValueError("the password hash is not stored in vm.json; a new cloud_init is needed to write a seed")
    body: dict[str, Any] = {}
    if cfg.hostname is not None:
        body["hostname"] = cfg.hostname
    if cfg.user is not None:
        user: dict[str, Any] = {"name": cfg.user, "sudo": SUDO_RULE, "shell": SHELL}
        if cfg.ssh_authorized_keys:
            user["ssh_authorized_keys"] = list(cfg.ssh_authorized_keys)
        if cfg.password_hash is not None:
            user["lock_passwd"] = False
            user["passwd"] = cfg.password_hash
        else:
            user["lock_passwd"] = True
        body["users"] = [user]
        if cfg.password_hash is not None:
            body["ssh_pwauth"] = True
    else:
        body["users"] = ["default"]
        if cfg.ssh_authorized_keys:
            body["ssh_authorized_keys"] = list(cfg.ssh_authorized_keys)
    return "#cloud-config\n" + json.dumps(body, indent=2, ensure_ascii=False) + "\n"


def render_network_config(cfg: CloudInitConfig) -> str:
    """The network-config file (an object as JSON, a string as given); empty when there is none."""
    if cfg.network_config is None:
        return ""
    if isinstance(cfg.network_config, str):
        return cfg.network_config
    return json.dumps(cfg.network_config, indent=2, ensure_ascii=False) + "\n"


def render_meta_data(instance_id: str, hostname: str) -> str:
    """The NoCloud meta-data file; values are JSON-quoted so a host name like ``123`` stays a string.

    :raise ValueError: ``instance_id`` is not 1-128 characters of ``A-Za-z0-9._-``,
        or ``hostname`` is not an RFC 1123 host name (see :func:`hostname_for`).
    """
    if not _INSTANCE_ID_RE.fullmatch(instance_id):
        raise ValueError(f"instance id {instance_id!r} must be 1-128 characters of A-Z a-z 0-9 . _ -, e.g. a UUID")
    reason = _check_hostname(hostname)
    if reason:
        raise ValueError(f"host name {hostname!r} {reason}")
    return f"instance-id: {json.dumps(instance_id)}\nlocal-hostname: {json.dumps(hostname)}\n"


#: Seed files: Rock Ridge / Joliet name and the ISO 9660 level-1 name genisoimage would give it.
_SEED_FILES = {"meta-data": "/META_DAT.;1", "user-data": "/USER_DAT.;1", "network-config": "/NETWORK_.;1"}


def build_seed_iso(cfg: CloudInitConfig, *, instance_id: str, hostname: str) -> bytes:
    """A NoCloud seed: ISO 9660 + Joliet + Rock Ridge, volume id ``cidata``, built in memory.

    Files: ``meta-data`` (``instance-id``, ``local-hostname`` = ``cfg.hostname``
    or else ``hostname``), ``user-data``, and ``network-config`` when the
    configuration has one.

    :raise ValueError: as :func:`render_meta_data` and :func:`render_user_data`.
    """
    files = {
        "meta-data": render_meta_data(instance_id, cfg.hostname or hostname),
        "user-data": render_user_data(cfg),
    }
    if cfg.network_config is not None:
        files["network-config"] = render_network_config(cfg)
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident="cidata", joliet=3, rock_ridge="1.09")
    for name, text in files.items():
        data = text.encode("utf-8")
        iso.add_fp(io.BytesIO(data), len(data), iso_path=_SEED_FILES[name], rr_name=name, joliet_path=f"/{name}")
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()
