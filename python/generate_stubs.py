#!/usr/bin/env python3
"""Regenerate the committed gRPC stubs of the vcid package from proto/.

Usage (from anywhere):

    python python/generate_stubs.py            # rewrite python/src/vcid/v1/
    python python/generate_stubs.py --out DIR  # write into DIR/vcid/v1/ instead

Needs the pinned generator: ``pip install 'grpcio-tools==1.78.0'`` (the
``dev`` extra of the package). The test ``tests/test_stubs.py`` runs this into
a temporary directory and fails when the committed files differ, so a change
to ``proto/vcid/v1/vcid.proto`` without regenerating is caught.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Keep in step with pyproject.toml's dev extra and the protobuf lower bound.
GRPCIO_TOOLS_VERSION = "1.78.0"

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROTO_ROOT = REPO / "proto"
PROTO_FILE = "vcid/v1/vcid.proto"
PACKAGE_SRC = HERE / "src"
GENERATED = ("vcid_pb2.py", "vcid_pb2.pyi", "vcid_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Run the bundled protoc into ``out_root``; return the generated files."""
    try:
        from grpc_tools import protoc
        import grpc_tools
        from importlib.metadata import version
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise SystemExit(
            f"grpcio-tools is needed to regenerate the stubs: pip install "
            f"'grpcio-tools=={GRPCIO_TOOLS_VERSION}' ({exc})"
        )
    installed = version("grpcio-tools")
    if installed != GRPCIO_TOOLS_VERSION:
        raise SystemExit(
            f"grpcio-tools: expected version {GRPCIO_TOOLS_VERSION} (the one the "
            f"committed stubs and the protobuf pin are made for), received {installed}"
        )
    out_root.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        PROTO_FILE,
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit status {code}")
    out_dir = out_root / "vcid" / "v1"
    return [out_dir / name for name in GENERATED]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACKAGE_SRC,
                        help="root directory to write vcid/v1/*.py into (default: python/src)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
