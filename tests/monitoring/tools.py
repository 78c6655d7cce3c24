"""The programs these tests run that Python does not bring: skipped without
them on a developer's machine, failed without them under CI (which
installs them: .ci/run)."""

import os
import shutil

import pytest


def required(program: str, package: str) -> str:
    """The path of `program`, from Debian's `package`."""
    found = shutil.which(program)
    if not found:
        if os.environ.get("CI"):
            pytest.fail(f"{program} not found: apt-get install {package}")
        pytest.skip(f"{program} not found (apt-get install {package})")
    return found
