"""Secrets, tenants, the connect handshake's proofs, and lease capabilities.

**Secrets.** A node is started with a token file (``--token-file PATH``):
created with a random 256-bit secret (hex, mode 0600, ``O_EXCL``) if
missing; refused if group or others may read it. The secret never appears on
a command line or on the wire. From a secret ``s`` every key is derived with
HMAC-SHA256: a tenant's key is ``HMAC(s, "grafos-fabric/tenant\\0" + name)``,
so one file can serve several tenants without the keys being equal.

**Tenants.** Without ``--tenants`` there is one tenant, ``default``, keyed
from the token file. With ``--tenants PATH`` (TOML, read with ``tomllib``)::

    [limits]                      # node-wide (all optional)
    max_ttl = 3600.0              # no lease or renewal longer than this (seconds)
    max_connections = 1024        # authenticated or not, all tenants together
    idle_timeout = 300.0          # seconds without a request before the node hangs up
    auth_timeout = 5.0            # seconds to finish the handshake
    frame_timeout = 10.0          # seconds to finish a frame once its first byte came
    max_request = 65536           # bytes per request frame

    [tenants.alice]
    secret_file = "alice.token"   # 0600; relative paths are relative to this file
    quota_bytes = "64M"           # bytes of the pool the tenant may hold (default: the pool)
    max_leases = 64
    max_connections = 16
    max_ttl = 600.0               # at most the node's

The *admin* (``grafos-fabric node ls|revoke``) authenticates as the tenant
``@admin``, keyed from the node's token file; it may list and revoke, but
holds no leases.

**Proofs.** See :mod:`.wire` for the handshake; :func:`proof` is
``HMAC(key, label | tenant | nonce_a | nonce_b)`` with distinct labels for
the node and the client, compared with :func:`hmac.compare_digest`.

**Capabilities.** The node keys a :class:`CapMinter` with 32 random bytes at
start (so capabilities die with the node). A capability is the node's
HMAC-SHA256 over ``(tenant, lease id, generation, rights, expiry)``, and it
is good only while its lease lives (lease ids are never reused). The owner's
capability expires at the lease's deadline when it was minted (node clock);
renewing returns a fresh one. A *shared* capability (``Share``: what refs and
queue locators carry) expires the tenant's maximum TTL after it was minted,
so a locator written once survives its owner's renewals, never a lease.
Rights: :data:`ATTACH` (get the access descriptor), :data:`WRITE` (writable
access), :data:`RENEW`, :data:`REVOKE` (revoke and free), :data:`SHARE` (mint a weaker capability). The owner holds
:data:`OWNER` (all); :data:`CONSUMER` is attach + write; :data:`READ_ONLY`
is attach only. Every refusal (bad MAC, another tenant's, expired, too few
rights, unknown lease) is the same :class:`CapabilityDenied`, so the answer
tells a guesser nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass, field, replace
from typing import Any

from grafos_fabric.errors import AuthFailed, CapabilityDenied, Corrupted, FabricValueError

from .wire import MAC, Cap

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover (3.10)
    tomllib = None  # type: ignore[assignment]

__all__ = [
    "ADMIN",
    "ATTACH",
    "CONSUMER",
    "DEFAULT_TENANT",
    "OWNER",
    "READ_ONLY",
    "RENEW",
    "REVOKE",
    "SHARE",
    "WRITE",
    "CapMinter",
    "NodeLimits",
    "NodePolicy",
    "TenantPolicy",
    "cap_from_token",
    "cap_to_token",
    "load_or_create_secret",
    "load_policy",
    "proof",
    "read_secret",
    "tenant_key",
]

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
ADMIN = "@admin"
ATTACH, WRITE, RENEW, REVOKE, SHARE = 1, 2, 4, 8, 16
OWNER = ATTACH | WRITE | RENEW | REVOKE | SHARE
CONSUMER = ATTACH | WRITE
READ_ONLY = ATTACH
RIGHT_NAMES = {"attach": ATTACH, "write": WRITE, "renew": RENEW, "revoke": REVOKE, "share": SHARE}
_TENANT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SIZE_RE = re.compile(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
SECRET_BYTES = 32
MIN_SECRET_BYTES = 16


# ---------------------------------------------------------------------------
# Secrets and keys
# ---------------------------------------------------------------------------


def read_secret(path: str | os.PathLike[str]) -> bytes:
    """The secret in a token file (hex). :class:`AuthFailed` when missing, unreadable, too short or
    readable by group/others (a secret others can read is no secret)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as ex:
        raise AuthFailed(f"token file {os.fspath(path)!r}: {ex.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AuthFailed(f"token file {os.fspath(path)!r} is not a regular file")
        if st.st_mode & 0o077:
            raise AuthFailed(f"token file {os.fspath(path)!r} has mode {st.st_mode & 0o777:o}: "
                             "group or others may read it (chmod 600)")
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        secret = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise AuthFailed(f"token file {os.fspath(path)!r} does not hold a hex secret") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise AuthFailed(f"token file {os.fspath(path)!r} holds {len(secret)} bytes; at least "
                         f"{MIN_SECRET_BYTES} are needed")
    return secret


def load_or_create_secret(path: str | os.PathLike[str]) -> bytes:
    """The node's secret: read ``path``, or create it (0600, exclusive) with 256 random bits."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return read_secret(path)
    try:
        os.write(fd, (secrets.token_hex(SECRET_BYTES) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("created token file %s (mode 0600) with a new 256-bit secret", os.fspath(path))
    return read_secret(path)


def tenant_key(secret: bytes, tenant: str) -> bytes:
    """The key a tenant proves knowledge of, derived from a secret."""
    return hmac.new(secret, b"grafos-fabric/tenant\0" + tenant.encode(), hashlib.sha256).digest()


def proof(key: bytes, label: bytes, tenant: str, nonce_a: bytes, nonce_b: bytes) -> bytes:
    """``HMAC(key, label | tenant | nonce_a | nonce_b)`` (fixed-size nonces: unambiguous)."""
    msg = b"grafos-fabric/proof\0" + label + b"\0" + tenant.encode() + b"\0" + nonce_a + nonce_b
    return hmac.new(key, msg, hashlib.sha256).digest()


# ---------------------------------------------------------------------------
# Policy: tenants and limits
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeLimits:
    """Node-wide limits (see the module docstring for the TOML keys)."""

    max_ttl: float = 3600.0
    max_connections: int = 1024
    idle_timeout: float = 300.0
    auth_timeout: float = 5.0
    frame_timeout: float = 10.0
    max_request: int = 1 << 16
    accept_backoff: float = 0.5  # seconds without accepting after EMFILE/ENFILE/ENOMEM


@dataclass(frozen=True)
class TenantPolicy:
    """One tenant: its key and what it may hold. ``quota_bytes=0`` means the whole pool."""

    name: str
    key: bytes = field(repr=False)
    quota_bytes: int = 0
    max_leases: int = 4096
    max_connections: int = 64
    max_ttl: float = 0.0  # 0: the node's

    @property
    def admin(self) -> bool:
        return self.name == ADMIN


@dataclass(frozen=True)
class NodePolicy:
    limits: NodeLimits
    tenants: dict[str, TenantPolicy]

    def tenant(self, name: str) -> TenantPolicy | None:
        return self.tenants.get(name)

    def max_ttl(self, tenant: TenantPolicy) -> float:
        return min(self.limits.max_ttl, tenant.max_ttl) if tenant.max_ttl > 0 else self.limits.max_ttl


def _size(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise FabricValueError(f"{what}: expected a size, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and (m := _SIZE_RE.fullmatch(value)):
        n = int(m.group(1)) * _UNITS[m.group(2).upper()]
    else:
        raise FabricValueError(f"{what}: not a size: {value!r} (use e.g. 4096, 512M, 4G)")
    if n < 0:
        raise FabricValueError(f"{what}: negative size {n}")
    return n


def _number(value: Any, what: str, *, integer: bool = False, positive: bool = True) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or (positive and not value > 0):
        raise FabricValueError(f"{what}: expected a positive {'integer' if integer else 'number'}, got {value!r}")
    return value


_LIMIT_KEYS = {
    "max_ttl": float, "max_connections": int, "idle_timeout": float, "auth_timeout": float,
    "frame_timeout": float, "max_request": int, "accept_backoff": float,
}
_TENANT_KEYS = {"secret_file", "quota_bytes", "max_leases", "max_connections", "max_ttl"}


def load_policy(secret: bytes, tenants_path: str | os.PathLike[str] | None = None,
                limits: NodeLimits | None = None) -> NodePolicy:
    """The node's tenants and limits: from ``tenants_path`` (TOML), else one ``default`` tenant.

    The admin (``@admin``) is always keyed from the node's ``secret``.
    Unknown keys, bad values and unreadable secret files raise
    :class:`FabricValueError` (or :class:`AuthFailed` for a secret file).
    """
    limits = limits or NodeLimits()
    tenants: dict[str, TenantPolicy] = {}
    if tenants_path is None:
        tenants[DEFAULT_TENANT] = TenantPolicy(DEFAULT_TENANT, tenant_key(secret, DEFAULT_TENANT),
                                               max_connections=limits.max_connections)
    else:
        if tomllib is None:  # pragma: no cover
            raise FabricValueError("--tenants needs Python >= 3.11 (tomllib)")
        try:
            with open(tenants_path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as ex:
            raise FabricValueError(f"tenants file {os.fspath(tenants_path)!r}: {ex.strerror}") from None
        except tomllib.TOMLDecodeError as ex:
            raise FabricValueError(f"tenants file {os.fspath(tenants_path)!r}: {ex}") from None
        unknown = set(doc) - {"limits", "tenants"}
        if unknown:
            raise FabricValueError(f"tenants file: unknown section(s) {sorted(unknown)}")
        raw_limits = doc.get("limits", {})
        if not isinstance(raw_limits, dict) or set(raw_limits) - set(_LIMIT_KEYS):
            raise FabricValueError(f"tenants file [limits]: known keys are {sorted(_LIMIT_KEYS)}")
        updates = {k: _number(v, f"[limits] {k}", integer=_LIMIT_KEYS[k] is int) for k, v in raw_limits.items()}
        limits = replace(limits, **updates)
        base = os.path.dirname(os.path.abspath(tenants_path))
        raw_tenants = doc.get("tenants", {})
        if not isinstance(raw_tenants, dict) or not raw_tenants:
            raise FabricValueError("tenants file: no [tenants.NAME] table")
        for name, t in raw_tenants.items():
            if not _TENANT_RE.match(name) or not isinstance(t, dict):
                raise FabricValueError(f"tenants file: bad tenant {name!r} (names: [A-Za-z0-9_.-]{{1,64}})")
            if set(t) - _TENANT_KEYS:
                raise FabricValueError(f"tenant {name}: unknown keys {sorted(set(t) - _TENANT_KEYS)}")
            if "secret_file" not in t or not isinstance(t["secret_file"], str):
                raise FabricValueError(f"tenant {name}: secret_file is required")
            tenant_secret = read_secret(os.path.join(base, t["secret_file"]))
            tenants[name] = TenantPolicy(
                name,
                tenant_key(tenant_secret, name),
                quota_bytes=_size(t.get("quota_bytes", 0), f"tenant {name} quota_bytes"),
                max_leases=_number(t.get("max_leases", 4096), f"tenant {name} max_leases", integer=True),
                max_connections=_number(t.get("max_connections", 64), f"tenant {name} max_connections",
                                        integer=True),
                max_ttl=float(_number(t.get("max_ttl", limits.max_ttl), f"tenant {name} max_ttl")),
            )
    tenants[ADMIN] = TenantPolicy(ADMIN, tenant_key(secret, ADMIN), max_leases=0, max_connections=4)
    return NodePolicy(limits, tenants)


# ---------------------------------------------------------------------------
# Capabilities
# ---------------------------------------------------------------------------


class CapMinter:
    """Mints and checks lease capabilities with a per-node random key."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def _mac(self, tenant: str, lease_id: str, generation: int, rights: int, expiry_ns: int) -> bytes:
        msg = f"grafos-fabric/cap\0{tenant}\0{lease_id}\0{generation}\0{rights}\0{expiry_ns}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def mint(self, tenant: str, lease_id: str, generation: int, rights: int, expiry_ns: int) -> Cap:
        return Cap(generation, rights, max(0, expiry_ns), self._mac(tenant, lease_id, generation, rights, expiry_ns))

    def check(self, tenant: str, lease_id: str, cap: Cap, need: int, now_ns: int, *,
              allow_expired: bool = False) -> None:
        """Raise :class:`CapabilityDenied` unless ``cap`` is this node's, for this tenant and
        lease, holds the rights ``need`` and (unless ``allow_expired``) has not expired."""
        good = hmac.compare_digest(cap.mac, self._mac(tenant, lease_id, cap.generation, cap.rights, cap.expiry_ns))
        if not good or cap.rights & need != need or (not allow_expired and now_ns >= cap.expiry_ns):
            raise CapabilityDenied(f"no valid capability for lease {lease_id[:8]}... and this operation")


def cap_to_token(cap: Cap) -> str:
    """The text form carried in a :class:`~grafos_fabric.drivers.base.RegionRef` (and a queue locator)."""
    return f"c1.{cap.generation:x}.{cap.rights:x}.{cap.expiry_ns:x}.{cap.mac.hex()}"


def cap_from_token(token: str) -> Cap:
    """Parse :func:`cap_to_token`'s text; :class:`Corrupted` when it is not one."""
    parts = token.split(".") if isinstance(token, str) and len(token) <= 200 else []
    if len(parts) != 5 or parts[0] != "c1":
        raise Corrupted("not a capability token")
    try:
        gen, rights, expiry = (int(p, 16) for p in parts[1:4])
        mac = bytes.fromhex(parts[4])
    except ValueError:
        raise Corrupted("not a capability token") from None
    if len(mac) != MAC or not (0 <= gen < 2**64 and 0 <= rights <= 0xFF and 0 <= expiry < 2**64):
        raise Corrupted("not a capability token")
    return Cap(gen, rights, expiry, mac)
