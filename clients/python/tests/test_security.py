"""TLS and bearer tokens against a server with --tls-* and --auth-file,
certificates made at test time."""

import hashlib

import pytest

import arbiter_client as ac
from support import Pki, Server


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    pki = Pki(directory)
    cert, key = pki.issue("server", dns=("localhost", "arbiter.test"))
    alice_cert, alice_key = pki.issue("alice")
    token = "ci-token-for-tests"
    auth = directory / "auth.yaml"
    auth.write_text(
        "principals:\n"
        "  - name: alice\n    certificate: alice\n    namespaces: [\"a/\"]\n"
        f"  - name: ci\n    token_sha256: \"{hashlib.sha256(token.encode()).hexdigest()}\"\n    namespaces: [\"ci/\"]\n"
    )
    server = Server("--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(pki.ca),
                    "--tls-client-cert-optional", "--auth-file", str(auth))
    yield server, pki, (alice_cert, alice_key), token
    server.stop()


def test_tls_with_a_client_certificate_or_a_token_and_namespaces(secured):
    server, pki, (cert, key), token = secured
    window = ac.FixedWindow(5, 60)
    port = server.addr.rsplit(":", 1)[1]
    as_alice = ac.TLS(ca=str(pki.ca), cert=cert.read_bytes(), key=str(key), server_name="arbiter.test")
    with ac.Client(f"127.0.0.1:{port}", tls=as_alice) as client:
        assert client.check("a/1", window).allowed
        with pytest.raises(ac.PermissionDenied) as caught:
            client.check("ci/1", window)
        assert caught.value.code == "PERMISSION_DENIED" and "alice" in caught.value.details
    with ac.Client(f"localhost:{port}", tls=ac.TLS(ca=pki.ca.read_bytes()), token=token) as client:
        assert client.check("ci/1", window).allowed
        with client.lease("ci/lock", ttl=5) as lease:
            assert client.get_lease("ci/lock").principal == "ci" and lease.held
    with ac.Client(f"localhost:{port}", tls=ac.TLS(ca=str(pki.ca))) as client:
        with pytest.raises(ac.PermissionDenied) as caught:
            client.check("ci/1", window)
        assert caught.value.code == "UNAUTHENTICATED"
    with ac.Client(f"localhost:{port}", tls=ac.TLS(ca=str(pki.ca)), token="wrong") as client:
        with pytest.raises(ac.PermissionDenied):
            client.check("ci/1", window)
    # Plain text to a TLS port is no answer at all.
    with ac.Client(f"localhost:{port}", timeout=1, retry=ac.Retry(attempts=1)) as client:
        with pytest.raises(ac.Unavailable):
            client.check("ci/1", window)


def test_tls_settings_are_checked_when_made():
    with pytest.raises(ValueError, match="together"):
        ac.TLS(cert=b"x")
    with pytest.raises(ValueError, match="line breaks"):
        ac.Client("127.0.0.1:1", token="a\nb")
