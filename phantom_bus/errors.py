"""Errors raised by Phantom code and carried on the wire as typed error replies.

Every error has a stable ``code`` (the string that travels in an error reply) so
that a client in any language can tell failures apart without parsing text.
"""

from __future__ import annotations

from typing import Any


class PhantomError(Exception):
    """Base class of every error Phantom raises on purpose.

    ``code`` is the wire name of the error; ``retry`` tells a client whether the
    same request may succeed if sent again later.
    """

    code = "error"
    retry = False

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        """The error as the ``error`` map of an error reply."""
        doc: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            doc["details"] = self.details
        return doc


class BadRequest(PhantomError):
    """The request is malformed: wrong frames, bad msgpack, wrong argument types."""

    code = "bad_request"


class UnsupportedVersion(BadRequest):
    """The message carries a protocol version this process does not speak."""

    code = "unsupported_version"


class UnknownOperation(BadRequest):
    """The service has no handler for the requested operation."""

    code = "unknown_operation"


class TooLarge(BadRequest):
    """The message is larger than the configured maximum."""

    code = "too_large"


class NotFound(PhantomError):
    """An id (node, shard, key space, service) is not known."""

    code = "not_found"


class Conflict(PhantomError):
    """The request contradicts the current state (duplicate, stale incarnation, ...)."""

    code = "conflict"


class Refused(PhantomError):
    """The request is understood but refused by policy (unsafe removal, not authorised)."""

    code = "refused"


class NoSuchKeyspace(NotFound):
    """The key space named in a request does not exist."""

    code = "no_such_keyspace"


class NoLiveReplica(PhantomError):
    """No live replica can serve the key right now."""

    code = "no_live_replica"
    retry = True


class ServiceUnavailable(PhantomError):
    """No live worker of the requested service is registered with the broker."""

    code = "service_unavailable"
    retry = True


class UnknownService(NotFound):
    """No worker ever registered under the requested service name (a typo, or a
    service this cluster does not run): retrying cannot help."""

    code = "unknown_service"


class Overloaded(PhantomError):
    """The broker or service queue for the request is full."""

    code = "overloaded"
    retry = True


class Timeout(PhantomError):
    """No reply arrived within the timeout, after every retry."""

    code = "timeout"
    retry = True


class BrokerUnreachable(Timeout):
    """The broker did not answer at all (not even with an error)."""

    code = "broker_unreachable"


class NotLeader(PhantomError):
    """This instance of a service is a follower; only its leader performs the operation.

    Retryable: the broker hands the retry to the next worker of the service,
    and ``details`` name the leader (``leader``, ``term``) when one is known.
    """

    code = "not_leader"
    retry = True


class InternalError(PhantomError):
    """A handler failed unexpectedly; the service logged the traceback."""

    code = "internal"


class StoreError(PhantomError):
    """The control-plane store cannot be used right now (backend down, disk full, read-only, timeout).

    The message carries the backend's own cause, e.g. "database or disk is full".
    """

    code = "store_unavailable"
    retry = True


class Compacted(StoreError):
    """A watch asked for history older than the store keeps: re-read (range), then watch again."""

    code = "compacted"


class CasFailed(Conflict):
    """A compare-and-swap found the key moved on (someone wrote first): re-read and decide again."""

    code = "cas_failed"


class Fenced(CasFailed):
    """The writer's leadership term is no longer current: it must stop acting as leader."""

    code = "fenced"


_BY_CODE: dict[str, type[PhantomError]] = {}


def _index(cls: type[PhantomError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _index(sub)


_index(PhantomError)


def error_from_wire(doc: Any) -> PhantomError:
    """Rebuild the exception for an ``error`` map from an error reply.

    Unknown codes become a plain :class:`PhantomError` that keeps the code, so a
    newer server never makes an older client crash.
    """
    if not isinstance(doc, dict):
        return PhantomError("malformed error reply: the 'error' field is not a map")
    code = str(doc.get("code", "error"))
    message = str(doc.get("message", "unknown error"))
    raw = doc.get("details")
    details: dict[str, Any] = {str(k): v for k, v in raw.items()} if isinstance(raw, dict) else {}
    cls = _BY_CODE.get(code)
    if cls is None:
        err = PhantomError(message, **details)
        err.code = code
        return err
    return cls(message, **details)
