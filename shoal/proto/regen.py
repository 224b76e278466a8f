"""Regenerate shoal_pb2.py / shoal_pb2_grpc.py from shoal.proto.

Run from anywhere: ``python -m shoal.proto.regen`` (needs grpcio-tools, in the `dev` and `test`
extras). The generated files are committed so that a fresh clone works without it.
"""
from __future__ import annotations

import pathlib
import sys


def main() -> int:
    from grpc_tools import protoc

    root = pathlib.Path(__file__).resolve().parents[2]
    rc = protoc.main([
        "grpc_tools.protoc", f"-I{root}", f"--python_out={root}", f"--pyi_out={root}",
        f"--grpc_python_out={root}", str(root / "shoal" / "proto" / "shoal.proto"),
    ])
    if rc != 0:
        print(f"protoc failed with exit code {rc}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
