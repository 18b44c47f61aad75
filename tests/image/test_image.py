"""The image, built from the repository's Dockerfile and run the way production runs it (issue 13).

The three data paths of kind/ (kind/README.md), with containers on one machine instead of a cluster:

* a -- audit log volume -> sidecar -> mTLS -> receiver container;
* b -- sidecar -> HTTP CONNECT on a Unix socket shared through a volume (socat + tinyproxy containers, as
  konnectivity's UDS mode) -> mTLS inside the tunnel -> receiver;
* c -- sidecar -> mTLS to an HTTP CONNECT proxy container (socat OPENSSL-LISTEN + tinyproxy, as Gardener's
  vpn-seed-server) -> TLS inside TLS -> receiver.

Each: a writer container appends audit events to the shared volume while the log rotates (lumberjack names),
the sidecar is SIGKILLed (``docker kill``) mid-stream and started again (``docker start``) after the writer
has gone on and rotated the log, and every auditID must arrive at the receiver (duplicates only within what
the restart may re-send).
The sidecar runs as the image says: uid 65532, ``--read-only`` root filesystem, ``--cap-drop ALL``, no new
privileges, configured by environment variables only. The receiver is the same image (``pyforward receive``).
All containers use the host network on 127.0.0.1 (the engine has no bridge: tests/image/engine.py).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from pyforward.auditgen import RotatingAuditLog, audit_id, generate_events
from tests.conftest import CertFiles, free_port, write_certs
from tests.harness import ReceivedIds, delivery, try_metrics, wait_for
from tests.image.conftest import HERE, LABEL_ARGS, NONROOT, Container, Containers, Images, chown_tree
from tests.image.engine import build, docker, image_exists, inspect
from tests.proxies import connectable

pytestmark = [
    pytest.mark.image,
    # One worker runs them all (--dist loadgroup): the images are built once per session.
    pytest.mark.xdist_group("image"),
    # The first test also installs the engine, makes the base image and builds: minutes, not seconds.
    pytest.mark.timeout(1800),
]

LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
CONNECT = re.compile(r"CONNECT (\S+) HTTP/")
#: Per scenario: events, how many per write and the pause between writes (about 12 s of writing), and the
#: rotation size (about 10 rotations).
EVENTS = 3000
BATCH = 25
INTERVAL = 0.1
ROTATE_BYTES = 384 << 10
#: The writer waits at 60 % until the sidecar is down: the other 40 % (over 1 MB) rotate the log meanwhile.
PAUSE_AT = EVENTS * 3 // 5 // BATCH * BATCH
#: The sidecar's in-flight budget: a SIGKILL can make it re-send at most this many source bytes.
INFLIGHT = 512 << 10
START_TIMEOUT = 60.0
DELIVERY_TIMEOUT = 240.0


# ------------------------------------------------------------------------------------------------ the image


def in_image(images: Images, script: str) -> str:
    """Run a shell script in a throw-away container of the image (as its user, read-only, no network)."""
    result = docker(
        "run", "--rm", "--network", "none", "--read-only", "--cap-drop", "ALL", "--entrypoint", "sh",
        images.pyforward, "-c", script,
    )
    return result.stdout


def test_image_is_nonroot_read_only_and_lean(images: Images) -> None:
    config = inspect(images.pyforward, "image")["Config"]
    assert config["User"] == f"{NONROOT}:{NONROOT}"
    assert config["Entrypoint"] == ["pyforward"]
    assert config["Cmd"] == ["run"]
    # The OCI labels from the build arguments (issue 24): what an operator reads to tell two images apart.
    labels = config["Labels"]
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.version"] == LABEL_ARGS["VERSION"]
    assert labels["org.opencontainers.image.revision"] == LABEL_ARGS["REVISION"]
    assert labels["org.opencontainers.image.source"] == LABEL_ARGS["SOURCE_URL"]
    out = in_image(
        images,
        "id -u; id -g; pyforward --version; "
        "site=$(python -c 'import sysconfig; print(sysconfig.get_path(\"purelib\"))'); "
        "echo pip=$(ls -d $site/pip* /opt/pyforward/bin/pip* 2>/dev/null | wc -l); "
        "echo pyi=$(find $site -name '*.pyi' | wc -l); "
        "echo tests=$(find $site -mindepth 2 -maxdepth 2 -type d \\( -name tests -o -name test \\) | wc -l); "
        # (Debian's python3-venv keeps pip's and setuptools' wheels in /usr/share/python-wheels: the base's.)
        "echo wheels=$(find /opt /tmp /root /src /wheels -name '*.whl' 2>/dev/null | wc -l); "
        "echo license=$(find $site/pyforward-*.dist-info -name LICENSE | xargs grep -l 'Apache License' | wc -l); "
        "touch /x 2>/dev/null && echo rootfs=writable || echo rootfs=read-only",
    )
    lines = out.split()
    assert lines[:2] == [str(NONROOT), str(NONROOT)], out
    # The wheel built without .git carries the version passed in (SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFORWARD).
    assert f"pyforward {LABEL_ARGS['VERSION']}" in out.splitlines(), out
    for expected in ("pip=0", "pyi=0", "tests=0", "wheels=0", "license=1", "rootfs=read-only"):
        assert expected in lines, f"{expected} not in {lines}"


def test_extra_ca_is_not_baked_into_the_image(images: Images) -> None:
    if images.extra_ca is None:
        pytest.skip("this machine adds no CA of its own (/usr/local/share/ca-certificates is empty)")
    body = [line for line in images.extra_ca.read_text().splitlines() if line and "-----" not in line]
    marker = body[len(body) // 2]  # a line of base64 from the middle of the first certificate: unique to it
    out = in_image(images, f"grep -rlF '{marker}' / --exclude-dir=proc --exclude-dir=sys 2>/dev/null; echo done")
    assert out.strip() == "done", f"the build secret is in the image: {out}"


def test_extra_ca_in_image_when_asked(images: Images, session_id: str, tmp_path: Path) -> None:
    """EXTRA_CA_IN_IMAGE=true puts the "extra-ca" secret into the trust store Python's ssl uses."""
    authority = trustme.CA(organization_name="pyforward extra-ca test")
    bundle = tmp_path / "extra-ca.pem"
    # The machine's own CAs stay in the secret: the builder's pip may need them to reach PyPI.
    bundle.write_text((images.extra_ca.read_text() if images.extra_ca else "") + authority.cert_pem.bytes().decode())
    tag = f"pyforward-test-ca:{session_id}"
    try:
        build(
            Path(__file__).resolve().parents[2],
            tag,
            images.logs / "extra-ca.build.log",
            build_args={"BASE_IMAGE": images.base, "EXTRA_CA_IN_IMAGE": "true"},
            secrets={"extra-ca": bundle},
        )
        out = docker(
            "run", "--rm", "--network", "none", "--read-only", "--entrypoint", "python", tag, "-c",
            "import ssl; print([dict(x[0] for x in c['subject']).get('organizationName') "
            "for c in ssl.create_default_context().get_ca_certs()])",
        ).stdout
        assert "pyforward extra-ca test" in out
    finally:
        if image_exists(tag):
            docker("rmi", tag, check=False)


