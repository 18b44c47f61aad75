"""A real `pyforward run` process with no host set: it finds an in-process mTLS receiver through the Kubernetes
API (kmock over real HTTP) and must deliver every event while the Service moves, disappears and comes back,
and while the Secret's CA and client certificate are rotated.

Events carry an auditID; the receivers write one JSON line per record; the checks are on those IDs. Waits are
on conditions (IDs arrived, a line in the shipper's log, a file's content), never on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from pyforward.certs import TLSFiles, TLSMaterial
from pyforward.receiver import Receiver, ReceiverConfig
from tests.conftest import CertFiles, write_certs
from tests.integration.kubemock import (
    NS,
    SECRET,
    SERVICE,
    Cluster,
    emulated_cluster,
    eventually,
    secret,
    secret_data,
    service,
)

ARRIVAL = 30.0  # deadline for a batch of events to arrive (a fresh process, TLS, 2 cores)


# --- the audit log -------------------------------------------------------------------------------------------
@dataclass
class AuditLog:
    path: Path
    written: list[str] = field(default_factory=list)

    def append(self, count: int) -> list[str]:
        """Append ``count`` audit events; returns their IDs."""
        start = len(self.written)
        ids = [f"evt-{i:07d}" for i in range(start, start + count)]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        with self.path.open("ab") as out:
            for audit_id in ids:
                event = {
                    "kind": "Event",
                    "apiVersion": "audit.k8s.io/v1",
                    "level": "Metadata",
                    "auditID": audit_id,
                    "stage": "ResponseComplete",
                    "requestURI": "/api/v1/namespaces/default/pods?limit=500",
                    "verb": "list",
                    "user": {
                        "username": "system:serviceaccount:kube-system:generic",
                        "groups": ["system:authenticated"],
                    },
                    "sourceIPs": ["10.250.0.7"],
                    "responseStatus": {"metadata": {}, "code": 200},
                    "requestReceivedTimestamp": now,
                    "stageTimestamp": now,
                }
                out.write(orjson.dumps(event) + b"\n")
        self.written.extend(ids)
        return ids


def arrived(output: Path) -> list[str]:
    if not output.exists():
        return []
    complete = output.read_bytes().split(b"\n")[:-1]  # the receiver may be writing the last line right now
    return [orjson.loads(line)["auditID"] for line in complete if line.strip()]


# --- the receivers -------------------------------------------------------------------------------------------
@dataclass
class Receiving:
    receiver: Receiver
    port: int
    closed: bool = False

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await asyncio.wait_for(self.receiver.close(), 15)


async def start_receiver(certs: CertFiles, output: Path, port: int = 0) -> Receiving:
    """An mTLS Forward receiver: server certificate and client CA from ``certs``."""
    tls = TLSMaterial(
        TLSFiles(ca_file=certs.ca, cert_file=certs.server_cert, key_file=certs.server_key),
        purpose="server",
        require_client_cert=True,
        name="receiver",
    )
    receiver = Receiver(ReceiverConfig(host="127.0.0.1", port=port, tls=tls, output=output))
    return Receiving(receiver, await receiver.start())


@contextlib.asynccontextmanager
async def receiving(certs: CertFiles, output: Path) -> AsyncIterator[int]:
    running = await start_receiver(certs, output)
    try:
        yield running.port
    finally:
        await running.close()


# --- the shipper ---------------------------------------------------------------------------------------------
@dataclass
class Shipper:
    process: asyncio.subprocess.Process
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stop(self, timeout: float = 30.0) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
                pytest.fail(f"pyforward run did not stop within {timeout}s of SIGTERM\n{self.log()[-4000:]}")
        assert self.process.returncode is not None
        return self.process.returncode


def clean_environ() -> dict[str, str]:
    """The test's environment without anything that would configure pyforward or Kubernetes access."""
    drop = ("PYFORWARD_", "AUDIT_", "KUBERNETES_")
    return {k: v for k, v in os.environ.items() if not k.upper().startswith(drop) and k.upper() != "KUBECONFIG"}


