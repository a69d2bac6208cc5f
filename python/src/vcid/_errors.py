"""The client's exception types. Owns how a gRPC failure becomes a Python
exception, including the decoding of the server's structured error details
(``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer), and the
exception of a bad argument caught before anything is sent. Must not decide
retries (that is the sender's and the Monitor's job)."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import grpc
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# The detail types the daemon attaches, by full name. Others are kept as
# the packed ``google.protobuf.Any``.
_DETAIL_TYPES = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (error_details_pb2.BadRequest, error_details_pb2.ResourceInfo,
                error_details_pb2.QuotaFailure)
}


class VcidError(Exception):
    """A request failed: the daemon rejected it, or it could not be delivered.

    Attributes:
        code: the gRPC status name (``"INVALID_ARGUMENT"``, ``"NOT_FOUND"``,
            ``"FAILED_PRECONDITION"``, ``"UNAVAILABLE"``, ...).
        message: the daemon's message, unchanged (it names the field, the
            expected and the received value). Client-side context, if any,
            is in ``context``.
        context: what the client was doing, and what became of the batches
            it still held (empty when there is nothing to add).
        field: the request field the daemon rejected (the first field
            violation of its ``google.rpc.BadRequest`` detail, e.g.
            ``"labels"``), or None.
        resource: the name of the resource the error is about (its
            ``google.rpc.ResourceInfo`` detail: the run id of a
            ``NOT_FOUND`` run), or None.
        details: every structured detail the daemon sent, decoded
            (``google.rpc.BadRequest``, ``ResourceInfo``, ``QuotaFailure``,
            ...; an unknown type stays a ``google.protobuf.Any``); empty
            when there were none.
    """

    def __init__(self, code: str, message: str, context: str = "",
                 details: Tuple[Message, ...] = ()) -> None:
        self.code = code
        self.message = message
        self.context = context
        self.details = tuple(details)
        self.field: Optional[str] = next(
            (v.field for d in self.details if isinstance(d, error_details_pb2.BadRequest)
             for v in d.field_violations), None)
        self.resource: Optional[str] = next(
            (d.resource_name for d in self.details
             if isinstance(d, error_details_pb2.ResourceInfo)), None)
        super().__init__(code, message, context)

    def __str__(self) -> str:
        text = f"{self.code}: {self.message}"
        if self.context:
            text += f" [{self.context}]"
        return text

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError, context: str = "") -> "VcidError":
        """Wrap a ``grpc.RpcError`` keeping the status name, the server's text
        and its structured details."""
        code_fn = getattr(err, "code", None)
        details_fn = getattr(err, "details", None)
        code = code_fn() if callable(code_fn) else None
        name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
        message = details_fn() if callable(details_fn) else None
        return cls(name, message if message is not None else str(err), context,
                   _status_details(err))


def _status_details(call: Any) -> Tuple[Message, ...]:
    """The decoded ``google.rpc.Status.details`` of a failed call (empty
    when it carries none, or when they do not belong to its status)."""
    if not callable(getattr(call, "trailing_metadata", None)):
        return ()
    try:
        status = rpc_status.from_call(call)
    except (ValueError, DecodeError):
        # from_call refuses a trailer whose code or message disagree with
        # the call's own status: such details describe something else.
        return ()
    if status is None:
        return ()
    out = []
    for packed in status.details:
        cls = _DETAIL_TYPES.get(packed.TypeName())
        if cls is None:
            out.append(packed)
            continue
        detail = cls()
        packed.Unpack(detail)
        out.append(detail)
    return tuple(out)


class ArgumentError(ValueError):
    """A bad argument, caught by the client before anything was sent.

    A ``ValueError`` whose message names the argument, the expected and the
    received value; ``field`` is the argument's name (``"features"``,
    ``"labels"``, ``"split"``, ``"num_classes"``, ...), like
    ``VcidError.field`` for what the daemon rejects.
    """

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        super().__init__(f"{field}: {problem}")


class QueueFullError(VcidError):
    """``push()`` could not queue a batch within ``queue_timeout`` because the
    sender thread fell behind (the daemon is slow or unreachable). The batch
    was not queued; nothing is dropped silently. Raise ``queue_size`` or
    ``queue_timeout``, or push less often."""

    def __init__(self, message: str) -> None:
        super().__init__("RESOURCE_EXHAUSTED", message)


class OpenEpochWarning(UserWarning):
    """A ``Monitor`` closed while epochs it pushed to were still open in the
    daemon (their statistics stay in its memory until someone closes them).
    Filter it on ranks that leave the closing to another process:
    ``warnings.simplefilter("ignore", vcid.OpenEpochWarning)``."""
