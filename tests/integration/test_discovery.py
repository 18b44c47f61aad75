"""Discovery against kmock (a Kubernetes API emulator over real HTTP, with watch streams), driven through
kubernetes-asyncio with a kubeconfig file pointing at it.

Nothing here sleeps to synchronise: every wait is on a condition with a deadline (a callback recorded, a
request seen by the emulator, a log line, a file's content).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kmock
import pytest

from pyforward.discovery import Discovery, Target
from pyforward.discovery import kubeconfig as discovery_kubeconfig
from pyforward.discovery import pacing as discovery_pacing
from pyforward.settings import Settings
from tests.conftest import CertFiles, write_certs
from tests.integration.kubemock import (
    DEADLINE,
    KEYS,
    NS,
    SECRET,
    SECRETS,
    SERVICE,
    SERVICES,
    Cluster,
    emulated_cluster,
    eventually,
    secret,
    secret_data,
    service,
)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with emulated_cluster() as c:
        yield c


@pytest.fixture
def kubeconfig(tmp_path: Path, cluster: Cluster) -> Path:
    path = tmp_path / "kubeconfig"
    cluster.write_kubeconfig(path)
    return path


@pytest.fixture(autouse=True)
def fast_config_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery_kubeconfig, "CONFIG_POLL_INTERVAL", 0.05)


def make_settings(tmp_path: Path, kubeconfig: Path | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "host": None,
        "kubeconfig": kubeconfig,
        "namespace": NS,
        "service_name": SERVICE,
        "secret_name": SECRET,
        "secret_ca_key": "ca.crt",
        "secret_cert_key": "tls.crt",
        "secret_key_key": "tls.key",
        "tls_dir": tmp_path / "tls",
        "backoff_initial": 0.02,
        "backoff_max": 0.2,
        "connect_timeout": 2.0,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class Recorder:
    targets: list[Target | None] = field(default_factory=list)
    secrets: int = 0

    def on_target(self, target: Target | None) -> None:
        self.targets.append(target)

    def on_secret(self) -> None:
        self.secrets += 1


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[Discovery, Recorder]]:
    recorder = Recorder()
    disc = Discovery(settings, on_target=recorder.on_target, on_secret=recorder.on_secret)
    task = asyncio.create_task(disc.run())
    try:
        yield disc, recorder
        assert not task.done(), f"Discovery.run() ended: {task.exception() if not task.cancelled() else 'cancelled'}"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def file_state(directory: Path) -> dict[str, tuple[bytes, int, int]]:
    return {
        key: (
            (directory / key).read_bytes(),
            (directory / key).stat().st_ino,
            stat.S_IMODE((directory / key).stat().st_mode),
        )
        for key in KEYS
    }


def discovery_warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "pyforward.discovery" and r.levelno >= logging.WARNING and text in r.getMessage()
    ]


# --- tests ---------------------------------------------------------------------------------------------------
def test_import_is_cheap() -> None:
    code = "import sys, pyforward.discovery; assert 'kubernetes_asyncio' not in sys.modules, 'imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


async def test_discovers_service_and_secret_from_kubeconfig(
    tmp_path: Path, cluster: Cluster, kubeconfig: Path, certs: CertFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pyforward.discovery")
    await cluster.create(service("10.1.2.3", (None, 24224)))
    await cluster.create(secret(certs))
    settings = make_settings(tmp_path, kubeconfig)
    async with running(settings) as (disc, rec):
        assert await disc.wait_ready(DEADLINE)
        assert disc.target == Target("10.1.2.3", 24224)
        assert rec.targets == [Target("10.1.2.3", 24224)]
        assert disc.secret_ready
        await eventually(lambda: rec.secrets == 1, what="on_secret")
        tls = settings.tls_dir
        assert (tls / "ca.crt").read_bytes() == certs.ca.read_bytes()
        assert (tls / "tls.crt").read_bytes() == certs.client_cert.read_bytes()
        assert (tls / "tls.key").read_bytes() == certs.client_key.read_bytes()
        for key in KEYS:
            assert stat.S_IMODE((tls / key).stat().st_mode) == 0o600
        assert sorted(p.name for p in tls.iterdir()) == sorted(KEYS)  # no temp files left behind
        # The receiver TLS files the pipeline uses are exactly these.
        assert settings.receiver_tls_files == (tls / "ca.crt", tls / "tls.crt", tls / "tls.key")
        # A field-selected list per object, then one watch each (no polling).
        services_lists = cluster.requests(kmock.action.LIST, SERVICES)
        assert len(services_lists) == 1
        assert services_lists[0].params["fieldSelector"] == f"metadata.name={SERVICE}"
        await eventually(lambda: len(cluster.requests(kmock.action.WATCH, SECRETS)) == 1, what="secret watch")
    assert "not-a-real-token" not in caplog.text
    assert secret_data(certs)["tls.key"] not in caplog.text
    assert "PRIVATE KEY" not in caplog.text


async def test_port_change_mid_watch(tmp_path: Path, cluster: Cluster, kubeconfig: Path) -> None:
    await cluster.create(service("10.1.2.3", (None, 24224)))
    async with running(make_settings(tmp_path, kubeconfig, secret_name="")) as (disc, rec):
        assert await disc.wait_ready(DEADLINE)
        await eventually(lambda: len(cluster.requests(kmock.action.WATCH, SERVICES)) == 1, what="watch")
        await cluster.patch("services", SERVICE, {"spec": {"ports": [{"port": 24225}]}})
        await eventually(lambda: len(rec.targets) == 2, what="on_target with the new port")
        assert rec.targets == [Target("10.1.2.3", 24224), Target("10.1.2.3", 24225)]
        assert disc.target == Target("10.1.2.3", 24225)
        # Seen through the watch, not by listing again.
        assert len(cluster.requests(kmock.action.LIST, SERVICES)) == 1
        # A change that does not touch ClusterIP or port is no new destination.
        await cluster.patch("services", SERVICE, {"metadata": {"labels": {"touched": "yes"}}})
        await cluster.patch("services", SERVICE, {"spec": {"ports": [{"port": 24226}]}})
        await eventually(lambda: len(rec.targets) == 3, what="on_target after the second change")
        assert rec.targets[-1] == Target("10.1.2.3", 24226)


async def test_service_deleted_then_recreated(
    tmp_path: Path, cluster: Cluster, kubeconfig: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await cluster.create(service("10.1.2.3"))
    async with running(make_settings(tmp_path, kubeconfig, secret_name="")) as (disc, rec):
        assert await disc.wait_ready(DEADLINE)
        await eventually(lambda: len(cluster.requests(kmock.action.WATCH, SERVICES)) == 1, what="watch")
        await cluster.delete("services", SERVICE)
        await eventually(lambda: len(rec.targets) == 2, what="on_target(None)")
        assert rec.targets == [Target("10.1.2.3", 24224), None]
        assert disc.target is None
        assert not await disc.wait_ready(0)
        assert discovery_warnings(caplog, "was deleted: shipping paused")
        await cluster.create(service("10.9.8.7", (None, 24224)))
        await eventually(lambda: len(rec.targets) == 3, what="on_target(new)")
        assert rec.targets[-1] == Target("10.9.8.7", 24224)
        assert await disc.wait_ready(0)


async def test_service_missing_at_start(tmp_path: Path, cluster: Cluster, kubeconfig: Path, caplog) -> None:
    async with running(make_settings(tmp_path, kubeconfig, secret_name="")) as (disc, rec):
        await eventually(lambda: bool(discovery_warnings(caplog, f"waiting for Service {NS}/{SERVICE}")))
        assert rec.targets == []  # nothing was known, so nothing is withdrawn
        await cluster.create(service("10.1.2.3"))
        assert await disc.wait_ready(DEADLINE)
        assert rec.targets == [Target("10.1.2.3", 24224)]


async def test_secret_rotated(
    tmp_path: Path, cluster: Cluster, kubeconfig: Path, certs: CertFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pyforward.discovery")
    await cluster.create(service())
    await cluster.create(secret(certs))
    settings = make_settings(tmp_path, kubeconfig)
    async with running(settings) as (disc, rec):
        assert await disc.wait_ready(DEADLINE)
        await eventually(lambda: len(cluster.requests(kmock.action.WATCH, SECRETS)) == 1, what="watch")
        before = file_state(settings.tls_dir)
        assert rec.secrets == 1
        # A change that leaves the data alone: no file rewritten, no on_secret.
        await cluster.patch("secrets", SECRET, {"metadata": {"labels": {"touched": "yes"}}})
        rotated = write_certs(tmp_path / "rotated", "rotated")
        await cluster.patch("secrets", SECRET, {"data": secret_data(rotated)})
        await eventually(lambda: rec.secrets == 2, what="on_secret after the rotation")
        after = file_state(settings.tls_dir)
        assert after["ca.crt"][0] == rotated.ca.read_bytes()
        assert after["tls.crt"][0] == rotated.client_cert.read_bytes()
        assert after["tls.key"][0] == rotated.client_key.read_bytes()
        for key in KEYS:
            _, inode, mode = after[key]
            assert mode == 0o600
            assert inode != before[key][1], f"{key} was rewritten in place, not replaced by a rename"
        assert sorted(p.name for p in settings.tls_dir.iterdir()) == sorted(KEYS)
        assert rec.targets == [Target("10.0.0.10", 24224)]  # the destination is untouched
        # Only the changed files are rewritten: rotate the client certificate, keep the CA.
        third = {**secret_data(rotated), "tls.crt": secret_data(certs)["tls.crt"]}
        await cluster.patch("secrets", SECRET, {"data": third})
        await eventually(lambda: rec.secrets == 3, what="on_secret after the cert-only change")
        final = file_state(settings.tls_dir)
        assert final["ca.crt"][1] == after["ca.crt"][1]
        assert final["tls.crt"][1] != after["tls.crt"][1]
        # Secret deleted: the files stay (they are still valid), shipping goes on.
        await cluster.delete("secrets", SECRET)
        await eventually(lambda: bool(discovery_warnings(caplog, "is gone: keeping the certificates")))
        assert file_state(settings.tls_dir) == final
        assert disc.secret_ready
    for blob in (secret_data(certs), secret_data(rotated)):
        for value in blob.values():
            assert value not in caplog.text
    assert "PRIVATE KEY" not in caplog.text


async def test_api_500s_keep_target_then_recover(
    tmp_path: Path,
    cluster: Cluster,
    kubeconfig: Path,
    certs: CertFiles,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="pyforward.discovery")
    await cluster.create(service("10.1.2.3"))
    await cluster.create(secret(certs))
    settings = make_settings(tmp_path, kubeconfig)
    async with running(settings) as (disc, rec):
        assert await disc.wait_ready(DEADLINE)
        files = file_state(settings.tls_dir)
        failing = {"on": True}
        errors = (
            cluster.api[lambda req: failing["on"]]
            << 500
            << {
                "kind": "Status",
                "code": 500,
                "status": "Failure",
                "reason": "InternalError",
                "message": "etcd is having a bad day",
            }
        )
        await cluster.restart()  # drop the open watch streams; every request from now on gets a 500
        await eventually(lambda: len(errors) >= 8, what="several failed requests")
        assert rec.targets == [Target("10.1.2.3", 24224)]  # no on_target(None) for API trouble
        assert disc.target == Target("10.1.2.3", 24224)
        assert file_state(settings.tls_dir) == files
        assert rec.secrets == 1
        # Logged at a sane rate: the first error of each watch, not one line per retry.
        service_errors = discovery_warnings(caplog, f"watching Service {NS}/{SERVICE}")
        secret_errors = discovery_warnings(caplog, f"watching Secret {NS}/{SECRET}")
        assert len(service_errors) == 1, [r.getMessage() for r in service_errors]
        assert len(secret_errors) == 1, [r.getMessage() for r in secret_errors]
        # Later errors are summed up at most once per ERROR_LOG_INTERVAL (shortened here), with a count.
        monkeypatch.setattr(discovery_pacing, "ERROR_LOG_INTERVAL", 0.0)
        await eventually(
            lambda: any(
                "500 InternalError: etcd is having a bad day" in r.getMessage()
                and "error(s) in the last" in r.getMessage()
                for r in discovery_warnings(caplog, f"watching Service {NS}/{SERVICE}")
            ),
            what="a periodic error line with a count",
        )
        assert rec.targets == [Target("10.1.2.3", 24224)]
        failing["on"] = False
        await cluster.patch("services", SERVICE, {"spec": {"ports": [{"port": 24230}]}})
        await eventually(lambda: len(rec.targets) == 2, what="recovery")
        assert rec.targets[-1] == Target("10.1.2.3", 24230)
        await eventually(
            lambda: any("working again after" in r.getMessage() for r in caplog.records), what="recovery line"
        )


async def test_api_unreachable_keeps_target(
    tmp_path: Path, cluster: Cluster, kubeconfig: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await cluster.create(service("10.1.2.3"))
    async with running(make_settings(tmp_path, kubeconfig, secret_name="")) as (disc, rec):
        assert await disc.wait_ready(DEADLINE)
        await cluster.stop()
        await eventually(lambda: bool(discovery_warnings(caplog, f"watching Service {NS}/{SERVICE}")))
        assert rec.targets == [Target("10.1.2.3", 24224)]
        assert disc.target == Target("10.1.2.3", 24224)
        await cluster.start()  # same port
        await cluster.patch("services", SERVICE, {"spec": {"clusterIP": "10.1.2.4"}})
        await eventually(lambda: len(rec.targets) == 2, what="the change after the API came back")
        assert rec.targets[-1] == Target("10.1.2.4", 24224)


async def test_refused_credentials_reload_the_configuration(
    tmp_path: Path, cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A 401 loads the configuration again (exec plugins, OIDC and token files give fresh credentials only
    then); the kubeconfig file itself does not change here."""
    caplog.set_level(logging.INFO, logger="pyforward.discovery")
    token = tmp_path / "token"
    token.write_text("token-1")
    kubeconfig = tmp_path / "kubeconfig"
    cluster.write_kubeconfig(kubeconfig, token_file=token)
    await cluster.create(service("10.1.2.3"))
    async with running(make_settings(tmp_path, kubeconfig, secret_name="")) as (disc, rec):
        assert await disc.wait_ready(DEADLINE)
        refused = (
            cluster.api[lambda req: req.headers.get("Authorization") == "Bearer token-1"]
            << 401
            << {"kind": "Status", "code": 401, "status": "Failure", "reason": "Unauthorized", "message": "expired"}
        )
        token.write_text("token-2")  # the rotated token; only a new load of the configuration reads it
        await cluster.restart()  # the open watch ends; the next request is refused
        await eventually(lambda: len(refused) >= 1, what="a refused request")
        await cluster.patch("services", SERVICE, {"spec": {"ports": [{"port": 24299}]}})
        await eventually(lambda: len(rec.targets) == 2, what="the change seen with the new token")
        assert rec.targets == [Target("10.1.2.3", 24224), Target("10.1.2.3", 24299)]  # never None
        await eventually(
            lambda: any(
                r.headers.get("Authorization") == "Bearer token-2"
                for r in cluster.requests(kmock.action.WATCH, SERVICES)
            ),
            what="a watch with the new token",
        )
    assert any("refused the credentials (401)" in r.getMessage() for r in caplog.records)
    assert "token-1" not in caplog.text
    assert "token-2" not in caplog.text


