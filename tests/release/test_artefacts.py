"""The release artefacts, built and checked as the release workflow builds them (issue 24): `python -m build` of a
clone tagged v9.9.9 (the sdist, then the wheel from the sdist), `twine check`, the wheel's and the sdist's
contents, then the wheel installed into an empty venv, where `pyforward --version` names the tag and
`pyforward demo` ships a rotating log exactly once. About a minute (pip fetches the dependencies into the venv,
from its cache when it has them); deselect with -m "not build"."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.release.conftest import TAG, clone_working_tree, git

pytestmark = [pytest.mark.build, pytest.mark.timeout(600)]

VERSION = TAG.removeprefix("v")


@dataclass(frozen=True)
class Built:
    clone: Path
    sdist: Path
    wheel: Path


def run(*argv: str | Path, cwd: Path | None = None, timeout: float = 300) -> str:
    result = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"{argv} exited {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    work = tmp_path_factory.mktemp("artefacts")
    clone = clone_working_tree(work / "clone", tag=TAG)
    dist = work / "dist"
    run(sys.executable, "-m", "build", "--outdir", dist, clone)
    sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    assert [p.name for p in sdists + wheels] == [f"pyforward-{VERSION}.tar.gz", f"pyforward-{VERSION}-py3-none-any.whl"]
    return Built(clone, sdists[0], wheels[0])


def test_twine_check_passes(built: Built) -> None:
    """The metadata PyPI will show (README.md as the long description, rendered) is valid."""
    out = run(sys.executable, "-m", "twine", "check", "--strict", built.sdist, built.wheel)
    assert out.count("PASSED") == 2, out


def test_wheel_and_sdist_hold_every_module_and_data_file(built: Built) -> None:
    package = git(built.clone, "ls-files", "src/pyforward").splitlines()
    assert "src/pyforward/py.typed" in package
    with zipfile.ZipFile(built.wheel) as wheel:
        in_wheel = set(wheel.namelist())
        metadata = wheel.read(f"pyforward-{VERSION}.dist-info/METADATA").decode()
    missing = [name for name in package if name.removeprefix("src/") not in in_wheel]
    assert not missing, f"not in the wheel: {missing}"
    assert f"Version: {VERSION}" in metadata.splitlines()
    assert "Requires-Python: >=3.11" in metadata.splitlines()
    with tarfile.open(built.sdist) as sdist:
        in_sdist = {name.partition("/")[2] for name in sdist.getnames()}
    missing = [name for name in [*package, "LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml"]
               if name not in in_sdist]
    assert not missing, f"not in the sdist: {missing}"


def test_wheel_installed_in_an_empty_venv_names_the_tag_and_ships_the_demo(built: Built, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", built.wheel)
    assert run(venv / "bin" / "pyforward", "--version").strip() == f"pyforward {VERSION}"
    # The demo as the README runs it, smaller: 5,000 events over five rotations, exactly once (~2 s).
    out = run(venv / "bin" / "pyforward", "demo", "--events", "5000", "--rotate-bytes", "1000000", timeout=180)
    assert "demo: OK, every event arrived exactly once" in out, out