# ------------------------------------------------------------------------------------------------ scenarios


@dataclass
class Volumes:
    """Host directories mounted into the containers, owned by uid 65532 like a pod's volumes with fsGroup."""

    root: Path
    auditlog: Path
    certs: Path
    out: Path
    receiver: CertFiles
    proxy: CertFiles

    @classmethod
    def make(cls, root: Path) -> Volumes:
        certs = root / "certs"
        volumes = cls(
            root=root,
            auditlog=root / "auditlog",
            certs=certs,
            out=root / "out",
            receiver=write_certs(certs / "receiver", "receiver"),
            proxy=write_certs(certs / "proxy", "proxy"),
        )
        for path in (volumes.auditlog, volumes.out):
            path.mkdir()
        for path in (volumes.auditlog, volumes.out, volumes.certs):
            chown_tree(path)
        return volumes

    @property
    def received(self) -> Path:
        return self.out / "received.jsonl"

    def backups(self) -> int:
        """Rotated files in the log volume (lumberjack names: audit-<time>.log)."""
        return sum(1 for p in self.auditlog.iterdir() if p.name.startswith("audit-") and p.suffix == ".log")


def start_receiver(containers: Containers, images: Images, volumes: Volumes) -> tuple[Container, int]:
    """`pyforward receive` with mTLS, on a free port of 127.0.0.1 (port 0: it prints the one it got)."""
    receiver = containers.run(
        "receiver",
        images.pyforward,
        [
            "receive", "--bind", "127.0.0.1:0",
            "--tls-cert", "/certs/receiver/server.crt", "--tls-key", "/certs/receiver/server.key",
            "--tls-ca", "/certs/receiver/ca.crt",
            "--output", "/out/received.jsonl",
        ],
        volumes={volumes.certs: "/certs:ro", volumes.out: "/out"},
    )

    def listening() -> int | None:
        receiver.check_running()
        match = LISTENING.search(receiver.logs())
        return int(match.group(1)) if match else None

    port = wait_for(listening, START_TIMEOUT, what="the receiver to listen", interval=0.1)
    return receiver, port


