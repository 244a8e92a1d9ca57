"""Every public exception of grafos-fabric, in one module.

Two families:

* :class:`FabricError` and its kinds carry the grafOS status code in ``.code``
  (``Disconnected`` -1, ``LeaseExpired`` -2, ``Fenced`` -3,
  ``CapacityExceeded`` -4, ``Unsupported`` -5, ``Revoked`` -6). They describe
  the *resource*: the lease ran out, the node went away, the epoch moved on.
* :class:`FabricValueError` (a :class:`ValueError`) and its kinds describe the
  *caller's input*: an oversize item, a wrong dtype, a corrupt locator. An
  argument of the wrong *type* raises :class:`FabricTypeError`, which is both a
  ``FabricValueError`` and a :class:`TypeError`.

A handle's own state has its errors too: :class:`QueueClosed` after
``close()``, :class:`QueueFreed` (a ``QueueClosed``) after ``free()``, and
:class:`ForkedHandle` when a handle inherited across ``fork()`` is used in the
child.

A third, small family answers "who are you and what may you do" on a memory
node: :class:`AccessDenied` (a :class:`FabricError` *and* a built-in
:class:`PermissionError`, code -7, grafos-fabric's own) with
:class:`AuthFailed` (the secret or tenant was not proven on connect) and
:class:`CapabilityDenied` (no valid capability for that lease, operation or
tenant). Limits a tenant runs into are :class:`CapacityExceeded` kinds:
:class:`QuotaExceeded` (bytes or lease count) and :class:`LimitExceeded`
(connections, request size): the caller may retry once it uses less.

Status codes become exceptions in one place, :func:`from_status` (the
native ring's, the memory node's replies and the UCX binding's all go through
its table).

Full and empty are never exceptions on the non-blocking calls (``try_push``
returns ``False``, ``try_pop`` returns ``None``); the blocking calls raise the
built-in :class:`TimeoutError` when their timeout runs out.
"""

from __future__ import annotations

__all__ = [
    "STATUS_ACCESS_DENIED",
    "STATUS_ARG",
    "STATUS_CLAIMED",
    "STATUS_CORRUPT",
    "STATUS_HELD",
    "STATUS_NOT_READY",
    "STATUS_OK",
    "STATUS_ROLE",
    "STATUS_SEALED",
    "STATUS_TOO_LARGE",
    "STATUS_VERSION",
    "AccessDenied",
    "AuthFailed",
    "CapabilityDenied",
    "CapacityExceeded",
    "Corrupted",
    "Disconnected",
    "DtypeMismatch",
    "EdgeError",
    "FabricError",
    "FabricTypeError",
    "FabricValueError",
    "Fenced",
    "ForkedHandle",
    "HeldItemsStall",
    "ItemTooLarge",
    "LeaseExpired",
    "LimitExceeded",
    "Misaligned",
    "NoRecord",
    "NotReady",
    "QueueClosed",
    "QueueFreed",
    "QueueSealed",
    "QuotaExceeded",
    "Revoked",
    "RoleTaken",
    "StaleEpoch",
    "Unsupported",
    "VersionMismatch",
    "from_status",
]

STATUS_OK = 0
STATUS_ACCESS_DENIED = -7  # not a grafOS status: the memory node's auth/capability refusals


class FabricError(Exception):
    """Base of every failure of a fabric resource. ``code`` is the grafOS status."""

    code: int = -5  # overridden by every kind; -5 only for the abstract base

    def __init__(self, message: str = "", *, code: int | None = None) -> None:
        super().__init__(message or self.__class__.__name__)
        if code is not None:
            self.code = code


class Disconnected(FabricError):
    """Transport failure: the node or connection is gone. A new connection may succeed.

    ``lease_live`` is true when the node, asked after the failure, answered
    that the lease is still active: only this client's connection to it was
    lost (a UCX node fences a client's whole session when *another* lease the
    session held ends), and the same handle's next operation reconnects.
    False when nothing is known (the node did not answer, or was not asked)."""

    code = -1
    lease_live: bool = False


class LeaseExpired(FabricError):
    """The lease's deadline passed; the resource fails closed and may be reclaimed."""

    code = -2


class Fenced(FabricError):
    """The caller was fenced out: its epoch or role is no longer the owner's."""

    code = -3


