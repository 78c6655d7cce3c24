import pathlib
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
# The tests run against this source tree (also when a copy is installed).
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]

from support import Server  # noqa: E402

import arbiter_client as ac  # noqa: E402


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    assert s.stop() == 0, "arbiter did not exit cleanly on SIGTERM"


@pytest.fixture
def client(server):
    with ac.Client(server.addr, retry=ac.Retry(attempts=3, base=0.01, deadline=2.0)) as c:
        yield c


@pytest.fixture
def name(request):
    """A key or lease name of this test's own."""
    return f"py/{request.node.name}"