def start_tinyproxy(
    containers: Containers, images: Images, volumes: Volumes, receiver_port: int
) -> tuple[Container, int]:
    """tinyproxy allowing CONNECT to the receiver's port only, as kind/manifests/30-tinyproxy-config.yaml."""
    port = free_port()
    conf = volumes.root / "tinyproxy"
    conf.mkdir()
    (conf / "tinyproxy.conf").write_text(
        f"Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 3600\nMaxClients 64\n"
        f"ConnectPort {receiver_port}\nDisableViaHeader Yes\nLogLevel Connect\n"
    )
    tiny = containers.run(
        "tinyproxy", images.proxy, ["tinyproxy", "-d", "-c", "/etc/tinyproxy/tinyproxy.conf"],
        volumes={conf: "/etc/tinyproxy:ro"},
    )

    def up() -> bool:
        tiny.check_running()
        return connectable(socket.AF_INET, ("127.0.0.1", port))

    wait_for(up, START_TIMEOUT, what="tinyproxy to accept connections", interval=0.1)
    return tiny, port


def start_konnectivity(containers: Containers, images: Images, volumes: Volumes, proxy_port: int) -> Path:
    """konnectivity's UDS mode: socat on a Unix socket in a shared volume, forwarding to tinyproxy."""
    uds = volumes.root / "konnectivity"
    uds.mkdir()
    chown_tree(uds)
    socat = containers.run(
        "konnectivity",
        images.proxy,
        [
            "socat", "-d",
            # mode 0666 as in kind's scenario b: the sender may run as another uid (the API server's).
            "UNIX-LISTEN:/konnectivity/konnectivity-server.sock,fork,unlink-early,mode=0666",
            f"TCP:127.0.0.1:{proxy_port}",
        ],
        volumes={uds: "/konnectivity"},
    )
    def up() -> bool:
        socat.check_running()
        # Through the directory's fd: the tmp_path (under xdist) is longer than a socket address may be (108).
        fd = os.open(uds, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return connectable(socket.AF_UNIX, f"/proc/self/fd/{fd}/konnectivity-server.sock")
        finally:
            os.close(fd)

    wait_for(up, START_TIMEOUT, what="the konnectivity socket", interval=0.1)
    return uds


def start_mtls_proxy(containers: Containers, images: Images, volumes: Volumes, proxy_port: int) -> int:
    """Gardener's vpn-seed-server: socat terminating mTLS (client certificates of the proxy CA) -> tinyproxy."""
    port = free_port()
    vpn = containers.run(
        "vpn-seed-server",
        images.proxy,
        [
            "socat", "-d",
            f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert=/tls/server.crt,key=/tls/server.key,"
            "cafile=/tls/ca.crt,verify=1",
            f"TCP:127.0.0.1:{proxy_port}",
        ],
        volumes={volumes.certs / "proxy": "/tls:ro"},
    )

    def up() -> bool:
        vpn.check_running()
        return connectable(socket.AF_INET, ("127.0.0.1", port))

    wait_for(up, START_TIMEOUT, what="the mTLS proxy to accept connections", interval=0.1)
    return port


def sidecar_env(receiver_port: int, metrics_bind: str) -> dict[str, str]:
    """Environment only, as a pod spec would give it; names as in docs/configuration.md."""
    return {
        "PYFORWARD_LOG_PATH": "/auditlog/audit.log",
        "PYFORWARD_HOST": "127.0.0.1",
        "PYFORWARD_PORT": str(receiver_port),
        "PYFORWARD_TLS_CA_FILE": "/certs/receiver/ca.crt",
        "PYFORWARD_TLS_CERT_FILE": "/certs/receiver/client.crt",
        "PYFORWARD_TLS_KEY_FILE": "/certs/receiver/client.key",
        # The receiver's certificate names "receiver" (like audit-forwarder's AUDIT_TLS_VHOST=audittailer).
        "PYFORWARD_TLS_SERVER_NAME": "receiver",
        "PYFORWARD_METRICS_BIND": metrics_bind,
        "PYFORWARD_LOG_FORMAT": "json",
        "PYFORWARD_MAX_INFLIGHT_BYTES": str(INFLIGHT),
        "PYFORWARD_CHUNK_MAX_BYTES": str(64 << 10),
        "PYFORWARD_MAX_LINE_BYTES": str(256 << 10),
        "PYFORWARD_BACKOFF_MAX": "2",
    }


def wait_healthy(sidecar: Container, metrics_bind: str) -> None:
    def healthy() -> bool:
        sidecar.check_running()
        return bool(try_metrics(metrics_bind))

    wait_for(healthy, START_TIMEOUT, what=f"the sidecar's metrics on {metrics_bind}", interval=0.1)


def max_resent_events(lines: list[bytes]) -> int:
    """Most events a SIGKILL can make the sidecar send twice: as many of the smallest lines as fit in its
    in-flight budget (plus one chunk being built)."""
    total = count = 0
    for size in sorted(len(line) for line in lines):
        total += size
        if total > INFLIGHT + (64 << 10):
            break
        count += 1
    return count


SCENARIOS = {
    "a-direct-mtls": "audit log volume -> sidecar -> mTLS -> receiver",
    "b-konnectivity-uds": "sidecar -> CONNECT on a Unix socket (socat + tinyproxy) -> mTLS in the tunnel -> receiver",
    "c-mtls-proxy": "sidecar -> mTLS to a CONNECT proxy (socat + tinyproxy) -> TLS inside TLS -> receiver",
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario(
    scenario: str,
    images: Images,
    containers: Containers,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    volumes = Volumes.make(tmp_path)
    receiver, receiver_port = start_receiver(containers, images, volumes)
    metrics_bind = f"127.0.0.1:{free_port()}"
    env = sidecar_env(receiver_port, metrics_bind)
    mounts = {volumes.auditlog: "/auditlog", volumes.certs: "/certs:ro"}
    tiny: Container | None = None
    if scenario != "a-direct-mtls":
        tiny, tiny_port = start_tinyproxy(containers, images, volumes, receiver_port)
        if scenario == "b-konnectivity-uds":
            uds = start_konnectivity(containers, images, volumes, tiny_port)
            mounts[uds] = "/konnectivity"
            env["PYFORWARD_PROXY_UDS"] = "/konnectivity/konnectivity-server.sock"
        else:
            vpn_port = start_mtls_proxy(containers, images, volumes, tiny_port)
            env |= {
                "PYFORWARD_PROXY_HOST": "127.0.0.1",
                "PYFORWARD_PROXY_PORT": str(vpn_port),
                "PYFORWARD_PROXY_CA_FILE": "/certs/proxy/ca.crt",
                "PYFORWARD_PROXY_CERT_FILE": "/certs/proxy/client.crt",
                "PYFORWARD_PROXY_KEY_FILE": "/certs/proxy/client.key",
            }

    # The sidecar: no --user (the image's own 65532), read-only, no capabilities (engine.run_argv).
    sidecar = containers.run("sidecar", images.pyforward, env=env, volumes=mounts)
    wait_healthy(sidecar, metrics_bind)
    status = sidecar.process_status()
    assert status["Uid"].split() == [str(NONROOT)] * 4, status["Uid"]
    assert int(status["CapEff"], 16) == 0, status["CapEff"]
    host = sidecar.inspect()["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]

    prefix = f"{scenario[0]}-{secrets.token_hex(3)}-"
    seed = sum(map(ord, scenario))
    lines = list(generate_events(EVENTS, seed=seed, id_prefix=prefix))
    expected = [audit_id(line) for line in lines]
    writer = containers.run(
        "writer",
        images.pyforward,
        [
            "/writer/writer.py", "--out", "/auditlog/audit.log", "--count", str(EVENTS), "--seed", str(seed),
            "--id-prefix", prefix, "--batch", str(BATCH), "--interval", str(INTERVAL),
            "--max-bytes", str(ROTATE_BYTES), "--pause-at", str(PAUSE_AT), "--gate", "/auditlog/.writer-go",
        ],
        network="none",
        entrypoint="python",
        volumes={volumes.auditlog: "/auditlog", HERE: "/writer:ro"},
    )
    received = ReceivedIds(volumes.received)

    def diagnostics() -> str:
        counts = received.refresh()
        return (f"{sum(1 for i in expected if i in counts)} of {EVENTS} arrived; {volumes.backups()} rotations; "
                f"writer exit {writer.exit_code()}\n{containers.describe()}")

    # Mid-stream: half has arrived (the writer is still at its first 60 %, or waits at the gate). Kill the sidecar
    # (no shutdown, no last checkpoint), let the writer write and rotate on, start the sidecar again.
    def half() -> bool:
        sidecar.check_running()
        return len(received.refresh()) >= EVENTS // 2

    wait_for(half, DELIVERY_TIMEOUT, what="half of the events", interval=0.1, diagnostics=diagnostics)
    sidecar.kill()
    rotations_at_kill = volumes.backups()
    (volumes.auditlog / ".writer-go").touch()
    wait_for(
        lambda: volumes.backups() > rotations_at_kill or writer.exit_code() is not None,
        DELIVERY_TIMEOUT, what="a rotation while the sidecar is down", interval=0.1, diagnostics=diagnostics,
    )
    rotated_while_down = volumes.backups() > rotations_at_kill
    sidecar.start()
    wait_healthy(sidecar, metrics_bind)

    assert writer.wait_exit(DELIVERY_TIMEOUT) == 0, writer.logs()

    def all_arrived() -> bool:
        sidecar.check_running()
        return received.has_all(expected)

    wait_for(all_arrived, DELIVERY_TIMEOUT, what=f"all {EVENTS} events at the receiver", interval=0.2,
             diagnostics=diagnostics)
    result = delivery(expected, received.refresh())
    bound = max_resent_events(lines)
    assert not result.lost, result.describe()
    assert not result.unexpected, result.describe()
    assert result.duplicated <= bound, f"{result.describe()}: more than the {bound} a restart may re-send"
    assert volumes.backups() >= 5, f"only {volumes.backups()} rotations"
    assert rotated_while_down, "the writer ended before the log rotated with the sidecar down"

    # The checkpoint lives beside the log, written by uid 65532; nothing in the sidecar's log is an error.
    checkpoint = volumes.auditlog / ".audit.log.pyforward-checkpoint"
    assert checkpoint.stat().st_uid == NONROOT
    logs = sidecar.json_logs()
    errors = [e for e in logs if e.get("level") in ("error", "critical") or "raw" in e]
    assert errors == [], errors
    # Two runs: the first from the head, the second from its checkpoint (a restart from the head would also
    # exceed the duplicate bound: half the events had arrived).
    shipping = [str(e["msg"]) for e in logs if str(e.get("msg", "")).startswith("shipping ")]
    assert len(shipping) == 2, shipping
    assert shipping[0].endswith("from the head"), shipping
    assert " at offset " in shipping[1], shipping
    if tiny is not None:
        targets = CONNECT.findall(tiny.logs())
        assert targets, f"tinyproxy logged no CONNECT:\n{tiny.logs()}"
        assert set(targets) == {f"127.0.0.1:{receiver_port}"}, targets
    assert receiver.running

    rss_kib = int(sidecar.process_status()["VmRSS"].split()[0])
    record_property("sidecar_rss_kib", rss_kib)
    record_property("duplicates", result.duplicated)
    print(f"{scenario}: {EVENTS} events, {volumes.backups()} rotations, {result.duplicated} duplicates "
          f"(bound {bound}), sidecar RSS {rss_kib} KiB")


def test_unwritable_volume_is_one_clear_line_and_shipping_goes_on(
    images: Images, containers: Containers, tmp_path: Path
) -> None:
    """The shared volume is root's (not writable by 65532): the sidecar says so once at start-up, naming the
    path, the uid and the fix, and still ships."""
    volumes = Volumes.make(tmp_path)
    os.chown(volumes.auditlog, 0, 0)
    volumes.auditlog.chmod(0o755)
    with RotatingAuditLog(volumes.auditlog / "audit.log", max_bytes=1 << 30) as log:
        lines = list(generate_events(100, seed=7, id_prefix="u-"))
        log.write_many(lines)
    (volumes.auditlog / "audit.log").chmod(0o644)
    receiver, port = start_receiver(containers, images, volumes)
    metrics_bind = f"127.0.0.1:{free_port()}"
    sidecar = containers.run(
        "sidecar", images.pyforward, env=sidecar_env(port, metrics_bind),
        volumes={volumes.auditlog: "/auditlog", volumes.certs: "/certs:ro"},
    )
    received = ReceivedIds(volumes.received)
    expected = [audit_id(line) for line in lines]

    def all_arrived() -> bool:
        sidecar.check_running()
        return received.has_all(expected)

    wait_for(all_arrived, DELIVERY_TIMEOUT, what="the events", interval=0.2, diagnostics=containers.describe)
    start_lines = [e for e in sidecar.json_logs() if str(e.get("msg", "")).startswith("cannot write the checkpoint")]
    assert len(start_lines) == 1, sidecar.logs()
    line = start_lines[0]
    assert line["level"] == "error"
    assert line["msg"].startswith(
        f"cannot write the checkpoint /auditlog/.audit.log.pyforward-checkpoint: its directory is not writable by "
        f"uid {NONROOT} gid {NONROOT} (Permission denied);"
    ), line["msg"]
    assert f"make the volume writable by uid {NONROOT}" in line["msg"]
    assert not (volumes.auditlog / ".audit.log.pyforward-checkpoint").exists()
    assert receiver.running
