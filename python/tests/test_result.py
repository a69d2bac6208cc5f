"""``vcid.EpochResult`` is derived from the wire message: every field of
``vcid.v1.EpochResult`` is an attribute, the ``optional double`` fields are
the metrics, and a field added to the proto reaches the Python class without
touching the package's code."""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

import vcid
from vcid.v1 import vcid_pb2 as pb

from test_stubs import _load_generator

PROTO_FIELDS = pb.EpochResult.DESCRIPTOR.fields


def _filled() -> pb.EpochResult:
    """Every field set to a distinct non-default value."""
    msg = pb.EpochResult()
    for i, f in enumerate(PROTO_FIELDS, start=1):
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            getattr(msg, f.name).update({"vci": f"why-{i}"})
        elif f.cpp_type == FieldDescriptor.CPPTYPE_STRING:
            setattr(msg, f.name, f"{f.name}-{i}")
        elif f.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
            setattr(msg, f.name, True)
        elif f.cpp_type in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
            setattr(msg, f.name, i / 8)
        else:
            setattr(msg, f.name, i)
    return msg


def test_every_proto_field_is_an_attribute():
    names = [f.name for f in PROTO_FIELDS]
    assert [f.name for f in dataclasses.fields(vcid.EpochResult)] == names
    msg = _filled()
    result = vcid.EpochResult.from_proto(msg)
    for f in PROTO_FIELDS:
        want = getattr(msg, f.name)
        got = getattr(result, f.name)
        assert (dict(want) if f.message_type else want) == got, f.name
    assert result.notes == dict(msg.notes) and isinstance(result.notes, dict)
    assert repr(result).startswith("EpochResult(run_id='run_id-1', split='split-2',")
    assert result.closed_at == dt.datetime.fromtimestamp(msg.closed_unix_ms / 1000,
                                                         tz=dt.timezone.utc)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.vci = 0.0
    assert result == vcid.EpochResult.from_proto(msg)


def test_the_metrics_are_the_optional_doubles():
    optional_doubles = tuple(f.name for f in PROTO_FIELDS if f.has_presence
                             and f.cpp_type == FieldDescriptor.CPPTYPE_DOUBLE)
    assert vcid.EpochResult.METRICS == optional_doubles
    assert {"vci", "linear_probe_mse", "nc1", "vci_delta"} <= set(optional_doubles)
    assert "close_seconds" not in optional_doubles  # a plain double is no metric
    empty = vcid.EpochResult.from_proto(pb.EpochResult(run_id="r", vci=0.25))
    assert empty.vci == 0.25
    assert all(getattr(empty, name) is None for name in optional_doubles[1:])
    assert (empty.samples, empty.notes, empty.small_sample) == (0, {}, False)


def test_a_field_added_to_the_proto_reaches_epoch_result(tmp_path):
    """The package, unchanged, with stubs generated from a proto whose
    EpochResult has two more fields, exposes both (in a fresh interpreter,
    since one process holds one vcid.v1 descriptor pool)."""
    gen = _load_generator()
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.fail("grpcio-tools is not installed: pip install './python[dev]'")
    package = tmp_path / "pkg"
    # The installed package: its Python files and its extension module.
    shutil.copytree(Path(vcid.__file__).parent, package / "vcid",
                    ignore=shutil.ignore_patterns("__pycache__"))
    proto_root = tmp_path / "proto"
    (proto_root / "vcid" / "v1").mkdir(parents=True)
    original = (gen.PROTO_ROOT / gen.PROTO_FILE).read_text()
    changed = original.replace(
        "  int64 closed_unix_ms = 22;\n}",
        "  int64 closed_unix_ms = 22;\n  optional double new_metric = 23;\n"
        "  uint32 new_count = 24;\n}")
    assert changed != original
    (proto_root / gen.PROTO_FILE).write_text(changed)
    gen.PROTO_ROOT = proto_root
    gen.generate(package)
    code = (
        "import json, vcid\n"
        "from vcid.v1 import vcid_pb2 as pb\n"
        "r = vcid.EpochResult.from_proto(pb.EpochResult(new_metric=0.5, new_count=7))\n"
        "print(json.dumps({'file': vcid.__file__, 'metrics': vcid.EpochResult.METRICS,\n"
        "                  'new_metric': r.new_metric, 'new_count': r.new_count,\n"
        "                  'absent': vcid.EpochResult().new_metric}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(package))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["file"].startswith(str(package))
    assert seen["metrics"] == list(vcid.EpochResult.METRICS) + ["new_metric"]
    assert (seen["new_metric"], seen["new_count"], seen["absent"]) == (0.5, 7, None)

