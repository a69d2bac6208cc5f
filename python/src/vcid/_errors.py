"""The client's exception types. Owns how a gRPC failure becomes a Python
exception; must not decide retries (that is the Monitor's job)."""

from __future__ import annotations

import grpc


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
    """

    def __init__(self, code: str, message: str, context: str = "") -> None:
        self.code = code
        self.message = message
        self.context = context
        super().__init__(code, message, context)

    def __str__(self) -> str:
        text = f"{self.code}: {self.message}"
        if self.context:
            text += f" [{self.context}]"
        return text

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError, context: str = "") -> "VcidError":
        """Wrap a ``grpc.RpcError`` keeping the status name and the server's text."""
        code_fn = getattr(err, "code", None)
        details_fn = getattr(err, "details", None)
        code = code_fn() if callable(code_fn) else None
        name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
        message = details_fn() if callable(details_fn) else None
        return cls(name, message if message is not None else str(err), context)


class QueueFullError(VcidError):
    """``push()`` could not queue a batch within ``queue_timeout`` because the
    sender thread fell behind (the daemon is slow or unreachable). The batch
    was not queued; nothing is dropped silently. Raise ``queue_size`` or
    ``queue_timeout``, or push less often."""

    def __init__(self, message: str) -> None:
        super().__init__("RESOURCE_EXHAUSTED", message)
