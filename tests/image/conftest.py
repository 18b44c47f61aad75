"""Fixtures of the container tests: the engine, the images (built once per session) and containers that are
removed after each test, also when it fails.

Images: the base (debootstrap, cached per machine: tests/image/engine.py), the repository's Dockerfile built as
it is with ``BASE_IMAGE`` pointing at that base, and a socat + tinyproxy image from the same base
(tests/image/proxy.Dockerfile). Every name carries this session's id, so parallel sessions do not meet.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pyforward import __version__
from tests.harness import wait_for
from tests.image import engine
from tests.image.engine import EngineUnavailable, docker

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
#: The uid (and gid) the image runs as: the conventional "nonroot" of distroless.
NONROOT = 65532
#: The build arguments the release workflow passes (.github/workflows/release.yml), as it would for this checkout:
#: the version setuptools-scm gave the installed pyforward, and a source URL of the test's own.
LABEL_ARGS = {"VERSION": __version__, "REVISION": "0123456789abcdef0123456789abcdef01234567",
              "SOURCE_URL": "https://example.invalid/pyforward"}


@dataclass(frozen=True)
class Images:
    base: str
    pyforward: str
    proxy: str
    #: The PEM bundle passed as the "extra-ca" build secret (None: this machine adds no CA of its own).
    extra_ca: Path | None
    logs: Path


@pytest.fixture(scope="session")
def session_id() -> str:
    return f"{os.getpid()}-{secrets.token_hex(3)}"


@pytest.fixture(scope="session")
def container_engine() -> str:
    """Installs and starts the engine (or reuses a running one); skips all image tests when it cannot."""
    try:
        return engine.prepare_engine()
    except EngineUnavailable as exc:
        if os.environ.get("PYFORWARD_IMAGE_TESTS") == "required":
            pytest.fail(f"no container engine (PYFORWARD_IMAGE_TESTS=required): {exc}")
        pytest.skip(f"no container engine: {exc}")


@pytest.fixture(scope="session")
def images(container_engine: str, session_id: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    engine.sweep_stale()
    logs = tmp_path_factory.mktemp("image-builds")
    base = engine.base_image(logs)
    # The engine must be able to run what it built (cgroups, overlayfs, seccomp): fail clearly here if not.
    smoke = docker("run", "--rm", "--network", "none", base, "python3", "-c", "print('ok')", check=False)
    if smoke.returncode != 0 or smoke.stdout.strip() != "ok":
        pytest.fail(f"dockerd {container_engine} cannot run a container: {smoke.stderr.strip()}")
    extra_ca = engine.extra_ca_bundle(logs / "extra-ca.pem")
    tags = Images(
        base=base,
        pyforward=f"pyforward-test:{session_id}",
        proxy=f"pyforward-test-proxy:{session_id}",
        extra_ca=extra_ca,
        logs=logs,
    )
    try:
        engine.build(
            ROOT,
            tags.pyforward,
            logs / "pyforward.build.log",
            build_args={"BASE_IMAGE": base, **LABEL_ARGS},
            secrets={"extra-ca": extra_ca} if extra_ca is not None else None,
        )
        engine.build(HERE, tags.proxy, logs / "proxy.build.log", dockerfile=HERE / "proxy.Dockerfile",
                     build_args={"BASE_IMAGE": base})
        yield tags
    finally:
        # Only the tags: the base stays for the next session, and BuildKit's cache keeps the layers.
        docker("rmi", tags.pyforward, tags.proxy, check=False)


# ------------------------------------------------------------------------------------------------ containers


@dataclass
class Container:
    name: str
    argv: list[str]

    def logs(self) -> str:
        result = docker("logs", self.name, check=False)
        return result.stdout + result.stderr

    def inspect(self) -> dict[str, Any]:
        return engine.inspect(self.name)

    @property
    def running(self) -> bool:
        return bool(self.inspect()["State"]["Running"])

    @property
    def pid(self) -> int:
        return int(self.inspect()["State"]["Pid"])

    def exit_code(self) -> int | None:
        state = self.inspect()["State"]
        return None if state["Running"] else int(state["ExitCode"])

    def kill(self) -> None:
        """SIGKILL, as an OOM kill or a node failure would: no shutdown, no last checkpoint."""
        docker("kill", self.name)
        wait_for(lambda: not self.running, 30, what=f"{self.name} to stop")

    def start(self) -> None:
        docker("start", self.name)

    def check_running(self) -> None:
        """Raise (ending a wait) when the container exited."""
        code = self.exit_code()
        if code is not None:
            raise AssertionError(f"container {self.name} exited with {code}:\n{self.logs()[-3000:]}")

    def wait_exit(self, timeout: float) -> int:
        return wait_for(
            lambda: (code,) if (code := self.exit_code()) is not None else None,
            timeout,
            what=f"{self.name} to exit",
            interval=0.2,
            diagnostics=lambda: self.logs()[-2000:],
        )[0]

    def json_logs(self) -> list[dict[str, Any]]:
        """The container's output as JSON log lines (pyforward's PYFORWARD_LOG_FORMAT=json); others as raw."""
        out: list[dict[str, Any]] = []
        for line in self.logs().splitlines():
            with contextlib.suppress(ValueError):
                parsed = json.loads(line)
                if isinstance(parsed, dict):
                    out.append(parsed)
                    continue
            out.append({"raw": line})
        return out

    def process_status(self) -> dict[str, str]:
        """/proc/PID/status of the container's main process, seen from the host."""
        fields: dict[str, str] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        return fields


@dataclass
class Containers:
    """Starts containers named ``pf-<session>-<test>-<role>`` and removes them all at the end."""

    prefix: str
    session_id: str
    started: list[Container] = field(default_factory=list)

    def run(
        self,
        role: str,
        image: str,
        args: Sequence[str] = (),
        **options: Any,
    ) -> Container:
        name = f"{self.prefix}-{role}"
        argv = engine.run_argv(name, image, args, labels={"pyforward-test": self.session_id}, **options)
        container = Container(name, argv)
        self.started.append(container)
        docker(*argv)
        return container

    def describe(self) -> str:
        parts = []
        for container in self.started:
            state = docker("inspect", "--format", "{{.State.Status}} exit={{.State.ExitCode}}", container.name,
                           check=False).stdout.strip()
            parts.append(f"--- {container.name} ({state}); docker run {' '.join(container.argv[1:])}\n"
                         f"{container.logs()[-4000:]}")
        return "\n".join(parts)

    def remove(self) -> None:
        names = [c.name for c in self.started]
        if names:
            docker("rm", "--force", "--volumes", *names, check=False, timeout=120)


@pytest.fixture
def containers(images: Images, session_id: str, request: pytest.FixtureRequest) -> Iterator[Containers]:
    short = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    group = Containers(prefix=f"pf-{session_id}-{short}", session_id=session_id)
    try:
        yield group
    finally:
        with contextlib.suppress(Exception):
            print(group.describe())  # captured: pytest shows it for a failing test only
        group.remove()


def chown_tree(path: Path, uid: int = NONROOT, gid: int = NONROOT) -> None:
    """Give ``path`` and everything under it to ``uid`` (what an fsGroup / a volume's owner does in a pod)."""
    for dirpath, dirnames, filenames in os.walk(path):
        os.chown(dirpath, uid, gid)
        for name in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