@contextlib.asynccontextmanager
async def shipping(workdir: Path, env: dict[str, str]) -> AsyncIterator[Shipper]:
    log_path = workdir / "shipper.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pyforward",
            "run",
            env={**clean_environ(), **env},
            cwd=workdir,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    shipper = Shipper(process, log_path)
    try:
        yield shipper
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def shipper_env(tmp_path: Path, audit_log: AuditLog, kubeconfig: Path) -> dict[str, str]:
    """pyforward's own settings: discovery (no host), the Secret's key names, quick reconnects for the test."""
    return {
        "PYFORWARD_LOG_PATH": str(audit_log.path),
        "PYFORWARD_KUBECONFIG": str(kubeconfig),
        "PYFORWARD_NAMESPACE": NS,
        "PYFORWARD_SERVICE_NAME": SERVICE,  # also the TLS server name: the receiver's certificate has it
        "PYFORWARD_SECRET_NAME": SECRET,
        "PYFORWARD_SECRET_CA_KEY": "ca.crt",
        "PYFORWARD_SECRET_CERT_KEY": "tls.crt",
        "PYFORWARD_SECRET_KEY_KEY": "tls.key",
        "PYFORWARD_TLS_DIR": str(tmp_path / "tls"),
        "PYFORWARD_BACKOFF_INITIAL": "0.05",
        "PYFORWARD_BACKOFF_MAX": "0.5",
        "PYFORWARD_ACK_TIMEOUT": "10",
        "PYFORWARD_LOG_FORMAT": "text",
        "PYFORWARD_LOG_LEVEL": "info",
    }


@dataclass
class World:
    tmp_path: Path
    cluster: Cluster
    kubeconfig: Path
    audit_log: AuditLog
    ca1: CertFiles


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    (tmp_path / "auditlog").mkdir()
    audit_log = AuditLog(tmp_path / "auditlog" / "audit.log")
    audit_log.path.touch()
    ca1 = write_certs(tmp_path / "ca1", SERVICE)  # server certificate for localhost, 127.0.0.1 and the service name
    async with emulated_cluster() as cluster:
        kubeconfig = tmp_path / "kubeconfig"
        cluster.write_kubeconfig(kubeconfig)
        await cluster.create(secret(ca1))
        yield World(tmp_path, cluster, kubeconfig, audit_log, ca1)


async def all_arrived(ids: list[str], *outputs: Path, what: str, shipper: Shipper) -> None:
    wanted = set(ids)
    deadline = time.monotonic() + ARRIVAL
    while True:
        got: set[str] = set()
        for output in outputs:
            got.update(arrived(output))
        if wanted <= got:
            return
        if shipper.process.returncode is not None or time.monotonic() > deadline:
            missing = sorted(wanted - got)
            pytest.fail(
                f"{len(missing)} of {len(wanted)} events of {what} never arrived (first: {missing[:3]}); "
                f"shipper exit code {shipper.process.returncode}; its log:\n{shipper.log()[-6000:]}"
            )
        await asyncio.sleep(0.05)


async def log_line(shipper: Shipper, text: str, *, after: int = 0) -> int:
    """Wait for ``text`` in the shipper's log (after offset ``after``); returns the offset past it."""
    deadline = time.monotonic() + ARRIVAL
    while (found := shipper.log().find(text, after)) < 0:
        if shipper.process.returncode is not None or time.monotonic() > deadline:
            pytest.fail(
                f"no {text!r} in the shipper's log (exit code {shipper.process.returncode}):\n{shipper.log()[-6000:]}"
            )
        await asyncio.sleep(0.02)
    return found + len(text)


class Writer:
    """Appends events in small batches until stopped, as kube-apiserver does."""

    def __init__(self, audit_log: AuditLog) -> None:
        self.audit_log = audit_log
        self.running = True
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while self.running:
            self.audit_log.append(20)
            await asyncio.sleep(0.005)  # pacing of the writer, not synchronisation

    async def stop(self) -> None:
        self.running = False
        await self.task


@contextlib.asynccontextmanager
async def writing(audit_log: AuditLog) -> AsyncIterator[Writer]:
    writer = Writer(audit_log)
    try:
        yield writer
    finally:
        await writer.stop()