class StaleEpoch(Fenced):
    """A write stamped with an older fence epoch was rejected at the target."""

    def __init__(self, message: str = "", *, epoch: int | None = None, current: int | None = None) -> None:
        if not message and epoch is not None and current is not None:
            message = f"stale epoch {epoch}: the target is at epoch {current}"
        super().__init__(message)
        self.epoch = epoch
        self.current = current


class RoleTaken(Fenced):
    """A second producer (or consumer) tried to use a single-producer queue."""


class CapacityExceeded(FabricError):
    """Not enough capacity: an allocation can't be met, or an LBA is out of range."""

    code = -4


class HeldItemsStall(CapacityExceeded):
    """The consumer holds unreleased items that pin the ring while it waits for more.

    The producer cannot make progress until the consumer releases items, so
    waiting would deadlock; this is raised instead. Release items (``del``,
    ``item.release()``, ``with item:``) and try again.
    """


class Unsupported(FabricError):
    """The operation or transport is not available here (e.g. no RDMA device)."""

    code = -5


class Revoked(FabricError):
    """The lease was revoked. Not recoverable: the resource was taken away."""

    code = -6


class QuotaExceeded(CapacityExceeded):
    """A memory node refused a lease: the tenant's byte quota or lease count is used up."""


class LimitExceeded(CapacityExceeded):
    """A memory node refused a connection or request: too many connections, or a request too large."""


class AccessDenied(FabricError, PermissionError):
    """A memory node refused who the caller is or what it asked for (code -7).

    Also a :class:`PermissionError`, so ``except PermissionError`` catches it.
    """

    code = STATUS_ACCESS_DENIED


class AuthFailed(AccessDenied):
    """The challenge-response on connect failed: wrong or missing secret, unknown tenant,
    or (client side) a node that could not prove it knows the secret."""


class CapabilityDenied(AccessDenied):
    """No valid capability for this lease and operation: forged, expired, too few rights,
    another tenant's, or a lease id the node does not know (the node does not say which)."""


class QueueClosed(FabricError):
    """The queue was closed by this process; no further push or pop."""

    code = -1


class QueueFreed(QueueClosed):
    """The queue was freed by this handle (``free()``): its region is gone."""


class ForkedHandle(FabricError):
    """A queue handle inherited across ``fork()`` was used in the child.

    The child must not act through its parent's producer or consumer roles
    (both processes would drive one role at once and tear items): every
    operation of an inherited handle raises this. Attach again in the child
    (``FabricQueue.attach(fabric, locator)``). The parent's handle keeps working.
    """

    code = -5


class QueueSealed(QueueClosed):
    """The queue was sealed (relocation or consumer restart): it takes no more items.

    ``position`` is the sealed tail position, ``seal_seq`` the sequence number
    the sealer asked to resume from (``0`` when not given).
    """

    def __init__(self, message: str = "queue is sealed", *, seal_seq: int = 0) -> None:
        super().__init__(message)
        self.seal_seq = seal_seq


class EdgeError(FabricError):
    """A relocatable edge failed; ``kind`` names why (``"QueueFull"``, ``"RelocationFailed"``...)."""

    QUEUE_FULL = "QueueFull"
    RELOCATION_FAILED = "RelocationFailed"

    def __init__(self, kind: str, message: str = "", *, code: int = -4) -> None:
        super().__init__(message or kind, code=code)
        self.kind = kind


class FabricValueError(ValueError):
    """Base of every bad-input error (a :class:`ValueError`)."""


class FabricTypeError(FabricValueError, TypeError):
    """An argument of the wrong type (a ``str`` where bytes are needed, a float
    where an int is). Both a :class:`FabricValueError` and a :class:`TypeError`,
    so either ``except`` catches it."""


class Corrupted(FabricValueError):
    """Bytes read back (a locator, a segment, a record, a checkpoint) failed validation."""


class NoRecord(Corrupted):
    """A durable record area (checkpoint, handoff) holds no record at all: it was never written.

    A subclass of :class:`Corrupted` so code that only cares about "no usable
    record" catches both; code that must tell a fresh start from damage
    catches this one first. Never replaced by a default value.
    """


class VersionMismatch(FabricValueError):
    """The bytes carry a layout or format version this build does not speak."""


