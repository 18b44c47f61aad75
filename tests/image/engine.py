"""A real container engine for the image tests: Debian's docker.io, started here, with no bridge network.

What a new user of these machines had to work around (issue 13), done once per machine and cached:

* :func:`prepare_engine` installs ``docker.io`` and ``debootstrap`` (apt) when they are missing and starts
  ``dockerd`` unless one answers already. The daemon gets no bridge and no iptables rules
  (``--bridge=none --iptables=false``): this workplace flags traffic to private ranges, and Docker's default
  bridge is 172.17.0.0/16. Every container runs with ``--network host`` (or ``none``) and talks on 127.0.0.1.
  The daemon is left running for the next session (log: :data:`DOCKERD_LOG`).
* :func:`base_image` makes the base image without a registry: ``debootstrap --variant=minbase bookworm`` with
  Debian's python3, python3-venv, python3-pip, python-is-python3 and ca-certificates, slimmed like the
  ``-slim`` images, then ``docker import``. It is tagged with a hash of that recipe, so a second session on the
  same machine finds it and skips the minute debootstrap takes.
* :func:`build` runs ``docker build`` with BuildKit (Debian's ``/usr/bin/docker`` has it built in; another
  ``docker`` client earlier on PATH may lack buildx), ``--network host`` so that pip reaches PyPI, and the
  machine's extra CA certificates (:func:`extra_ca_bundle`) as the BuildKit secret ``extra-ca``.

Anything that keeps the engine from starting raises :class:`EngineUnavailable` (the tests skip with its
message); a build that fails is a test failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

#: Debian's docker client: BuildKit built in (``DOCKER_BUILDKIT=1``), which ``--secret`` needs.
DOCKER = "/usr/bin/docker"
DOCKERD_LOG = Path("/var/log/pyforward-test-dockerd.log")
#: Serialises, across sessions and workers on this machine, starting the daemon and making the base image.
LOCK_DIR = Path("/run/lock")
APT_PACKAGES = ("docker.io", "debootstrap")
#: How long the daemon may take to answer after it was started.
DAEMON_TIMEOUT = 90.0

# The base image recipe. Any change here changes the tag, so an old cached base is not reused by mistake.
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
BASE_MIRROR = os.environ.get("PYFORWARD_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the official -slim images leave out too (dpkg path-exclude there): package caches and lists, man pages,
# docs except the copyright files, translations.
BASE_SLIM = (
    "rm -rf var/cache/apt/archives/*.deb var/cache/apt/*.bin var/lib/apt/lists/* usr/share/man/* "
    "usr/share/info/* usr/share/locale/* && find usr/share/doc -type f ! -name copyright -delete"
)
BASE_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)
BASE_REPOSITORY = "pyforward-test-base"


class EngineUnavailable(Exception):
    """No container engine can be had on this machine; the message says why (the tests skip with it)."""


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def docker(
    *args: str,
    check: bool = True,
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the docker client; with ``check`` a non-zero exit is an AssertionError showing its output."""
    result = subprocess.run(
        [DOCKER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:6])} ... exited {result.returncode}:\n{_tail(result.stderr)}")
    return result