# --- tests ---------------------------------------------------------------------------------------------------
async def test_run_discovers_the_receiver_and_ships_every_event(world: World) -> None:
    output = world.tmp_path / "received.jsonl"
    async with receiving(world.ca1, output) as port:
        await world.cluster.create(service("127.0.0.1", (None, port)))
        before = world.audit_log.append(3000)
        env = shipper_env(world.tmp_path, world.audit_log, world.kubeconfig)
        async with shipping(world.tmp_path, env) as shipper:
            await all_arrived(before, output, what="the backlog", shipper=shipper)
            after = world.audit_log.append(1000)
            await all_arrived(after, output, what="the live events", shipper=shipper)
            assert await shipper.stop() == 0
    ids = arrived(output)
    assert len(ids) == len(set(ids)) == 4000  # a quiet run: exactly once
    tls = world.tmp_path / "tls"
    assert (tls / "tls.crt").read_bytes() == world.ca1.client_cert.read_bytes()
    assert (tls / "tls.key").stat().st_mode & 0o777 == 0o600
    log = shipper.log()
    assert f"destination: Service {NS}/{SERVICE} at 127.0.0.1:{port}" in log
    assert "PRIVATE KEY" not in log
    assert secret_data(world.ca1)["tls.key"] not in log


async def test_run_follows_a_port_change_mid_stream(world: World) -> None:
    out_a, out_b = world.tmp_path / "a.jsonl", world.tmp_path / "b.jsonl"
    async with receiving(world.ca1, out_a) as port_a, receiving(world.ca1, out_b) as port_b:
        await world.cluster.create(service("127.0.0.1", (None, port_a)))
        env = shipper_env(world.tmp_path, world.audit_log, world.kubeconfig)
        async with shipping(world.tmp_path, env) as shipper:
            first = world.audit_log.append(500)
            await all_arrived(first, out_a, what="the first batch", shipper=shipper)
            # Keep writing while the Service moves to the other port.
            async with writing(world.audit_log) as writer:
                await eventually(lambda: len(world.audit_log.written) >= 1500, timeout=ARRIVAL, what="writing")
                await world.cluster.patch("services", SERVICE, {"spec": {"ports": [{"port": port_b}]}})
                await log_line(shipper, f"at 127.0.0.1:{port_b}")
                switched_at = len(world.audit_log.written)
                await eventually(lambda: len(world.audit_log.written) >= switched_at + 1000, timeout=ARRIVAL)
                await writer.stop()
            await all_arrived(world.audit_log.written, out_a, out_b, what="all events", shipper=shipper)
            # What was written after the switch went to the new destination only (A is still up and would take it).
            late = world.audit_log.written[switched_at:]
            assert not set(late) & set(arrived(out_a))
            assert set(late) <= set(arrived(out_b))
            assert arrived(out_b), "nothing reached the new port"
            assert await shipper.stop() == 0


async def test_run_pauses_while_the_service_is_gone(world: World) -> None:
    out_a, out_b = world.tmp_path / "a.jsonl", world.tmp_path / "b.jsonl"
    async with receiving(world.ca1, out_a) as port_a, receiving(world.ca1, out_b) as port_b:
        await world.cluster.create(service("127.0.0.1", (None, port_a)))
        env = shipper_env(world.tmp_path, world.audit_log, world.kubeconfig)
        async with shipping(world.tmp_path, env) as shipper:
            first = world.audit_log.append(1000)
            await all_arrived(first, out_a, what="the first batch", shipper=shipper)
            await world.cluster.delete("services", SERVICE)
            await log_line(shipper, f"Service {NS}/{SERVICE} was deleted: shipping paused")
            during = world.audit_log.append(1000)  # the backlog grows in the file
            await world.cluster.create(service("127.0.0.1", (None, port_b)))
            await all_arrived(during, out_b, what="the events written while the Service was gone", shipper=shipper)
            assert not set(during) & set(arrived(out_a)), "events went to the old receiver while paused"
            assert shipper.process.returncode is None
            assert await shipper.stop() == 0
    ids = arrived(out_a) + arrived(out_b)
    assert set(ids) == set(world.audit_log.written)


