"""Structured error details: a real gRPC server (grpcio's own, on a loopback
port) rejects calls the way the daemon does, with a ``google.rpc.Status`` in
the ``grpc-status-details-bin`` trailer, and the Monitor's ``VcidError``
carries the decoded ``field``, ``resource`` and ``details`` through unary
calls and through the sender thread's ``Push`` stream. Also: arguments the
client rejects itself name their field in ``ArgumentError.field``."""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

import vcid
from vcid._names import RUN_ID_MAX_LEN, STREAM_NAME_MAX_LEN, check_run_id, check_stream_name
from vcid.v1 import vcid_pb2 as pb
from vcid.v1 import vcid_pb2_grpc as pb_grpc

from test_local import BAD_INPUTS


def _abort(context, code: int, message: str, *details) -> None:
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    status = status_pb2.Status(code=code, message=message, details=packed)
    context.abort_with_status(rpc_status.to_status(status))


class RejectingServicer(pb_grpc.VciMonitorServicer):
    """Creates runs; rejects everything else with the details the daemon
    attaches for that kind of error."""

    def CreateRun(self, request, context):
        if request.feature_dim > 4096:
            _abort(context, code_pb2.INVALID_ARGUMENT,
                   f"feature_dim: expected at most 4096, received {request.feature_dim}",
                   error_details_pb2.BadRequest(field_violations=[
                       error_details_pb2.BadRequest.FieldViolation(
                           field="feature_dim", description="expected at most 4096")]))
        return pb.Run(run_id=request.run_id, num_classes=request.num_classes,
                      feature_dim=request.feature_dim)

    def GetRun(self, request, context):
        _abort(context, code_pb2.NOT_FOUND, f"run_id: no run {request.run_id!r}",
               error_details_pb2.ResourceInfo(resource_type="run",
                                              resource_name=request.run_id))

    def PushStats(self, request, context):
        _abort(context, code_pb2.RESOURCE_EXHAUSTED, "memory budget exhausted",
               error_details_pb2.QuotaFailure(violations=[
                   error_details_pb2.QuotaFailure.Violation(
                       subject="memory_budget", description="needs 1 MiB more")]))

    def Push(self, request_iterator, context):
        batch = next(request_iterator)
        _abort(context, code_pb2.INVALID_ARGUMENT,
               f"labels: expected every label in [0, 3), received 7 (sequence {batch.sequence})",
               error_details_pb2.BadRequest(field_violations=[
                   error_details_pb2.BadRequest.FieldViolation(
                       field="labels", description="expected every label in [0, 3)")]),
               error_details_pb2.DebugInfo(detail="a detail type the client does not decode"))

    def CloseEpoch(self, request, context):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "epoch 0 is already closed")


