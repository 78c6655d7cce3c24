import pytest
from arbiter_pb import compile_stubs


@pytest.fixture(scope="session")
def pb():
    """The generated modules (see arbiter_pb.Pb), compiled once per run."""
    return compile_stubs()