async def test_run_secret_rotation_to_a_new_ca_loses_nothing(world: World) -> None:
    ca2 = write_certs(world.tmp_path / "ca2", SERVICE)
    out_1, out_2 = world.tmp_path / "r1.jsonl", world.tmp_path / "r2.jsonl"
    tls_dir = world.tmp_path / "tls"
    env = shipper_env(world.tmp_path, world.audit_log, world.kubeconfig)
    r1 = await start_receiver(world.ca1, out_1)
    r2: Receiving | None = None
    try:
        await world.cluster.create(service("127.0.0.1", (None, r1.port)))
        async with shipping(world.tmp_path, env) as shipper, writing(world.audit_log) as writer:
            await eventually(lambda: len(arrived(out_1)) >= 500, timeout=ARRIVAL, what="shipping to the old CA")
            # The Secret moves to a new CA and a client certificate it signed, while events keep coming.
            await world.cluster.patch("secrets", SECRET, {"data": secret_data(ca2)})
            await eventually(
                lambda: (
                    (tls_dir / "tls.crt").read_bytes() == ca2.client_cert.read_bytes()
                    and (tls_dir / "ca.crt").read_bytes() == ca2.ca.read_bytes()
                ),
                timeout=ARRIVAL,
                what="the rotated files",
            )
            # The receiver rotates too: same port, only the new CA (a client certificate of the old CA is refused,
            # a server certificate of the new CA is trusted only with the new ca.crt).
            await r1.close()
            rotated_at = len(world.audit_log.written)
            r2 = await start_receiver(ca2, out_2, port=r1.port)
            await eventually(lambda: len(world.audit_log.written) >= rotated_at + 1000, timeout=ARRIVAL)
            await writer.stop()
            await all_arrived(world.audit_log.written, out_1, out_2, what="all events", shipper=shipper)
            assert set(world.audit_log.written[rotated_at:]) <= set(arrived(out_2))
            assert await shipper.stop() == 0
    finally:
        await r1.close()
        if r2 is not None:
            await r2.close()
    log = shipper.log()
    assert "PRIVATE KEY" not in log
    assert secret_data(ca2)["tls.key"] not in log


async def test_run_with_audit_forwarders_pod_spec(world: World) -> None:
    """audit-forwarder's container env (its variables only, production values from the reference; paths point
    into the test's directory) starts pyforward with the same meaning: same Service, Secret, key names, vhost."""
    output = world.tmp_path / "received.jsonl"
    ssl_dir = world.tmp_path / "fluent-bit" / "etc" / "ssl"
    pod_env = {
        "AUDIT_KUBECFG": str(world.kubeconfig),
        "AUDIT_NAMESPACE": "audit",
        "AUDIT_SERVICE_NAME": "audittailer",
        "AUDIT_SECRET_NAME": "audittailer-client",
        "AUDIT_AUDIT_LOG_PATH": str(world.audit_log.path),
        "AUDIT_MEM_BUF_LIMIT": "200M",
        "AUDIT_TLS_BASEDIR": str(ssl_dir),
        "AUDIT_TLS_CA_FILE": "ca.crt",
        "AUDIT_TLS_CRT_FILE": "tls.crt",
        "AUDIT_TLS_KEY_FILE": "tls.key",
        "AUDIT_TLS_VHOST": "audittailer",
        "AUDIT_CHECK_SCHEDULE": "*/1 * * * *",
        "AUDIT_BACKOFF_TIMER": "10s",
        "AUDIT_LOG_LEVEL": "info",
        "AUDIT_FLUENT_LOG_LEVEL": "info",
        "AUDIT_KONNECTIVITY_UDS_SOCKET": "",
    }
    assert (NS, SERVICE, SECRET) == ("audit", "audittailer", "audittailer-client")  # what the cluster serves
    async with receiving(world.ca1, output) as port:
        await world.cluster.create(service("127.0.0.1", (None, port)))
        events = world.audit_log.append(2000)
        async with shipping(world.tmp_path, pod_env) as shipper:
            await all_arrived(events, output, what="the backlog", shipper=shipper)
            more = world.audit_log.append(500)
            await all_arrived(more, output, what="the live events", shipper=shipper)
            assert await shipper.stop() == 0
    assert (ssl_dir / "tls.crt").read_bytes() == world.ca1.client_cert.read_bytes()
    assert (ssl_dir / "ca.crt").read_bytes() == world.ca1.ca.read_bytes()
    log = shipper.log()
    for ignored in ("AUDIT_CHECK_SCHEDULE", "AUDIT_BACKOFF_TIMER", "AUDIT_FLUENT_LOG_LEVEL"):
        assert f"{ignored} is ignored" in log
    assert "audit-forwarder settings in use" in log
    ids = arrived(output)
    assert len(ids) == len(set(ids)) == 2500
