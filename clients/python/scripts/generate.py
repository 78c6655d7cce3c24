"""Regenerates src/arbiter_client/_descriptors.py from the project's proto
files (proto/arbiter/v1/*.proto), with grpcio-tools' protoc.

Run from anywhere: python3 clients/python/scripts/generate.py [--check]
With --check, exits 1 when the committed module differs from the protos."""

import argparse
import base64
import pathlib
import sys
import tempfile
import textwrap

HERE = pathlib.Path(__file__).resolve().parent
PACKAGE = HERE.parent / "src" / "arbiter_client"
PROTO = HERE.parents[2] / "proto"
OUTPUT = PACKAGE / "_descriptors.py"

HEADER = '''"""The arbiter.v1 API's file descriptors (a serialized FileDescriptorSet),
generated from proto/arbiter/v1 by scripts/generate.py. Do not edit."""

SERIALIZED = (
'''


def descriptor_set() -> bytes:
    """The FileDescriptorSet of proto/arbiter/v1, without source info, so it
    depends only on the protos."""
    from grpc_tools import protoc
    from google.protobuf import descriptor_pb2

    files = sorted(str(p.relative_to(PROTO)) for p in (PROTO / "arbiter" / "v1").glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "set.pb"
        rc = protoc.main(["protoc", f"-I{PROTO}", f"--descriptor_set_out={out}", *files])
        if rc != 0:
            raise SystemExit(f"protoc failed ({rc}) on {files}")
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    # Deterministic bytes: files in name order, serialized deterministically.
    fds_sorted = descriptor_pb2.FileDescriptorSet()
    fds_sorted.file.extend(sorted(fds.file, key=lambda f: f.name))
    return fds_sorted.SerializeToString(deterministic=True)


def render(data: bytes) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    lines = textwrap.wrap(encoded, 76)
    body = "".join(f'    "{line}"\n' for line in lines)
    return HEADER + body + ")\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed module is out of date")
    args = parser.parse_args()
    text = render(descriptor_set())
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run python3 {pathlib.Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
