"""``Client``: read-only access to a daemon's runs and epoch results, for
notebooks, dashboards and scripts that look at training from outside.

Owns the read calls (``ListRuns``, ``GetRun``, ``GetHistory``, ``Watch``)
and the pandas view of a history. Must never create, change or delete
anything on the daemon (``Monitor`` does that).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, List, Optional

from ._connection import CONNECT_TIMEOUT, Connection
from ._names import check_run_id, check_stream_filter
from ._result import EpochResult, RunInfo
from .v1 import vcid_pb2 as pb


class Client:
    """Read the runs and histories of a vcid daemon; changes nothing.

    Args:
        address: ``host:port`` or ``http://host:port``; None (the default)
            finds the daemon as ``Monitor`` does: ``$VCID_ADDR``, else
            ``127.0.0.1:50051``, starting the local daemon if it is not
            running (so histories kept in its data directory can be read).
        token: bearer token when the daemon requires one.
        timeout: deadline of each call, in seconds.
        tls_ca, tls_client_cert, tls_client_key: PEM files for a daemon
            serving TLS (default: ``$VCID_TLS_CA``, ``$VCID_TLS_CLIENT_CERT``,
            ``$VCID_TLS_CLIENT_KEY``); an ``https://`` address alone uses
            gRPC's bundled CA roots.
        connect_timeout: how long the first contact may take.

    An unknown run raises ``VcidError`` with ``code == "NOT_FOUND"``.
    """

    def __init__(self, address: Optional[str] = None, *, token: Optional[str] = None,
                 timeout: float = 60.0, connect_timeout: float = CONNECT_TIMEOUT,
                 tls_ca: Optional[str] = None, tls_client_cert: Optional[str] = None,
                 tls_client_key: Optional[str] = None) -> None:
        self._conn = Connection(address, token=token, timeout=timeout,
                                reconnect_timeout=timeout, connect_timeout=connect_timeout,
                                tls_ca=tls_ca, tls_client_cert=tls_client_cert,
                                tls_client_key=tls_client_key)

    @property
    def address(self) -> str:
        """The daemon's gRPC address, ``http://host:port``."""
        return self._conn.url

    def runs(self) -> List[RunInfo]:
        """Every run of the daemon."""
        msg = self._conn.unary(self._conn.stub.ListRuns, pb.ListRunsRequest(),
                               what="ListRuns", retry=True)
        return [RunInfo.from_proto(r) for r in msg.runs]

    def run(self, run_id: str) -> RunInfo:
        """One run (``NOT_FOUND`` if there is none of that name)."""
        req = pb.GetRunRequest(run_id=check_run_id(run_id, "run_id"))
        return RunInfo.from_proto(self._conn.unary(self._conn.stub.GetRun, req,
                                                   what="GetRun", retry=True))

    def history(self, run_id: str, split: Optional[str] = None,
                layer: Optional[str] = None) -> List[EpochResult]:
        """The run's closed epoch results, ordered by split, layer, epoch;
        None filters (the default) mean every split / every layer."""
        return self._conn.history(check_run_id(run_id, "run_id"),
                                  check_stream_filter("split", split),
                                  check_stream_filter("layer", layer))

    def history_frame(self, run_id: str, split: Optional[str] = None,
                      layer: Optional[str] = None) -> Any:
        """``history(...)`` as a ``pandas.DataFrame``, one row per epoch
        result and one column per ``EpochResult`` field (undefined metrics
        are NaN). Needs pandas; without it, use
        ``[r.to_dict() for r in client.history(...)]``."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                "vcid.Client.history_frame needs pandas (pip install pandas); without it, "
                "use [r.to_dict() for r in client.history(run_id)]") from None
        rows = [r.to_dict() for r in self.history(run_id, split, layer)]
        return pd.DataFrame(rows, columns=[f.name for f in dataclasses.fields(EpochResult)])

    def watch(self, run_id: str, split: Optional[str] = None,
              layer: Optional[str] = None) -> Iterator[EpochResult]:
        """Yield every epoch result of the run as the daemon produces it.
        Stop by breaking out of the loop."""
        return self._conn.watch(check_run_id(run_id, "run_id"),
                                check_stream_filter("split", split),
                                check_stream_filter("layer", layer))

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
