"""The test sessions of the README's test command (tests/run.sh runs `python3 -m nox`; issue 24).

- ``suite``: ruff, mypy --strict and the whole pytest suite on the interpreter that runs nox, in its own
  environment (tests/run.sh installed pyforward there with every extra): the suite as it always ran.
- ``tests-3.X``: the unit and integration suites (tests/unit, tests/integration) on every other supported CPython,
  each in a venv of its own (.nox/). asyncio, ssl and typing change between minor versions; those two suites cover
  the code that uses them. The chaos, interop, monitoring and image suites stay on the default interpreter only:
  they exercise the same code through other processes and tools, at three times the cost.

A supported CPython that is not on this machine is a session that skips, naming it: not a failure. They are found
on PATH or under pyenv (``$PYENV_ROOT/versions/3.X.*``), and each is run once to see that it works: a pyenv shim
on PATH exists for every version pyenv has but fails unless that version is selected.

Arguments after ``--`` go to every pytest run (``bash tests/run.sh -m "not image"``). ``PYFORWARD_PYTHONS``
narrows the versions tried (CI's matrix: one each).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nox

#: The CPython minor versions pyforward supports and tests: pyproject.toml's classifiers and the CI workflow's
#: matrix list the same (tests/release/test_workflows.py checks it).
SUPPORTED = ("3.11", "3.12", "3.13")

nox.options.sessions = ["suite", *(f"tests-{version}" for version in SUPPORTED)]
# The first failing session ends the run, so that the last pytest summary printed is that of the failure (CI
# reads the last one); nox then exits non-zero.
nox.options.stop_on_first_error = True
# Never download an interpreter (nox would try python-build-standalone from GitHub): a missing one is a skip.
nox.options.download_python = "never"
nox.options.error_on_missing_interpreters = False
nox.options.reuse_venv = "yes"

DEFAULT = f"{sys.version_info.major}.{sys.version_info.minor}"
PYTEST = ("-m", "pytest", "-n", "2", "--dist", "loadgroup", "-q")


def wanted() -> tuple[str, ...]:
    chosen = os.environ.get("PYFORWARD_PYTHONS", "").split()
    unknown = set(chosen) - set(SUPPORTED)
    if unknown:
        raise SystemExit(f"noxfile: PYFORWARD_PYTHONS names unsupported versions {sorted(unknown)}: {SUPPORTED}")
    return tuple(chosen) or SUPPORTED


def works(python: str, version: str) -> bool:
    try:
        probe = subprocess.run(
            [python, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except OSError:
        return False
    return probe.returncode == 0 and probe.stdout.strip() == version


def find_cpython(version: str) -> str | None:
    """An absolute path to a working CPython ``version`` (PATH first, then pyenv), or None."""
    candidates = []
    if on_path := shutil.which(f"python{version}"):
        candidates.append(on_path)
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    # Newest patch release first (3.12.10 after 3.12.9): compare the numbers, not the strings.
    installs = sorted(
        (p for p in pyenv_root.glob(f"versions/{version}.*") if p.name.removeprefix(f"{version}.").isdigit()),
        key=lambda p: int(p.name.removeprefix(f"{version}.")),
        reverse=True,
    )
    candidates += [str(p / "bin" / f"python{version}") for p in installs]
    return next((c for c in candidates if works(c, version)), None)


@nox.session(python=False)
def suite(session: nox.Session) -> None:
    """ruff, mypy --strict and the whole suite on the interpreter running nox (tests/run.sh set it up)."""
    if DEFAULT not in SUPPORTED:
        session.warn(f"CPython {DEFAULT} runs the suite but is not one of the supported {SUPPORTED}")
    session.run(sys.executable, "-m", "ruff", "check", "src", "tests", "bench", "docs/monitoring", "noxfile.py",
                ".github/scripts")
    session.run(sys.executable, "-m", "mypy")
    session.run(sys.executable, *PYTEST, *session.posargs)


def _unit_and_integration(session: nox.Session) -> None:
    session.install("-q", "-e", ".[test,fast]")
    # Tests named on the command line (bash tests/run.sh tests/unit/test_x.py) are run here too, instead of the
    # two suites: what was asked for, on every Python. Options alone (-m "not image") apply to the two suites.
    named = [arg for arg in session.posargs if not arg.startswith("-") and Path(arg.split("::")[0]).exists()]
    suites = [] if named else ["tests/unit", "tests/integration"]
    # With options of the caller's (-m image), these two suites may hold no test that matches: pytest's exit 5
    # is then no failure here. Without them, it is one.
    session.run("python", *PYTEST, *suites, *session.posargs, success_codes=[0, 5] if session.posargs else [0])


def _skipped(version: str, reason: str) -> None:
    def skip(session: nox.Session) -> None:
        session.skip(f"CPython {version}: {reason}")

    nox.session(name=f"tests-{version}", python=False)(skip)


for _version in SUPPORTED:
    if _version == DEFAULT:
        _skipped(_version, "the default interpreter, which ran the whole suite (session 'suite')")
    elif _version not in wanted():
        _skipped(_version, "not in PYFORWARD_PYTHONS")
    elif (_python := find_cpython(_version)) is None:
        _skipped(_version, f"not found (no working python{_version} on PATH or under pyenv): unit and "
                           "integration suites not run on it")
    else:
        nox.session(name=f"tests-{_version}", python=_python)(_unit_and_integration)