class NotReady(FabricValueError):
    """The segment is still being built (its version word is not yet written)."""


class ItemTooLarge(FabricValueError):
    """The item is larger than the queue's maximum item size."""


class DtypeMismatch(FabricValueError):
    """The array's dtype or layout does not match what the queue carries."""


class Misaligned(FabricValueError):
    """A block offset, length or buffer is not a whole number of device blocks."""


# The one status -> exception table. -1..-6 are grafOS's statuses and -7 grafos-fabric's
# refusal on a memory node; -10..-18 are the native ring's own (native/gf_native.h,
# GF_E_*: grafos_fabric._ffi refuses a build whose header disagrees with this table).
# Each entry: the exception and the message used when the caller gives none. The UCX
# binding's and the memory node's replies are translated into these codes, not mapped again.
STATUS_SEALED = -10
STATUS_ROLE = -11
STATUS_TOO_LARGE = -12
STATUS_CORRUPT = -13
STATUS_NOT_READY = -14
STATUS_VERSION = -15
STATUS_HELD = -16
STATUS_CLAIMED = -17
STATUS_ARG = -18

_STATUS: dict[int, tuple[type[Exception], str]] = {
    -1: (Disconnected, "disconnected"),
    -2: (LeaseExpired, "lease expired"),
    -3: (Fenced, "fenced: the epoch moved past this holder's"),
    -4: (CapacityExceeded, "capacity exceeded"),
    -5: (Unsupported, "unsupported"),
    -6: (Revoked, "lease revoked"),
    STATUS_ACCESS_DENIED: (AccessDenied, "access denied"),
    STATUS_SEALED: (QueueSealed, "queue is sealed"),
    STATUS_ROLE: (RoleTaken, "another process holds this role on the queue"),
    STATUS_TOO_LARGE: (ItemTooLarge, "item larger than the queue's maximum item size"),
    STATUS_CORRUPT: (Corrupted, "corrupted shared memory"),
    STATUS_NOT_READY: (NotReady, "segment is still being built"),
    STATUS_VERSION: (VersionMismatch, "segment has another layout version"),
    STATUS_HELD: (HeldItemsStall, "too many unreleased items"),
    STATUS_CLAIMED: (FabricValueError, "a reservation is outstanding: commit or abort it first"),
    STATUS_ARG: (FabricValueError, "invalid argument"),
}

# The native ring's statuses by their C names, for the import-time check in _ffi.
NATIVE_STATUS_NAMES: dict[str, int] = {
    "GF_E_DISCONNECTED": -1, "GF_E_EXPIRED": -2, "GF_E_FENCED": -3, "GF_E_CAPACITY": -4, "GF_E_UNSUPPORTED": -5,
    "GF_E_REVOKED": -6, "GF_E_SEALED": STATUS_SEALED, "GF_E_ROLE": STATUS_ROLE, "GF_E_TOO_LARGE": STATUS_TOO_LARGE,
    "GF_E_CORRUPT": STATUS_CORRUPT, "GF_E_NOT_READY": STATUS_NOT_READY, "GF_E_VERSION": STATUS_VERSION,
    "GF_E_HELD": STATUS_HELD, "GF_E_CLAIMED": STATUS_CLAIMED, "GF_E_ARG": STATUS_ARG,
}  # fmt: skip


def from_status(
    code: int,
    message: str = "",
    *,
    context: str = "",
    seal_seq: int = 0,
    epoch: int | None = None,
    current: int | None = None,
) -> Exception:
    """The exception a status code stands for (never raises; unknown codes give a
    :class:`FabricError` that keeps the value).

    ``message`` replaces the table's text, ``context`` is appended to it
    (``"lease expired: pushing"``). A fenced status (-3) that names an epoch is a
    :class:`StaleEpoch`; a sealed one carries ``seal_seq``.
    """
    kind = _STATUS.get(code)
    if kind is None:
        text = message or f"status {code}"
        return FabricError(f"{text}: {context}" if context else text, code=code)
    cls, default = kind
    text = message or default
    if context:
        text = f"{text}: {context}"
    if cls is Fenced and (epoch is not None or current is not None):
        return StaleEpoch(text, epoch=epoch, current=current)
    if cls is QueueSealed:
        return QueueSealed(text, seal_seq=seal_seq)
    return cls(text)