@pytest.mark.parametrize("how", ["error-event", "http-status"])
async def test_watch_410_relists(tmp_path: Path, cluster: Cluster, kubeconfig: Path, how: str) -> None:
    await cluster.create(service("10.1.2.3", (None, 1000)))

    def changed_behind_the_watch() -> None:
        # The object changes while the watch is broken: only a new list can see it (no event is sent).
        cluster.api.objects["v1/services", NS, SERVICE].patch({"spec": {"ports": [{"port": 2000}]}})

    gone = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": "Expired",
        "code": 410,
        "message": "too old resource version: 1 (2)",
    }
    first_watch = cluster.api[kmock.action.WATCH, SERVICES][:1] >> changed_behind_the_watch
    if how == "error-event":
        first_watch << ({"type": "ERROR", "object": gone},)
    else:
        first_watch << 410 << gone
    async with running(make_settings(tmp_path, kubeconfig, secret_name="")) as (disc, rec):
        await eventually(lambda: len(rec.targets) == 2, what="the target from the second list")
        assert rec.targets == [Target("10.1.2.3", 1000), Target("10.1.2.3", 2000)]
        assert len(cluster.requests(kmock.action.LIST, SERVICES)) == 2
        # ...and it watches again afterwards.
        await cluster.patch("services", SERVICE, {"spec": {"ports": [{"port": 3000}]}})
        await eventually(lambda: len(rec.targets) == 3, what="a change through the new watch")
        assert disc.target == Target("10.1.2.3", 3000)


