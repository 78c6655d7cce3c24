"""Python stubs compiled from the project's own proto files at run time
(grpcio-tools' protoc), shared by tests/python and cluster/e2e.py, and a
real `arbiter serve` on ports the OS chooses."""

import contextlib
import importlib
import json
import os
import pathlib
import queue
import signal
import subprocess
import sys
import tempfile
import threading

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto"


class Pb:
    """The generated modules: rl (RateLimiter), ls (Leases), idem
    (Idempotency), cl (Cluster), sem (Semaphores) and rls (Envoy's
    RateLimitService), each with its *_grpc companion."""


def compile_stubs():
    out = tempfile.mkdtemp(prefix="arbiter-pb-")
    files = sorted(str(p.relative_to(PROTO)) for p in (PROTO / "arbiter" / "v1").glob("*.proto"))
    files += sorted(str(p.relative_to(PROTO)) for p in (PROTO / "envoy").rglob("*.proto"))
    include = str(pathlib.Path(protoc.__file__).parent / "_proto")
    rc = protoc.main(["protoc", f"-I{PROTO}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", *files])
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc}) on {files}")
    sys.path.insert(0, out)
    pb = Pb()
    for short, module in (("rl", "rate_limiter"), ("ls", "leases"), ("idem", "idempotency"), ("cl", "cluster"),
                          ("sem", "semaphores")):
        setattr(pb, short, importlib.import_module(f"arbiter.v1.{module}_pb2"))
        setattr(pb, f"{short}_grpc", importlib.import_module(f"arbiter.v1.{module}_pb2_grpc"))
    pb.rls = importlib.import_module("envoy.service.ratelimit.v3.rls_pb2")
    pb.rls_grpc = importlib.import_module("envoy.service.ratelimit.v3.rls_pb2_grpc")
    pb.rl_common = importlib.import_module("envoy.extensions.common.ratelimit.v3.ratelimit_pb2")
    return pb


@contextlib.contextmanager
def serve(*extra):
    """A single-node `arbiter serve` with `extra` flags; yields its client
    address, and checks a clean exit on SIGTERM afterwards. ARBITER_BIN
    overrides $CARGO_TARGET_DIR/debug/arbiter (or target/debug/arbiter)."""
    with serve_announced(*extra) as announced:
        yield announced["client"]


@contextlib.contextmanager
def serve_announced(*extra):
    """As `serve`, yielding every field of the line announcing the bound
    addresses (client, peer, metrics, node_id, ...)."""
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    binary = os.environ.get("ARBITER_BIN", str(target / "debug" / "arbiter"))
    data = tempfile.mkdtemp(prefix="arbiter-py-data-")
    proc = subprocess.Popen(
        [binary, "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0",
         "--log-format", "json", "--data-dir", data, *extra],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    ready = queue.Queue()

    def drain():
        for line in proc.stderr:
            try:
                fields = json.loads(line).get("fields", {})
            except ValueError:
                continue
            if fields.get("message") == "arbiter serving":
                ready.put(fields)

    threading.Thread(target=drain, daemon=True).start()
    try:
        announced = ready.get(timeout=10)
    except queue.Empty:
        proc.kill()
        raise RuntimeError("arbiter did not announce its address within 10 s")
    try:
        yield announced
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
    assert code == 0, "arbiter did not exit cleanly on SIGTERM"
