"""The committed gRPC stubs match what the pinned generator makes from proto/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PYTHON_DIR = HERE.parent
COMMITTED = PYTHON_DIR / "src" / "vcid" / "v1"


def _load_generator():
    spec = importlib.util.spec_from_file_location("generate_stubs",
                                                  PYTHON_DIR / "generate_stubs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_up_to_date(tmp_path):
    gen = _load_generator()
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.fail("grpcio-tools is not installed: pip install './python[dev]' "
                    f"(grpcio-tools=={gen.GRPCIO_TOOLS_VERSION}) to check the stubs")
    files = gen.generate(tmp_path)
    stale = []
    for fresh in files:
        committed = COMMITTED / fresh.name
        if not committed.exists() or committed.read_bytes() != fresh.read_bytes():
            stale.append(fresh.name)
    assert not stale, (
        f"stubs {stale} in {COMMITTED} differ from proto/vcid/v1/vcid.proto: run "
        f"`python python/generate_stubs.py` and commit the result"
    )


def test_stale_stub_is_detected(tmp_path):
    """The comparison above can fail: a changed proto gives different stubs."""
    gen = _load_generator()
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.fail("grpcio-tools is not installed")
    proto_root = tmp_path / "proto"
    (proto_root / "vcid" / "v1").mkdir(parents=True)
    original = (gen.PROTO_ROOT / gen.PROTO_FILE).read_text()
    changed = original.replace("uint64 sequence = 10;", "uint64 sequence = 10;\n  bool extra = 99;")
    assert changed != original
    (proto_root / gen.PROTO_FILE).write_text(changed)
    gen.PROTO_ROOT = proto_root
    files = gen.generate(tmp_path / "out")
    fresh = next(f for f in files if f.name == "vcid_pb2.py")
    assert fresh.read_bytes() != (COMMITTED / "vcid_pb2.py").read_bytes()


def test_import_vcid_does_not_import_torch():
    import subprocess
    code = "import sys, vcid; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
