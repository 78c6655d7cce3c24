"""Python stubs compiled from the project's own proto files at run time
(grpcio-tools' protoc), shared by tests/python and cluster/e2e.py."""

import importlib
import pathlib
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto"


class Pb:
    """The generated modules: rl (RateLimiter), ls (Leases), idem
    (Idempotency) and cl (Cluster), each with its *_grpc companion."""


def compile_stubs():
    out = tempfile.mkdtemp(prefix="arbiter-pb-")
    files = sorted(str(p.relative_to(PROTO)) for p in (PROTO / "arbiter" / "v1").glob("*.proto"))
    include = str(pathlib.Path(protoc.__file__).parent / "_proto")
    rc = protoc.main(["protoc", f"-I{PROTO}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", *files])
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc}) on {files}")
    sys.path.insert(0, out)
    pb = Pb()
    for short, module in (("rl", "rate_limiter"), ("ls", "leases"), ("idem", "idempotency"), ("cl", "cluster")):
        setattr(pb, short, importlib.import_module(f"arbiter.v1.{module}_pb2"))
        setattr(pb, f"{short}_grpc", importlib.import_module(f"arbiter.v1.{module}_pb2_grpc"))
    return pb
