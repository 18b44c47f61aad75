"""`pyforward send` -> `pyforward receive` at volume (the "done when" of the Forward protocol issue), and
`pyforward demo`: real processes, mTLS, gzip, acks; every event accounted for by auditID."""

from __future__ import annotations

import subprocess
import sys

from pyforward.auditgen import audit_id, generate_events
from tests.harness import Harness, assert_delivered

PYTHON = sys.executable


def test_send_100k_lines_over_mtls_with_gzip_and_acks(harness: Harness) -> None:
    """100,000 JSON lines of about 1 KB, over mTLS, CompressedPackedForward, every chunk acked: none lost, none
    duplicated, in order."""
    count = 100_000
    source = harness.root / "events.jsonl"
    with source.open("wb") as f:
        for start in range(0, count, 10_000):
            f.write(b"".join(generate_events(10_000, seed=start, id_prefix=f"s{start}-")))
    size = source.stat().st_size
    assert 0.8 < size / count / 1000 < 1.3  # about 1 KB per line
    receiver = harness.receiver("mtls")
    certs = harness.certs
    result = subprocess.run(
        [
            PYTHON, "-m", "pyforward", "send", str(source), "--gzip", "--no-progress", "--timeout", "90",
            "--host", "127.0.0.1", "--port", str(receiver.port), "--tls", "--tls-server-name", "localhost",
            "--tls-ca", str(certs.ca), "--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert f"{count} record(s)" in result.stderr.decode()
    output = receiver.received()
    received = output.refresh()
    assert output.lines == count
    assert not output.other
    expected = [audit_id(line) for line in source.read_bytes().splitlines()]
    assert_delivered(expected, received, context="pyforward send -> pyforward receive")
    assert receiver.stop() == 0


def test_demo_exits_0(harness: Harness) -> None:
    result = subprocess.run(
        [PYTHON, "-m", "pyforward", "demo", "--events", "3000"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        cwd=harness.root,
        timeout=110,
        check=False,
    )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()[-2000:]
    assert "lost 0, duplicated 0" in out
    assert "OK, every event arrived exactly once" in out