@contextlib.contextmanager
def machine_lock(name: str) -> Iterator[None]:
    """An exclusive lock shared by every test session on this machine (a file lock in /run/lock)."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    with (LOCK_DIR / f"pyforward-test-{name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------ the engine


def _dockerd() -> str | None:
    return shutil.which("dockerd", path="/usr/sbin:/usr/bin:/sbin:/bin")


def _install_packages() -> None:
    missing = [
        package
        for package, present in (
            ("docker.io", Path(DOCKER).exists() and _dockerd() is not None),
            ("debootstrap", shutil.which("debootstrap", path="/usr/sbin:/usr/bin:/sbin:/bin") is not None),
        )
        if not present
    ]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise EngineUnavailable(f"{' and '.join(missing)} missing and no apt-get to install them")
    # Another apt may be running (a parallel session): wait for its lock rather than fail.
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-qq"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = [[*apt, "update"], [*apt, "install", "-y", "--no-install-recommends", *missing]]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, env=env, timeout=900, check=False)
        if result.returncode != 0:
            raise EngineUnavailable(
                f"cannot install {' '.join(missing)} ({' '.join(step[4:6])} exited {result.returncode}): "
                f"{_tail(result.stderr or result.stdout, 5)}"
            )


def _daemon_answers() -> bool:
    try:
        result = docker("version", "--format", "{{.Server.Version}}", check=False, timeout=20)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0 and bool(result.stdout.strip())


def _start_daemon() -> None:
    dockerd = _dockerd()
    assert dockerd is not None
    DOCKERD_LOG.parent.mkdir(parents=True, exist_ok=True)
    with DOCKERD_LOG.open("ab") as log:
        # Its own session: it outlives this test session on purpose (the next one reuses it, see the module doc).
        proc = subprocess.Popen(
            [dockerd, "--bridge=none", "--iptables=false", "--ip-masq=false"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + DAEMON_TIMEOUT
    while not _daemon_answers():
        if proc.poll() is not None:
            log_tail = _tail(DOCKERD_LOG.read_text(errors="replace"))
            raise EngineUnavailable(f"dockerd exited with {proc.returncode}; {DOCKERD_LOG}:\n{log_tail}")
        if time.monotonic() > deadline:
            raise EngineUnavailable(f"dockerd does not answer after {DAEMON_TIMEOUT:g}s; see {DOCKERD_LOG}")
        time.sleep(0.2)  # polling interval of a condition wait


def prepare_engine() -> str:
    """Install, start (or reuse) the engine; returns its version. Raises :class:`EngineUnavailable`."""
    if not os.path.exists("/proc/self/ns/net"):
        raise EngineUnavailable("not Linux: the image tests need a Linux container engine")
    if os.geteuid() != 0:
        raise EngineUnavailable(
            "not root: the image tests install docker.io and debootstrap and start dockerd "
            "(run tests/run.sh as root, or deselect them with -m 'not image')"
        )
    _install_packages()
    if not _daemon_answers():
        with machine_lock("dockerd"):
            if not _daemon_answers():
                _start_daemon()
    return docker("version", "--format", "{{.Server.Version}}").stdout.strip()


def sweep_stale(label: str = "pyforward-test") -> None:
    """Remove containers and images left by a test session that died without its teardown (SIGKILL, OOM).

    Their ``label`` value (and image tag) starts with the pid of that session; a live session is left alone.
    """
    def dead(session: str) -> bool:
        pid = session.split("-", 1)[0]
        return pid.isdigit() and not os.path.exists(f"/proc/{pid}")

    listed = docker("ps", "--all", "--filter", f"label={label}", "--format", f'{{{{.ID}}}} {{{{.Label "{label}"}}}}')
    stale = [cid for cid, _, session in (line.partition(" ") for line in listed.stdout.splitlines()) if dead(session)]
    if stale:
        docker("rm", "--force", "--volumes", *stale, check=False)
    images = docker("images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", "reference=pyforward-test*")
    old = [ref for ref in images.stdout.split() if not ref.startswith(BASE_REPOSITORY) and dead(ref.split(":")[-1])]
    if old:
        docker("rmi", *old, check=False)


def image_exists(ref: str) -> bool:
    return docker("image", "inspect", ref, check=False).returncode == 0


# ------------------------------------------------------------------------------------------------ images


def base_recipe_key() -> str:
    recipe = {
        "suite": BASE_SUITE,
        "variant": "minbase",
        "packages": BASE_PACKAGES,
        "mirror": BASE_MIRROR,
        "slim": BASE_SLIM,
        "changes": BASE_CHANGES,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def base_image(log_dir: Path) -> str:
    """The Debian base (debootstrap + docker import), made once per machine; returns its tag."""
    tag = f"{BASE_REPOSITORY}:{BASE_SUITE}-{base_recipe_key()}"
    if image_exists(tag):
        return tag
    with machine_lock("base-image"):
        if image_exists(tag):  # another session made it while we waited
            return tag
        debootstrap = shutil.which("debootstrap", path="/usr/sbin:/usr/bin:/sbin:/bin")
        assert debootstrap is not None
        work = Path(tempfile.mkdtemp(prefix="pyforward-base-", dir="/var/tmp"))
        rootfs = work / "rootfs"
        log = log_dir / "debootstrap.log"
        try:
            with log.open("wb") as out:
                code = subprocess.run(
                    [debootstrap, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                     BASE_SUITE, str(rootfs), BASE_MIRROR],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=1200, check=False,
                ).returncode
            assert code == 0, f"debootstrap exited {code}:\n{_tail(log.read_text(errors='replace'))}"
            subprocess.run(["sh", "-c", BASE_SLIM], cwd=rootfs, check=True, timeout=300)
            changes = [arg for change in BASE_CHANGES for arg in ("--change", change)]
            with subprocess.Popen(
                ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE
            ) as tar:
                imported = subprocess.run(
                    [DOCKER, "import", *changes, "--message", f"debootstrap {BASE_SUITE} recipe {tag}", "-", tag],
                    stdin=tar.stdout, capture_output=True, text=True, timeout=600, check=False,
                )
            assert tar.returncode == 0, f"tar of {rootfs} exited {tar.returncode}"
            assert imported.returncode == 0, f"docker import failed: {imported.stderr}"
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return tag


def extra_ca_bundle(dest: Path) -> Path | None:
    """The CA certificates this machine adds to the system's (a TLS-intercepting proxy's), as one PEM file.

    ``PYFORWARD_TEST_EXTRA_CA`` names a PEM bundle; otherwise every ``*.crt`` under
    ``/usr/local/share/ca-certificates`` (Debian's place for local CAs). None when there is none.
    """
    given = os.environ.get("PYFORWARD_TEST_EXTRA_CA")
    files = [Path(given)] if given else sorted(Path("/usr/local/share/ca-certificates").rglob("*.crt"))
    pems = [f.read_text().strip() + "\n" for f in files if f.is_file()]
    if not pems:
        return None
    dest.write_text("".join(pems))
    return dest


def build(
    context: Path,
    tag: str,
    log: Path,
    *,
    dockerfile: Path | None = None,
    build_args: Mapping[str, str] | None = None,
    secrets: Mapping[str, Path] | None = None,
    timeout: float = 1200.0,
) -> None:
    """``docker build`` with BuildKit and the host network; its output goes to ``log`` (shown on failure)."""
    argv = [DOCKER, "build", "--network", "host", "--progress", "plain", "--tag", tag]
    if dockerfile is not None:
        argv += ["--file", str(dockerfile)]
    for name, value in (build_args or {}).items():
        argv += ["--build-arg", f"{name}={value}"]
    for name, path in (secrets or {}).items():
        argv += ["--secret", f"id={name},src={path}"]
    with log.open("wb") as out:
        code = subprocess.run(
            [*argv, str(context)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False,
            env={**os.environ, "DOCKER_BUILDKIT": "1"},
        ).returncode
    assert code == 0, f"docker build of {tag} exited {code}:\n{_tail(log.read_text(errors='replace'), 40)}"


def inspect(ref: str, kind: str = "container") -> dict[str, Any]:
    data = json.loads(docker(kind, "inspect", ref).stdout)
    assert isinstance(data, list), data
    assert data, f"docker {kind} inspect {ref}: nothing"
    result: dict[str, Any] = data[0]
    return result


def image_size(ref: str) -> int:
    return int(inspect(ref, "image")["Size"])


def run_argv(
    name: str,
    image: str,
    args: Sequence[str] = (),
    *,
    network: str = "host",
    user: str | None = None,
    entrypoint: str | None = None,
    env: Mapping[str, str] | None = None,
    volumes: Mapping[Path, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> list[str]:
    """``docker run -d`` the way production runs the sidecar: read-only root, no capabilities, no new privileges."""
    argv = [
        "run", "--detach", "--name", name, "--network", network,
        "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
    ]
    if user is not None:
        argv += ["--user", user]
    if entrypoint is not None:
        argv += ["--entrypoint", entrypoint]
    for key, value in (env or {}).items():
        argv += ["--env", f"{key}={value}"]
    for source, target in (volumes or {}).items():
        argv += ["--volume", f"{source}:{target}"]
    for key, value in (labels or {}).items():
        argv += ["--label", f"{key}={value}"]
    return [*argv, image, *args]