async def test_watch_resumes_from_last_resource_version(tmp_path: Path, cluster: Cluster, kubeconfig: Path) -> None:
    await cluster.create(service("10.1.2.3", (None, 1000), rv="5"))
    # The first watch delivers one change and ends, as a server-side timeout does.
    cluster.api[kmock.action.WATCH, SERVICES][:1] << (
        {"type": "MODIFIED", "object": service("10.1.2.3", (None, 1001), rv="7")},
    )
    async with running(make_settings(tmp_path, kubeconfig, secret_name="")) as (_, rec):
        await eventually(lambda: len(cluster.requests(kmock.action.WATCH, SERVICES)) >= 2, what="a second watch")
        watches = cluster.requests(kmock.action.WATCH, SERVICES)
        assert watches[0].params["resourceVersion"] == "..."  # kmock's list resourceVersion
        assert watches[1].params["resourceVersion"] == "7"  # resumed where the stream ended
        assert watches[1].params["watch"] == "true"
        assert len(cluster.requests(kmock.action.LIST, SERVICES)) == 1  # no new list
        assert rec.targets[:2] == [Target("10.1.2.3", 1000), Target("10.1.2.3", 1001)]


async def test_kubeconfig_replaced_switches_cluster(
    tmp_path: Path, cluster: Cluster, kubeconfig: Path, certs: CertFiles, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="pyforward.discovery")
    await cluster.create(service("10.0.0.1"))
    await cluster.create(secret(certs))
    other_certs = write_certs(tmp_path / "other", "other")
    async with emulated_cluster() as other:
        await other.create(service("10.0.0.2", (None, 30000)))
        await other.create(secret(other_certs))
        settings = make_settings(tmp_path, kubeconfig)
        async with running(settings) as (disc, rec):
            assert await disc.wait_ready(DEADLINE)
            assert rec.targets == [Target("10.0.0.1", 24224)]
            other.write_kubeconfig(kubeconfig)
            await eventually(lambda: len(rec.targets) == 2, what="the target in the other cluster")
            assert rec.targets[-1] == Target("10.0.0.2", 30000)
            await eventually(lambda: rec.secrets == 2, what="the other cluster's Secret")
            assert (settings.tls_dir / "tls.crt").read_bytes() == other_certs.client_cert.read_bytes()
            assert other.requests(kmock.action.LIST, SERVICES)
            assert other.requests(kmock.action.LIST, SECRETS)
            # The old cluster is no longer watched; the new one is.
            await cluster.patch("services", SERVICE, {"spec": {"ports": [{"port": 1}]}})
            await other.patch("services", SERVICE, {"spec": {"ports": [{"port": 30001}]}})
            await eventually(lambda: len(rec.targets) == 3, what="a change in the new cluster")
            assert rec.targets == [Target("10.0.0.1", 24224), Target("10.0.0.2", 30000), Target("10.0.0.2", 30001)]
    assert any("kubeconfig changed: reconnecting" in r.getMessage() for r in caplog.records)


