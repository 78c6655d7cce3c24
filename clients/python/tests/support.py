"""Real `arbiter serve` processes for the client's tests, on ports the
server picks (client and metrics) or the test picks and the server must
get (peer ports of a cluster, retried when taken)."""

import datetime
import json
import os
import pathlib
import queue
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import List, Optional

ROOT = pathlib.Path(__file__).resolve().parents[3]


def binary() -> str:
    if "ARBITER_BIN" in os.environ:
        return os.environ["ARBITER_BIN"]
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return str(target / "debug" / "arbiter")


class Server:
    """One `arbiter serve` process; `addr` is its client address, read from
    its "arbiter serving" log line."""

    def __init__(self, *extra: str, data: Optional[str] = None, listen: str = "127.0.0.1:0") -> None:
        self.data = data or tempfile.mkdtemp(prefix="arbiter-client-py-")
        self.args = [binary(), "serve", "--listen", listen, "--metrics-listen", "127.0.0.1:0",
                     "--log-format", "json", "--data-dir", self.data, *extra]
        if "--peer-listen" not in extra:
            self.args += ["--peer-listen", "127.0.0.1:0"]
        self.proc = subprocess.Popen(self.args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.log: List[str] = []
        ready: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=self._drain, args=(ready,), daemon=True).start()
        try:
            addr = ready.get(timeout=30)
        except queue.Empty:
            addr = None
        if addr is None:
            self.kill()
            raise RuntimeError("arbiter did not announce its address:\n" + "\n".join(self.log[-20:]))
        self.addr: str = addr

    def _drain(self, ready: "queue.Queue[Optional[str]]") -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip())
            try:
                fields = json.loads(line).get("fields", {})
            except ValueError:
                continue
            if fields.get("message") == "arbiter serving":
                self.metrics = fields["metrics"]
                ready.put(fields["client"])
        ready.put(None)

    def gauge(self, name: str) -> float:
        """A metric's value (summed over its labels) from /metrics."""
        import urllib.request

        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(name) and line[len(name)] in " {")

    def kill(self) -> None:
        """SIGKILL: no goodbye."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Three `arbiter serve` processes forming one cluster. Peer ports must
    be known before start (each member lists all), so they are picked
    free and a start that finds one taken is tried again with new ones."""

    def __init__(self, size: int = 3, *extra: str) -> None:
        for attempt in range(3):
            ports = [free_port() for _ in range(size)]
            peers = ",".join(f"{i + 1}=127.0.0.1:{p}" for i, p in enumerate(ports))
            self.nodes: List[Optional[Server]] = []
            try:
                for i, port in enumerate(ports):
                    self.nodes.append(Server("--node-id", str(i + 1), "--peer-listen", f"127.0.0.1:{port}",
                                             "--peers", peers, *extra))
                return
            except RuntimeError:
                self.stop()
                if attempt == 2:
                    raise

    @property
    def addrs(self) -> List[str]:
        return [n.addr for n in self.nodes if n is not None]

    def leader(self, client_for, deadline_s: float = 30.0) -> int:
        """The index of the member every live member names as leader, once
        every member is a voter."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            seen = set()
            for node in self.nodes:
                if node is None:
                    continue
                with client_for(node.addr) as client:
                    try:
                        status = client.status()
                    except Exception:
                        seen.add(None)
                        continue
                    # A forming cluster adds members as voters once they
                    # caught up; until then the leader is the only voter.
                    voters = sum(1 for m in status.members if m.voter)
                    seen.add(status.leader_id if voters == len(self.nodes) else None)
            if len(seen) == 1 and None not in seen:
                leader_id = seen.pop()
                if self.nodes[leader_id - 1] is not None:
                    return leader_id - 1
            time.sleep(0.1)
        raise AssertionError("no leader agreed on within the deadline")

    def kill(self, index: int) -> None:
        node = self.nodes[index]
        assert node is not None
        node.kill()
        self.nodes[index] = None

    def stop(self) -> None:
        for node in self.nodes:
            if node is not None:
                node.stop()


class Pki:
    """A throwaway CA issuing certificates into a temporary directory."""

    def __init__(self, directory: pathlib.Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.x509, self.ec, self.oid = x509, ec, NameOID
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client-test-ca")])
        cert = (self._builder(self.name, self.key.public_key())
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self.key, self._sha256()))
        self.ca = self._write("ca.pem", self._pem(cert))

    @staticmethod
    def _sha256():
        from cryptography.hazmat.primitives import hashes
        return hashes.SHA256()

    @staticmethod
    def _pem(obj) -> bytes:
        from cryptography.hazmat.primitives import serialization
        if hasattr(obj, "private_bytes"):
            return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
        return obj.public_bytes(serialization.Encoding.PEM)

    def _builder(self, subject, public_key):
        now = datetime.datetime.now(datetime.timezone.utc)
        return (self.x509.CertificateBuilder().subject_name(subject).issuer_name(self.name)
                .public_key(public_key).serial_number(self.x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    def _write(self, name: str, data: bytes) -> pathlib.Path:
        path = self.dir / name
        path.write_bytes(data)
        return path

    def issue(self, cn: str, dns=("localhost",)):
        key = self.ec.generate_private_key(self.ec.SECP256R1())
        subject = self.x509.Name([self.x509.NameAttribute(self.oid.COMMON_NAME, cn)])
        cert = (self._builder(subject, key.public_key())
                .add_extension(self.x509.SubjectAlternativeName([self.x509.DNSName(d) for d in dns]), critical=False)
                .add_extension(self.x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(self.key, self._sha256()))
        return self._write(f"{cn}.pem", self._pem(cert)), self._write(f"{cn}.key", self._pem(key))


def poll(predicate, deadline_s: float, what: str, step: float = 0.02):
    """Polls `predicate` until it returns a truthy value (returned), failing
    with `what` after the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {deadline_s} s: {what}")
        time.sleep(step)
