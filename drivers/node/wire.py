"""The memory node's control protocol: msgspec msgpack messages behind a 4-byte length.

Every message is a tagged, frozen :class:`msgspec.Struct` validated on decode
(types, ranges, lengths, no unknown fields); nothing is ever unpickled. A
frame is a 4-byte big-endian length, then the body; a request frame is at
most the node's ``max_request`` (default :data:`MAX_REQUEST`), a reply at
most :data:`MAX_REPLY`.

A connection goes::

    client                                   node
    Hello(version, tenant, nonce_c)  ->
                                     <-  Challenge(version, node, driver, nonce_n,
                                                   proof_n = HMAC(k, "node" | tenant | nonce_c | nonce_n))
    (checks proof_n: the node knows k)
    Auth(proof_c = HMAC(k, "client" | tenant | nonce_n | nonce_c))  ->
                                     <-  Welcome(node, driver, info, limits)   or ErrorReply(AuthFailed), close
    requests ...                     <->  replies ...

``k`` is the tenant's key (:mod:`.auth`); nonces are 32 random bytes, fresh
per connection on both sides, so a recorded ``Auth`` is worthless on any
other connection and neither side can be used as an oracle for the other
(different labels). Any message other than the expected one during the
handshake ends the connection.

Lease requests after the handshake carry the lease's *capability*
(:class:`Cap`, see :mod:`.auth`): only ``Alloc``, ``Connect`` and the
admin requests go without one.
"""

from __future__ import annotations

import struct
from typing import Annotated, Any

import msgspec

from grafos_fabric.errors import (
    AccessDenied,
    AuthFailed,
    CapabilityDenied,
    Corrupted,
    FabricError,
    FabricValueError,
    LimitExceeded,
    QuotaExceeded,
    VersionMismatch,
    from_status,
)

__all__ = [
    "DEFAULT_PORT",
    "MAX_REPLY",
    "MAX_REQUEST",
    "PROTOCOL_VERSION",
    "AccessMap",
    "AdminList",
    "AdminMetrics",
    "AdminRevoke",
    "Alloc",
    "Attach",
    "Auth",
    "Cap",
    "Challenge",
    "Connect",
    "Connected",
    "Done",
    "ErrorReply",
    "Free",
    "Granted",
    "Hello",
    "LeaseRow",
    "LeaseStatus",
    "Listing",
    "Metrics",
    "Renew",
    "Renewed",
    "Reply",
    "Request",
    "Revoke",
    "Share",
    "Shared",
    "Status",
    "TenantRow",
    "Welcome",
    "decode_reply",
    "decode_request",
    "encode_frame",
    "error_reply",
    "raise_for_reply",
]

PROTOCOL_VERSION = 2
DEFAULT_PORT = 18515
MAX_REQUEST = 1 << 16  # requests are small; a larger frame is a broken or hostile peer
MAX_REPLY = 1 << 22  # an admin listing of many leases
MAX_REGION = 1 << 48
NONCE = 32
MAC = 32
LEN = struct.Struct(">I")

# lease states on the wire
ACTIVE, EXPIRED, REVOKED, FREED, UNKNOWN = "active", "expired", "revoked", "freed", "unknown"
LEASE_STATES = (ACTIVE, EXPIRED, REVOKED, FREED, UNKNOWN)

