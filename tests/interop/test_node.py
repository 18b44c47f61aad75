"""Interop with @fluent-org/logger 1.0.10 (node): its client -> `pyforward receive`, `pyforward send` -> its server.

An independent implementation catches what our own client and receiver would agree on wrongly: field types
(node insists on msgpack str for PING/PONG fields and for the ack value), digests, EventTime, gzip framing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import CertFiles
from tests.interop.conftest import NodeServer, PyforwardReceiver, pyforward_send, rfc3339, run_node_client

pytestmark = pytest.mark.interop

MODES = ["Message", "Forward", "PackedForward", "CompressedPackedForward"]


def sample_events(count: int) -> list[dict[str, Any]]:
    """Records that stress the encoders: unicode of every width, escapes, nesting, numbers, nanoseconds."""
    specials = [
        "zoë ✓ 日本語 🚀 Ünïcödé",
        'quote " backslash \\ slash / newline \n tab \t',
        "control \u0001\u001f and NUL-free",
        "e\u0301 combining, \u200b zero width, \ufeff BOM, RTL \u05d0\u05d1",
        "",
    ]
    events = []
    for i in range(count):
        record = {
            "seq": i,
            "message": specials[i % len(specials)],
            "user": {"username": f"system:serviceaccount:ns-{i}:sa", "groups": ["system:authenticated", "ünï"]},
            "code": 200 + i % 5,
            "negative": -i,
            "ratio": i / 4,
            "flag": i % 2 == 0,
            "nothing": None,
            "big": 2**53 - 1,  # the largest integer a JS number keeps exactly
        }
        events.append({"time": [1_700_000_000 + i, (i * 7919 + 1) % 1_000_000_000], "record": record})
    return events


def write_events(path: Path, events: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    return path


def expect_full(tag: str, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"tag": tag, "time": rfc3339(*e["time"]), "record": e["record"]} for e in events]


def by_seq(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(lines, key=lambda line: line["record"]["seq"])


def assert_ok(result: Any) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"


# ------------------------------------------------------------------------------------------------ node -> pyforward


@pytest.mark.parametrize("mode", MODES)
def test_node_client_every_mode_acked(
    mode: str, node: Path, tmp_path: Path, pyforward_receiver: Callable[..., PyforwardReceiver]
) -> None:
    receiver = pyforward_receiver()
    events = sample_events(40)
    source = write_events(tmp_path / "events.jsonl", events)
    tag = f"interop.{mode.lower()}"
    result = run_node_client(node, "--port", str(receiver.port), "--mode", mode, "--input", str(source), "--tag", tag,
                             "--ack")  # fmt: skip
    assert_ok(result)
    # Every emit was acked, and an ack means written: the file is complete now, each record exactly once.
    lines = receiver.lines()
    assert len(lines) == len(events)
    assert by_seq(lines) == expect_full(tag, events)


def test_node_client_without_ack(
    node: Path, tmp_path: Path, pyforward_receiver: Callable[..., PyforwardReceiver]
) -> None:
    receiver = pyforward_receiver()
    events = sample_events(25)
    source = write_events(tmp_path / "events.jsonl", events)
    assert_ok(run_node_client(node, "--port", str(receiver.port), "--mode", "Forward", "--input", str(source)))
    lines = receiver.wait_lines(len(events))
    assert by_seq(lines) == expect_full("interop", events)


def test_node_client_volume_exactly_once(
    node: Path, tmp_path: Path, pyforward_receiver: Callable[..., PyforwardReceiver]
) -> None:
    receiver = pyforward_receiver()
    count = 5000
    result = run_node_client(node, "--port", str(receiver.port), "--mode", "CompressedPackedForward",
                             "--count", str(count), "--ack")  # fmt: skip
    assert_ok(result)
    seqs = sorted(line["record"]["seq"] for line in receiver.lines())
    assert seqs == list(range(count))


@pytest.mark.parametrize("mode", ["PackedForward", "Message"])
def test_node_client_tls(
    mode: str, node: Path, tmp_path: Path, certs: CertFiles, pyforward_receiver: Callable[..., PyforwardReceiver]
) -> None:
    receiver = pyforward_receiver("--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key))
    assert receiver.mode == "tls"
    events = sample_events(10)
    source = write_events(tmp_path / "events.jsonl", events)
    result = run_node_client(node, "--port", str(receiver.port), "--mode", mode, "--input", str(source), "--ack",
                             "--ca", str(certs.ca))  # fmt: skip
    assert_ok(result)
    assert by_seq(receiver.lines()) == expect_full("interop", events)


@pytest.mark.parametrize("mode", MODES)
def test_node_client_mtls_with_shared_key(
    mode: str, node: Path, tmp_path: Path, certs: CertFiles, pyforward_receiver: Callable[..., PyforwardReceiver]
) -> None:
    receiver = pyforward_receiver(
        "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key), "--tls-ca", str(certs.ca),
        env={"PYFORWARD_RECEIVER_SHARED_KEY": "interop-key"},
    )  # fmt: skip
    assert receiver.mode == "mtls"
    events = sample_events(30)
    source = write_events(tmp_path / "events.jsonl", events)
    tls = ["--ca", str(certs.ca), "--cert", str(certs.client_cert), "--key", str(certs.client_key)]
    result = run_node_client(node, "--port", str(receiver.port), "--mode", mode, "--input", str(source), "--ack",
                             "--shared-key", "interop-key", *tls)  # fmt: skip
    assert_ok(result)
    assert by_seq(receiver.lines()) == expect_full("interop", events)


def test_node_client_mtls_without_certificate_is_refused(
    node: Path, certs: CertFiles, pyforward_receiver: Callable[..., PyforwardReceiver]
) -> None:
    receiver = pyforward_receiver(
        "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key), "--tls-ca", str(certs.ca)
    )
    result = run_node_client(node, "--port", str(receiver.port), "--count", "3", "--ack", "--ca", str(certs.ca),
                             "--timeout", "5000")  # fmt: skip
    assert result.returncode != 0
    assert receiver.lines() == []
    receiver.proc.wait_stderr("TLS handshake with .* failed")


@pytest.mark.parametrize("mode", MODES)
def test_node_client_shared_key(
    mode: str, node: Path, tmp_path: Path, pyforward_receiver: Callable[..., PyforwardReceiver]
) -> None:
    receiver = pyforward_receiver("--shared-key", "interop-key", "--self-hostname", "pyforward-receiver")
    events = sample_events(12)
    source = write_events(tmp_path / "events.jsonl", events)
    result = run_node_client(node, "--port", str(receiver.port), "--mode", mode, "--input", str(source), "--ack",
                             "--shared-key", "interop-key")  # fmt: skip
    assert_ok(result)
    assert by_seq(receiver.lines()) == expect_full("interop", events)


def test_node_client_wrong_shared_key(node: Path, pyforward_receiver: Callable[..., PyforwardReceiver]) -> None:
    receiver = pyforward_receiver("--shared-key", "right-key")
    result = run_node_client(node, "--port", str(receiver.port), "--count", "3", "--ack", "--shared-key", "wrong-key",
                             "--timeout", "5000")  # fmt: skip
    assert result.returncode == 1, result
    # node's client reports our PONG's reason: the refusal is explicit, not a silent close.
    assert "Authentication failed: shared_key mismatch" in result.stderr
    assert receiver.lines() == []
    receiver.proc.wait_stderr("handshake with .* failed: shared_key mismatch")
    assert not any("right-key" in line or "wrong-key" in line for line in receiver.proc.stderr)


@pytest.mark.parametrize(("password", "ok"), [("wonderland", True), ("wrong", False)])
def test_node_client_user_auth(
    password: str, ok: bool, node: Path, pyforward_receiver: Callable[..., PyforwardReceiver]
) -> None:
    receiver = pyforward_receiver("--shared-key", "k", env={"PYFORWARD_RECEIVER_USERS": "alice:wonderland,bob:builder"})
    result = run_node_client(node, "--port", str(receiver.port), "--count", "4", "--ack", "--shared-key", "k",
                             "--username", "alice", "--password", password, "--timeout", "5000")  # fmt: skip
    if ok:
        assert_ok(result)
        assert len(receiver.lines()) == 4
    else:
        assert result.returncode == 1
        assert "username/password mismatch" in result.stderr
        assert receiver.lines() == []


# ------------------------------------------------------------------------------------------------ pyforward -> node


def audit_lines(count: int) -> list[dict[str, Any]]:
    lines = []
    for i in range(count):
        lines.append(
            {
                "kind": "Event",
                "auditID": f"00000000-0000-4000-8000-{i:012d}",
                "verb": "get",
                "user": {"username": "zoë ✓ 日本 🚀"},
                "stageTimestamp": f"2024-01-02T03:04:{i % 60:02d}.{i:09d}Z",
                "seq": i,
            }
        )
    return lines


def write_lines(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def expect_node(tag: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from pyforward.records import parse_time

    out = []
    for record in records:
        stamp = parse_time(record["stageTimestamp"])
        assert stamp is not None
        out.append({"tag": tag, "time": [stamp.seconds, stamp.nanoseconds], "record": record})
    return out


def by_node_seq(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(entries, key=lambda e: e["record"]["seq"])


@pytest.mark.parametrize("gzip", [False, True], ids=["packed", "gzip"])
def test_send_to_node_server(gzip: bool, tmp_path: Path, node_server: Callable[..., NodeServer]) -> None:
    server = node_server()
    records = audit_lines(1200)
    source = write_lines(tmp_path / "audit.log", records)
    args = ["--host", "127.0.0.1", "--port", str(server.port), "--tag", "k8s.audit", "--chunk-max-records", "300"]
    result = pyforward_send(*args, *(["--gzip"] if gzip else []), str(source))
    assert_ok(result)
    # FluentServer acks before it prints; the prints follow within the same tick.
    entries = server.wait_entries(len(records))
    assert len(entries) == len(records)
    assert by_node_seq(entries) == expect_node("k8s.audit", records)


def test_send_to_node_server_tls_mtls_shared_key(
    tmp_path: Path, certs: CertFiles, node_server: Callable[..., NodeServer]
) -> None:
    server = node_server("--cert", str(certs.server_cert), "--key", str(certs.server_key), "--ca", str(certs.ca),
                         "--shared-key", "interop-key")  # fmt: skip
    assert server.mode == "mtls"
    records = audit_lines(50)
    source = write_lines(tmp_path / "audit.log", records)
    tls = ["--tls", "--tls-ca", str(certs.ca), "--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key),
           "--tls-server-name", "localhost"]  # fmt: skip
    result = pyforward_send("--host", "127.0.0.1", "--port", str(server.port), "--shared-key", "interop-key", *tls,
                            "--gzip", str(source))  # fmt: skip
    assert_ok(result)
    assert by_node_seq(server.wait_entries(len(records))) == expect_node("audit", records)


def test_send_to_node_server_tls_only(tmp_path: Path, certs: CertFiles, node_server: Callable[..., NodeServer]) -> None:
    server = node_server("--cert", str(certs.server_cert), "--key", str(certs.server_key))
    records = audit_lines(5)
    source = write_lines(tmp_path / "audit.log", records)
    result = pyforward_send("--host", "127.0.0.1", "--port", str(server.port), "--tls", "--tls-ca", str(certs.ca),
                            "--tls-server-name", "localhost", str(source))  # fmt: skip
    assert_ok(result)
    assert by_node_seq(server.wait_entries(len(records))) == expect_node("audit", records)


def test_send_to_node_server_user_auth(tmp_path: Path, node_server: Callable[..., NodeServer]) -> None:
    server = node_server("--shared-key", "k", "--user", "alice:wonderland")
    records = audit_lines(5)
    source = write_lines(tmp_path / "audit.log", records)
    result = pyforward_send("--host", "127.0.0.1", "--port", str(server.port), "--shared-key", "k",
                            "--username", "alice", "--password", "wonderland", str(source))  # fmt: skip
    assert_ok(result)
    assert len(server.wait_entries(len(records))) == len(records)


def test_send_to_node_server_wrong_shared_key(tmp_path: Path, node_server: Callable[..., NodeServer]) -> None:
    server = node_server("--shared-key", "right-key")
    source = write_lines(tmp_path / "audit.log", audit_lines(3))
    result = pyforward_send("--host", "127.0.0.1", "--port", str(server.port), "--shared-key", "wrong-key",
                            "--timeout", "2", str(source))  # fmt: skip
    assert result.returncode != 0
    assert "shared key mismatch" in result.stderr
    assert server.entries() == []


def test_run_with_record_ranges_to_node_server(tmp_path: Path, node_server: Callable[..., NodeServer]) -> None:
    """`pyforward run` sends the pyforward.* record ranges by default (issue 22): an independent Forward server
    that does not know them acks and delivers every chunk (the spec's unknown options), across a rotation, a gzipped
    backup and a line cut to max_line_bytes."""
    from tests.harness import harness_at

    server = node_server()
    with harness_at(tmp_path) as harness:
        writer = harness.audit_log(max_bytes=64 << 10, compress=True)
        writer.write(150)
        writer.write_lines([orjson.dumps({"kind": "Event", "auditID": "long-line", "pad": "x" * 20_000})])
        writer.write(50)
        assert writer.rotations >= 2
        env = harness.run_env(port=server.port, record_ranges="true", max_line_bytes=8192, chunk_max_records=40)
        run = harness.run(env)
        entries = run.wait_until(lambda: (e if len(e := server.entries()) >= len(writer.ids) else None), 60,
                                 what=f"{len(writer.ids)} entries at the node server")  # fmt: skip
        assert run.terminate() == 0
    ids = [entry["record"].get("auditID") for entry in entries]
    assert sorted(i for i in ids if i) == sorted(i for i in writer.ids if i != "long-line")
    assert len(ids) == len(writer.ids)  # the cut line arrives too (marked, without its auditID)