async def test_kubeconfig_missing_then_written(tmp_path: Path, cluster: Cluster, caplog) -> None:
    await cluster.create(service("10.1.2.3"))
    path = tmp_path / "later" / "kubeconfig"
    async with running(make_settings(tmp_path, path, secret_name="")) as (disc, rec):
        await eventually(lambda: bool(discovery_warnings(caplog, "does not exist")), what="a config error line")
        line = discovery_warnings(caplog, "does not exist")[0].getMessage()
        assert str(path) in line
        path.parent.mkdir()
        cluster.write_kubeconfig(path)
        assert await disc.wait_ready(DEADLINE)
        assert rec.targets == [Target("10.1.2.3", 24224)]


async def test_broken_kubeconfig_is_reported_without_its_content(tmp_path: Path, cluster: Cluster, caplog) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text("users:\n- name: x\n  user: {token: s3cr3t-t0ken\n")  # unterminated flow mapping
    async with running(make_settings(tmp_path, path, secret_name="")):
        await eventually(lambda: bool(discovery_warnings(caplog, "invalid YAML")), what="a config error line")
    assert "s3cr3t-t0ken" not in caplog.text


@pytest.mark.parametrize("declared", [True, False], ids=["empty-list", "list-404"])
async def test_secret_missing_at_start(
    tmp_path: Path, certs: CertFiles, caplog: pytest.LogCaptureFixture, declared: bool
) -> None:
    async with emulated_cluster(declare=declared) as cluster:
        await cluster.create(service("10.1.2.3"))
        kubeconfig = tmp_path / "kubeconfig"
        cluster.write_kubeconfig(kubeconfig)
        settings = make_settings(tmp_path, kubeconfig)
        async with running(settings) as (disc, rec):
            await eventually(lambda: disc.target is not None, what="the target")
            waiting = f"waiting for Secret {NS}/{SECRET} (TLS requires it)"
            await eventually(lambda: bool(discovery_warnings(caplog, waiting)), what="the waiting line")
            # Looked at more than once (404: polled; empty list: watched), said once.
            await eventually(
                lambda: (
                    len(cluster.requests(kmock.action.LIST, SECRETS))
                    + len(cluster.requests(kmock.action.WATCH, SECRETS))
                    >= 3
                    if not declared
                    else len(cluster.requests(kmock.action.WATCH, SECRETS)) >= 1
                ),
                what="the Secret being followed",
            )
            assert not await disc.wait_ready(0)
            assert not (settings.tls_dir / "tls.key").exists()
            await cluster.create(secret(certs))
            assert await disc.wait_ready(DEADLINE)
            assert disc.secret_ready
            assert (settings.tls_dir / "tls.key").read_bytes() == certs.client_key.read_bytes()
            assert rec.secrets == 1
        assert len(discovery_warnings(caplog, waiting)) == 1