LeaseId = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]
Name = Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9_.@-]{1,64}$")]
U64Int = Annotated[int, msgspec.Meta(ge=0)]  # msgpack ints stop at 2**64 - 1
U32Int = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]
Nbytes = Annotated[int, msgspec.Meta(ge=1, le=MAX_REGION)]
Ttl = Annotated[float, msgspec.Meta(gt=0.0, le=10 * 365 * 24 * 3600.0)]
Seconds = Annotated[float, msgspec.Meta(ge=-1e12, le=1e12)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
Nonce = Annotated[bytes, msgspec.Meta(min_length=NONCE, max_length=NONCE)]
Mac = Annotated[bytes, msgspec.Meta(min_length=MAC, max_length=MAC)]
# msgspec unions allow one str-like type: binary values (a packed UCX rkey, a worker address) travel as hex
AccessValue = int | bool | Annotated[str, msgspec.Meta(max_length=8192)]
AccessMap = Annotated[
    dict[Annotated[str, msgspec.Meta(pattern="^[a-z0-9_]{1,32}$")], AccessValue], msgspec.Meta(max_length=32)
]


class Cap(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A lease capability: the node's MAC over (tenant, lease id, generation, rights, expiry)."""

    generation: U64Int
    rights: Annotated[int, msgspec.Meta(ge=0, le=0xFF)]
    expiry_ns: U64Int
    mac: Mac


class _Msg(msgspec.Struct, tag_field="t", forbid_unknown_fields=True, frozen=True):
    pass


# -- requests ---------------------------------------------------------------


class Hello(_Msg, tag="hello", frozen=True):
    """Client -> node, first message: protocol version, tenant, client nonce."""

    version: U32Int
    tenant: Name
    nonce: Nonce
    client: Annotated[str, msgspec.Meta(max_length=256)] = ""


class Auth(_Msg, tag="auth", frozen=True):
    """Client -> node, second message: the client's proof."""

    proof: Mac


class Connect(_Msg, tag="connect", frozen=True):
    """Client -> node: the client's half of the data-plane set-up (driver-specific)."""

    params: AccessMap


class Alloc(_Msg, tag="alloc", frozen=True):
    nbytes: Nbytes
    ttl: Ttl


class Attach(_Msg, tag="attach", frozen=True):
    lease_id: LeaseId
    cap: Cap


class Renew(_Msg, tag="renew", frozen=True):
    lease_id: LeaseId
    ttl: Ttl
    cap: Cap


class Free(_Msg, tag="free", frozen=True):
    lease_id: LeaseId
    cap: Cap


class Revoke(_Msg, tag="revoke", frozen=True):
    lease_id: LeaseId
    cap: Cap


class Status(_Msg, tag="status", frozen=True):
    lease_id: LeaseId
    cap: Cap


class Share(_Msg, tag="share", frozen=True):
    """Mint a capability with fewer rights (for a consumer) from one the caller holds."""

    lease_id: LeaseId
    cap: Cap
    rights: Annotated[int, msgspec.Meta(ge=0, le=0xFF)]


class AdminList(_Msg, tag="admin_list", frozen=True):
    """Admin only: every tenant, lease and usage."""


class AdminRevoke(_Msg, tag="admin_revoke", frozen=True):
    """Admin only: revoke any lease by id."""

    lease_id: LeaseId


class AdminMetrics(_Msg, tag="admin_metrics", frozen=True):
    """Admin only: the node's metrics in the Prometheus text format."""


# -- replies ----------------------------------------------------------------


class Challenge(_Msg, tag="challenge", frozen=True):
    version: U32Int
    node: Annotated[str, msgspec.Meta(max_length=64)]
    driver: Annotated[str, msgspec.Meta(max_length=32)]
    nonce: Nonce
    proof: Mac


class Welcome(_Msg, tag="welcome", frozen=True):
    node: Annotated[str, msgspec.Meta(max_length=64)]
    driver: Annotated[str, msgspec.Meta(max_length=32)]
    info: AccessMap
    max_request: U32Int
    idle_timeout: Seconds
    max_ttl: Ttl


class Connected(_Msg, tag="connected", frozen=True):
    params: AccessMap


class Granted(_Msg, tag="granted", frozen=True):
    """A lease: how to reach it (``access``), its capability, and how long it has left."""

    lease_id: LeaseId
    generation: U64Int
    nbytes: Nbytes
    ttl: Ttl
    remaining: Seconds
    writable: bool
    access: AccessMap
    cap: Cap


class Renewed(_Msg, tag="renewed", frozen=True):
    lease_id: LeaseId
    remaining: Seconds
    cap: Cap


class Done(_Msg, tag="done", frozen=True):
    lease_id: LeaseId


class Shared(_Msg, tag="shared", frozen=True):
    lease_id: LeaseId
    cap: Cap


class LeaseStatus(_Msg, tag="lease_status", frozen=True):
    lease_id: LeaseId
    state: Annotated[str, msgspec.Meta(pattern="^(active|expired|revoked|freed|unknown)$")]
    generation: U64Int
    remaining: Seconds


class TenantRow(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tenant: Name
    leases: U64Int
    bytes: U64Int
    connections: U64Int
    quota_bytes: U64Int
    max_leases: U64Int


class LeaseRow(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    lease_id: LeaseId
    tenant: Name
    generation: U64Int
    nbytes: U64Int
    offset: U64Int
    remaining: Seconds
    holders: U64Int


class Listing(_Msg, tag="listing", frozen=True):
    node: Annotated[str, msgspec.Meta(max_length=64)]
    driver: Annotated[str, msgspec.Meta(max_length=32)]
    pool_bytes: U64Int
    free_bytes: U64Int
    quarantined_bytes: U64Int
    connections: U64Int
    tenants: list[TenantRow]
    leases: list[LeaseRow]


class Metrics(_Msg, tag="metrics", frozen=True):
    text: Annotated[str, msgspec.Meta(max_length=MAX_REPLY // 2)]


class ErrorReply(_Msg, tag="error", frozen=True):
    """A failure: ``code`` is the status; ``kind`` names the exception class when the code alone does not."""

    code: int
    message: Text
    kind: Annotated[str, msgspec.Meta(max_length=64)] = ""


Request = (
    Hello | Auth | Connect | Alloc | Attach | Renew | Free | Revoke | Status | Share | AdminList | AdminRevoke
    | AdminMetrics
)
Reply = (
    Challenge | Welcome | Connected | Granted | Renewed | Done | Shared | LeaseStatus | Listing | Metrics
    | ErrorReply
)

_ENCODER = msgspec.msgpack.Encoder()
_REQ_DECODER: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(Request)
_REPLY_DECODER: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(Reply)

# Exceptions that travel by name (their code alone would name their base class).
_BY_KIND: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (Corrupted, VersionMismatch, FabricValueError, AuthFailed, CapabilityDenied, AccessDenied,
                QuotaExceeded, LimitExceeded)
}


def encode_frame(msg: msgspec.Struct, limit: int = MAX_REPLY) -> bytes:
    """One frame: a 4-byte big-endian length, then the msgpack body (at most ``limit`` bytes)."""
    body = _ENCODER.encode(msg)
    if len(body) > limit:
        raise FabricValueError(f"control message of {len(body)} bytes exceeds {limit}")
    return LEN.pack(len(body)) + body


def _decode(decoder: msgspec.msgpack.Decoder[Any], body: bytes, what: str) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as ex:
        raise Corrupted(f"invalid {what}: {ex}") from None
    except msgspec.DecodeError as ex:
        raise Corrupted(f"malformed {what}: {ex}") from None


def decode_request(body: bytes) -> Request:
    """Decode one request body; raises :class:`Corrupted` for anything malformed."""
    msg: Request = _decode(_REQ_DECODER, body, "request")
    return msg


def decode_reply(body: bytes) -> Reply:
    """Decode one reply body; raises :class:`Corrupted` for anything malformed."""
    msg: Reply = _decode(_REPLY_DECODER, body, "reply")
    return msg


def error_reply(ex: BaseException) -> ErrorReply:
    """The wire form of an exception raised while serving a request (internal errors say only their type)."""
    name = type(ex).__name__
    kind = name if name in _BY_KIND else ""
    if isinstance(ex, FabricError):
        return ErrorReply(code=ex.code, message=str(ex)[:4096], kind=kind)
    if isinstance(ex, FabricValueError):
        return ErrorReply(code=-5, message=str(ex)[:4096], kind=kind or "FabricValueError")
    return ErrorReply(code=-1, message=f"internal error ({name})", kind="")


def raise_for_reply(reply: ErrorReply) -> None:
    """Raise the typed exception an :class:`ErrorReply` stands for."""
    cls = _BY_KIND.get(reply.kind)
    if cls is not None:
        raise cls(reply.message)
    raise from_status(reply.code, reply.message)
