"""The package itself: descriptors in step with the protos, a wheel that
builds and carries its type marker."""

import pathlib
import subprocess
import sys
import zipfile

HERE = pathlib.Path(__file__).resolve().parent
PACKAGE = HERE.parent


def test_the_committed_descriptors_match_the_protos():
    rc = subprocess.run([sys.executable, str(PACKAGE / "scripts" / "generate.py"), "--check"])
    assert rc.returncode == 0, "run clients/python/scripts/generate.py"


def test_a_wheel_builds_with_its_type_marker(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(tmp_path), str(PACKAGE)], check=True)
    wheel, = tmp_path.glob("arbiter_client-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "arbiter_client/py.typed" in names and "arbiter_client/_descriptors.py" in names
    assert not any(n.startswith("tests/") for n in names)


def test_the_package_type_checks_strictly():
    # grpc ships no type stubs, hence --ignore-missing-imports.
    rc = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--ignore-missing-imports",
                         str(PACKAGE / "src" / "arbiter_client")], capture_output=True, text=True)
    assert rc.returncode == 0, rc.stdout + rc.stderr