async def test_secret_without_the_expected_keys(
    tmp_path: Path, cluster: Cluster, kubeconfig: Path, certs: CertFiles, caplog
) -> None:
    await cluster.create(service())
    incomplete = secret(certs)
    del incomplete["data"]["tls.key"]
    await cluster.create(incomplete)
    settings = make_settings(tmp_path, kubeconfig)
    async with running(settings) as (disc, rec):
        await eventually(lambda: bool(discovery_warnings(caplog, "lacks key(s) tls.key")), what="the key warning")
        assert not disc.secret_ready
        assert rec.secrets == 0
        await cluster.patch("secrets", SECRET, {"data": secret_data(certs)})
        assert await disc.wait_ready(DEADLINE)
        assert rec.secrets == 1


@pytest.mark.parametrize(
    ("port_name", "expected", "warning"),
    [
        ("forward", 24224, None),
        (None, 9090, "has several ports (metrics=9090, forward=24224) and PYFORWARD_SERVICE_PORT_NAME is unset"),
        ("nope", 9090, "has no port named 'nope'"),
    ],
)
async def test_multiport_service(
    tmp_path: Path,
    cluster: Cluster,
    kubeconfig: Path,
    caplog: pytest.LogCaptureFixture,
    port_name: str | None,
    expected: int,
    warning: str | None,
) -> None:
    await cluster.create(service("10.1.2.3", ("metrics", 9090), ("forward", 24224)))
    settings = make_settings(tmp_path, kubeconfig, secret_name="", service_port_name=port_name)
    async with running(settings) as (disc, rec):
        assert await disc.wait_ready(DEADLINE)
        assert rec.targets == [Target("10.1.2.3", expected)]
        # Another event for the same Service: the warning is not repeated.
        await cluster.patch("services", SERVICE, {"metadata": {"labels": {"touched": "yes"}}})
        await cluster.patch("services", SERVICE, {"spec": {"clusterIP": "10.1.2.4"}})
        await eventually(lambda: len(rec.targets) == 2, what="the second event")
        assert rec.targets[-1] == Target("10.1.2.4", expected)
    if warning is None:
        assert not discovery_warnings(caplog, "port")
    else:
        assert len(discovery_warnings(caplog, warning)) == 1


async def test_headless_service_is_no_target(tmp_path: Path, cluster: Cluster, kubeconfig: Path, caplog) -> None:
    await cluster.create(service("None"))
    async with running(make_settings(tmp_path, kubeconfig, secret_name="")) as (disc, rec):
        await eventually(lambda: bool(discovery_warnings(caplog, "has no ClusterIP")), what="the warning")
        assert disc.target is None
        assert rec.targets == []


async def test_callback_errors_do_not_stop_discovery(tmp_path: Path, cluster: Cluster, kubeconfig: Path) -> None:
    await cluster.create(service("10.1.2.3"))
    seen: list[Target | None] = []

    def broken(target: Target | None) -> None:
        seen.append(target)
        raise RuntimeError("pipeline bug")

    disc = Discovery(make_settings(tmp_path, kubeconfig, secret_name=""), on_target=broken)
    task = asyncio.create_task(disc.run())
    try:
        assert await disc.wait_ready(DEADLINE)
        await cluster.patch("services", SERVICE, {"spec": {"ports": [{"port": 1234}]}})
        await eventually(lambda: len(seen) == 2, what="the second callback")
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
