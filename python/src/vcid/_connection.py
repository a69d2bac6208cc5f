"""Where the daemon is and how to reach it, for ``Monitor`` and ``Client``.

Owns the address rules (``host:port``, ``http://host:port`` or
``https://host:port``; no address means ``$VCID_ADDR``, else
``127.0.0.1:50051``), TLS (an ``https://`` address or a CA/client
certificate file, from the arguments or ``$VCID_TLS_CA``,
``$VCID_TLS_CLIENT_CERT``, ``$VCID_TLS_CLIENT_KEY`` as on the command
line), the gRPC channel and its options, the bounded first contact (an address that does not answer fails
within ``connect_timeout`` with the command line's hint), unary calls with
their retries (jittered), and ``Watch``. Starting a local daemon when no
address was given is ``_autostart``'s; what the calls mean is the callers'.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import threading
import time
from typing import Any, Dict, Iterator, Optional, Tuple

import grpc

from . import _autostart
from ._errors import ArgumentError, VcidError
from ._result import EpochResult
from .v1 import vcid_pb2 as pb
from .v1 import vcid_pb2_grpc as pb_grpc

#: Where ``vcid serve`` listens unless told otherwise.
DEFAULT_ADDRESS = "127.0.0.1:50051"
#: How long the first contact may take before the address counts as
#: unreachable (the command line's bound too).
CONNECT_TIMEOUT = 5.0

# Only transport-level unavailability is retried: every other status means
# the daemon looked at the request and refused it, and a retry would fail
# the same way.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", 256 << 20),
    # gRPC's default reconnect backoff grows to 120 s; a restarted daemon
    # should be found again within a couple of seconds.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_permit_without_calls", 0),
]


def parse_address(address: Any, argument: str = "address") -> Tuple[str, Optional[str]]:
    """(``host:port``, scheme) from ``host:port`` (scheme None),
    ``http://host:port`` or ``https://host:port`` (IPv6 hosts in brackets,
    a trailing ``/`` ignored)."""
    expected = "'host:port', 'http://host:port' or 'https://host:port'"
    if not isinstance(address, str):
        raise ArgumentError(argument, f"expected {expected}, received "
                                      f"{type(address).__name__} {address!r}")
    text = address.strip()
    scheme, sep, rest = text.partition("://")
    if sep:
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise ArgumentError(argument, f"expected {expected}, received {address!r}")
        text = rest
    else:
        scheme = None
    text = text.rstrip("/")
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in text:
        raise ArgumentError(argument, f"expected {expected}, received {address!r}")
    return text, scheme


def split_host_port(target: str) -> Tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(target: str) -> bool:
    host, _ = split_host_port(target)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve(address: Optional[str]) -> Tuple[str, Optional[str], bool]:
    """(``host:port``, its scheme, whether a local daemon may be started
    there): an explicit address never starts one; ``$VCID_ADDR`` and the
    default do when they are on this machine."""
    if address is not None:
        return (*parse_address(address), False)
    env = os.environ.get("VCID_ADDR", "").strip()
    target, scheme = parse_address(env, "VCID_ADDR") if env else (DEFAULT_ADDRESS, None)
    return target, scheme, is_loopback(target)


#: The TLS files of a client: argument name and environment variable (the
#: command line's flags read the same variables).
TLS_FILES = (("tls_ca", "VCID_TLS_CA"), ("tls_client_cert", "VCID_TLS_CLIENT_CERT"),
             ("tls_client_key", "VCID_TLS_CLIENT_KEY"))


def tls_credentials(files: Dict[str, Optional[str]]) -> Optional[grpc.ChannelCredentials]:
    """Channel credentials from the TLS files given (an argument, else its
    environment variable); None when none is given."""
    paths: Dict[str, str] = {}
    for name, env in TLS_FILES:
        value = files.get(name)
        if value is None:
            value = os.environ.get(env, "").strip() or None
        if value is not None:
            paths[name] = os.fspath(value)
    if not paths:
        return None
    if ("tls_client_cert" in paths) != ("tls_client_key" in paths):
        missing = "tls_client_key" if "tls_client_cert" in paths else "tls_client_cert"
        raise ArgumentError(missing, "expected tls_client_cert and tls_client_key together, "
                                     "received only one of them")
    data: Dict[str, bytes] = {}
    for name, path in paths.items():
        try:
            with open(path, "rb") as f:
                data[name] = f.read()
        except OSError as err:
            raise ArgumentError(name, f"expected a readable PEM file, received {path!r}: "
                                      f"{err.strerror or err}") from None
    return grpc.ssl_channel_credentials(root_certificates=data.get("tls_ca"),
                                        private_key=data.get("tls_client_key"),
                                        certificate_chain=data.get("tls_client_cert"))


def jittered(delay: float) -> float:
    """``delay`` scaled by a random factor in [0.5, 1.5), so processes that
    lost the daemon together do not retry in lockstep."""
    return delay * (0.5 + random.random())


def unreachable(url: str, cause: str) -> VcidError:
    return VcidError(
        "UNAVAILABLE",
        f"cannot reach the vcid server at {url}: {cause} (is `vcid serve` "
        f"running there? set VCID_ADDR or pass address=; with neither, vcid starts a "
        f"local daemon)",
    )


class Connection:
    """A channel to one daemon, checked to answer.

    Args:
        address: ``host:port``, ``http://host:port`` or ``https://host:port``;
            None for ``$VCID_ADDR``, else ``127.0.0.1:50051``, where a local
            daemon is started if nothing answers (see ``_autostart``).
        token: bearer token when the daemon requires one.
        tls_ca, tls_client_cert, tls_client_key: PEM files (None: from
            ``$VCID_TLS_CA`` etc.); any of them, or an ``https://``
            address, means TLS (without a CA file: gRPC's bundled roots).
        timeout: deadline of unary calls, in seconds.
        reconnect_timeout: how long retried calls keep retrying while the
            daemon is unavailable.
        connect_timeout: bound of the first contact.
    """

    def __init__(self, address: Optional[str], *, token: Optional[str] = None,
                 timeout: float = 60.0, reconnect_timeout: float = 60.0,
                 connect_timeout: float = CONNECT_TIMEOUT, tls_ca: Optional[str] = None,
                 tls_client_cert: Optional[str] = None,
                 tls_client_key: Optional[str] = None) -> None:
        target, scheme, may_start = resolve(address)
        credentials = tls_credentials({"tls_ca": tls_ca, "tls_client_cert": tls_client_cert,
                                       "tls_client_key": tls_client_key})
        if scheme == "https" and credentials is None:
            credentials = grpc.ssl_channel_credentials()
        if scheme == "http" and credentials is not None:
            raise ArgumentError("address", "expected an https:// address (or host:port) with "
                                           f"TLS files, received {address!r}")
        self.tls = credentials is not None
        if may_start and not self.tls:
            _autostart.ensure_local_daemon(target)
        self.target = target
        self.timeout = float(timeout)
        self.reconnect_timeout = float(reconnect_timeout)
        self.metadata = [("authorization", f"Bearer {token}")] if token else None
        self.closing = threading.Event()  # ends the retries of unary calls
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)
        self.stub = pb_grpc.VciMonitorStub(self.channel)
        try:
            self._wait_reachable(float(connect_timeout))
        except BaseException:
            self.channel.close()
            raise

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.target}"

    def _wait_reachable(self, timeout: float) -> None:
        """A refused connection fails at once; a listener that does not
        speak gRPC within ``timeout`` seconds fails then."""
        deadline = time.monotonic() + timeout
        try:
            socket.create_connection(split_host_port(self.target), timeout=timeout).close()
        except OSError as err:
            raise unreachable(self.url, err.strerror or str(err)) from None
        # Ask again every second: a channel whose first attempt failed (the
        # daemon was restarting) may go idle and not retry by itself.
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                hint = (" (TLS: does the daemon serve TLS, and does tls_ca / $VCID_TLS_CA hold "
                        "the CA of its certificate?)" if self.tls else "")
                raise unreachable(self.url, f"no gRPC answer within {timeout:g}s{hint}")
            try:
                grpc.channel_ready_future(self.channel).result(timeout=min(1.0, remaining))
                return
            except grpc.FutureTimeoutError:
                continue

    def unary(self, method: Any, request: Any, what: str, timeout: Optional[float] = None,
              retry: bool = False) -> Any:
        """One unary call; waits for the channel to be ready up to the
        deadline. With ``retry`` (idempotent calls only) an UNAVAILABLE
        failure is retried, with jittered exponential backoff, until
        ``reconnect_timeout``."""
        deadline = time.monotonic() + (self.reconnect_timeout if retry else 0)
        backoff = 0.05
        while True:
            try:
                return method(request, timeout=self.timeout if timeout is None else timeout,
                              metadata=self.metadata, wait_for_ready=True)
            except grpc.RpcError as err:
                if (retry and err.code() in RETRYABLE and time.monotonic() < deadline
                        and not self.closing.is_set()):
                    self.closing.wait(jittered(backoff))
                    backoff = min(backoff * 2, 1.0)
                    continue
                raise VcidError.from_rpc_error(err, f"{what} to {self.url}") from None

    def history(self, run_id: str, split: str, layer: str) -> list:
        """``GetHistory`` (filters already checked; ``""`` means all)."""
        req = pb.GetHistoryRequest(run_id=run_id, split=split, layer=layer)
        msg = self.unary(self.stub.GetHistory, req, what="GetHistory", retry=True)
        return [EpochResult.from_proto(r) for r in msg.results]

    def watch(self, run_id: str, split: str, layer: str) -> Iterator[EpochResult]:
        """``Watch`` until the caller stops iterating."""
        req = pb.WatchRequest(run_id=run_id, split=split, layer=layer)
        call = self.stub.Watch(req, metadata=self.metadata, wait_for_ready=True)
        try:
            for msg in call:
                yield EpochResult.from_proto(msg)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                raise VcidError.from_rpc_error(err, f"Watch to {self.url}") from None
        finally:
            call.cancel()

    def close(self) -> None:
        self.closing.set()
        self.channel.close()