@pytest.fixture
def server():
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_VciMonitorServicer_to_server(RejectingServicer(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}"
    srv.stop(grace=None)


def test_bad_request_names_the_field(server):
    with pytest.raises(vcid.VcidError) as info:
        vcid.Monitor("r", 3, 5000, address=server)
    err = info.value
    assert err.code == "INVALID_ARGUMENT"
    assert err.field == "feature_dim"
    assert err.message == "feature_dim: expected at most 4096, received 5000"
    assert err.context == f"CreateRun to http://{server}"
    assert err.resource is None
    (detail,) = err.details
    assert isinstance(detail, error_details_pb2.BadRequest)
    assert detail.field_violations[0].description == "expected at most 4096"


def test_not_found_names_the_run(server):
    with vcid.Monitor("lost-run", 3, 4, address=server) as mon:
        with pytest.raises(vcid.VcidError) as info:
            mon.run_info()
    err = info.value
    assert (err.code, err.resource, err.field) == ("NOT_FOUND", "lost-run", None)
    assert err.details[0].resource_type == "run"
    assert err.context == f"GetRun to http://{server}"


def test_quota_failure_is_decoded(server):
    acc = vcid.LocalAccumulator(3, 4).update(np.eye(4)[:3], np.array([0, 1, 2]))
    with vcid.Monitor("r", 3, 4, address=server) as mon:
        with pytest.raises(vcid.VcidError) as info:
            mon.push_stats(acc, epoch=0)
    err = info.value
    assert err.code == "RESOURCE_EXHAUSTED" and err.field is None
    (detail,) = err.details
    assert isinstance(detail, error_details_pb2.QuotaFailure)
    assert (detail.violations[0].subject, detail.violations[0].description) == (
        "memory_budget", "needs 1 MiB more")


def test_push_stream_rejection_keeps_its_details(server):
    """Through the sender thread: the deferred error of a ``Push`` stream."""
    mon = vcid.Monitor("r", 3, 4, address=server)
    mon.push(np.ones((2, 4)), np.array([0, 1]), epoch=0)
    with pytest.raises(vcid.VcidError) as info:
        mon.flush()
    mon.close()
    err = info.value
    assert err.code == "INVALID_ARGUMENT"
    assert err.field == "labels"
    assert err.message.startswith("labels: expected every label in [0, 3), received 7")
    assert "1 batches (2 rows)" in err.context
    bad_request, unknown = err.details
    assert isinstance(bad_request, error_details_pb2.BadRequest)
    # A type the client does not decode stays packed, readable by the caller.
    assert isinstance(unknown, any_pb2.Any)
    debug = error_details_pb2.DebugInfo()
    assert unknown.Unpack(debug) and debug.detail.startswith("a detail type")


def test_error_without_details(server):
    with vcid.Monitor("r", 3, 4, address=server) as mon:
        with pytest.raises(vcid.VcidError) as info:
            mon.close_epoch(0)
    err = info.value
    assert err.code == "FAILED_PRECONDITION"
    assert (err.field, err.resource, err.details) == (None, None, ())
    assert err.message == "epoch 0 is already closed"


# ------------------------------------------------------ client-side checks


@pytest.mark.parametrize("case,features,labels,message", BAD_INPUTS,
                         ids=[c[0] for c in BAD_INPUTS])
def test_argument_errors_name_their_field(case, features, labels, message):
    with pytest.raises(vcid.ArgumentError) as info:
        vcid.LocalAccumulator(3, 4).update(features, labels)
    field = message.split(":")[0]
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: expected ")


def test_name_limits_and_constructor_arguments():
    assert check_run_id("r" * RUN_ID_MAX_LEN) == "r" * RUN_ID_MAX_LEN
    assert check_stream_name("split", "s" * STREAM_NAME_MAX_LEN) == "s" * STREAM_NAME_MAX_LEN
    cases = [
        (lambda: check_run_id("r" * (RUN_ID_MAX_LEN + 1)), "run"),
        (lambda: check_stream_name("layer", "s" * (STREAM_NAME_MAX_LEN + 1)), "layer"),
        (lambda: check_stream_name("split", "a b"), "split"),
        (lambda: vcid.Monitor("r", num_classes=1, feature_dim=4, address="127.0.0.1:1"),
         "num_classes"),
        (lambda: vcid.Monitor("r", 3, 4, encoding="int8", address="127.0.0.1:1"), "encoding"),
        (lambda: vcid.LocalAccumulator(3, 0), "feature_dim"),
    ]
    for call, field in cases:
        with pytest.raises(vcid.ArgumentError) as info:
            call()
        assert info.value.field == field, info.value


def test_daemon_details_reach_the_client(daemon, run_id):
    """End to end against the real daemon: the details it attaches
    (README, API → Errors) arrive decoded in ``VcidError``. Raw stubs, so
    the request reaches the daemon unchecked by the client."""
    with grpc.insecure_channel(daemon.address) as channel:
        stub = pb_grpc.VciMonitorStub(channel)
        # INVALID_ARGUMENT with a BadRequest naming the field.
        with pytest.raises(grpc.RpcError) as raised:
            stub.CreateRun(pb.CreateRunRequest(run_id=run_id, num_classes=1, feature_dim=4))
        err = vcid.VcidError.from_rpc_error(raised.value)
        assert err.code == "INVALID_ARGUMENT"
        assert err.field == "num_classes"
        assert isinstance(err.details[0], error_details_pb2.BadRequest)
        # NOT_FOUND with a ResourceInfo naming the run.
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetRun(pb.GetRunRequest(run_id=run_id))
        err = vcid.VcidError.from_rpc_error(raised.value)
        assert (err.code, err.resource, err.field) == ("NOT_FOUND", run_id, None)
        assert err.details[0].resource_type == "run"
