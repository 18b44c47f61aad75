"""`pyforward demo`: the whole product in one command, on an embedded default.

A generated, rotating kube-apiserver audit log (lumberjack-style renames) is written while a real
`pyforward run` process ships it over mTLS with gzip and acks to a real `pyforward receive` process; at the
end every event is accounted for by its auditID: none lost, none duplicated.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from pyforward.auditgen import RotatingAuditLog, audit_id, generate_events
from pyforward.devcerts import write_dev_certs

_LISTENING = re.compile(rb"listening on (\S+):(\d+)")


def _start_receiver(workdir: Path, certs_dir: Path, output: Path) -> tuple[subprocess.Popen[bytes], int]:
    cmd = [
        sys.executable,
        "-m",
        "pyforward",
        "receive",
        "--bind",
        "127.0.0.1:0",
        "--tls-cert",
        str(certs_dir / "server.crt"),
        "--tls-key",
        str(certs_dir / "server.key"),
        "--tls-ca",
        str(certs_dir / "ca.crt"),
        "--output",
        str(output),
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=workdir)
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        match = _LISTENING.search(line)
        if match:
            # keep draining stderr so the receiver never blocks on a full pipe
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(match.group(2))
    proc.kill()
    raise RuntimeError("the embedded receiver did not start")


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def run_demo(*, events: int = 50_000, rotate_bytes: int = 8 << 20, keep: Path | None = None) -> int:
    with contextlib.ExitStack() as stack:
        if keep is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pyforward-demo-")))
        else:
            workdir = keep
            workdir.mkdir(parents=True, exist_ok=True)
        certs = write_dev_certs(workdir / "certs")
        logdir = workdir / "auditlog"
        logdir.mkdir(exist_ok=True)
        output = workdir / "received.jsonl"
        print(
            f"demo: writing {events:,} audit events to {logdir}/audit.log, rotating every "
            f"{rotate_bytes / 1e6:.1f} MB; shipping over mTLS + gzip + acks",
            flush=True,
        )
        receiver, port = _start_receiver(workdir, certs.ca.parent, output)
        stack.callback(_stop, receiver)
        env = dict(os.environ)
        env.update(
            {
                "PYFORWARD_LOG_PATH": str(logdir / "audit.log"),
                "PYFORWARD_HOST": "127.0.0.1",
                "PYFORWARD_PORT": str(port),
                "PYFORWARD_TLS": "true",
                "PYFORWARD_TLS_CA_FILE": str(certs.ca),
                "PYFORWARD_TLS_CERT_FILE": str(certs.client_cert),
                "PYFORWARD_TLS_KEY_FILE": str(certs.client_key),
                "PYFORWARD_TLS_SERVER_NAME": "localhost",
                "PYFORWARD_LOG_FORMAT": "text",
                "PYFORWARD_LOG_LEVEL": "warning",
            }
        )
        started = time.monotonic()
        shipper = subprocess.Popen([sys.executable, "-m", "pyforward", "run"], env=env, cwd=workdir)
        stack.callback(_stop, shipper)
        audit_log = RotatingAuditLog(logdir / "audit.log", max_bytes=rotate_bytes)
        audit_log.write_many(generate_events(events, seed=42, id_prefix="demo-"))
        audit_log.close()
        written = time.monotonic() - started
        deadline = time.monotonic() + 60 + events / 2000
        arrived = 0
        while time.monotonic() < deadline and shipper.poll() is None:
            arrived = _count_lines(output)
            if arrived >= events:
                break
            time.sleep(0.1)  # a progress poll of the output file, not synchronisation between parts
        elapsed = time.monotonic() - started
        code = _stop(shipper)
        ids = Counter(audit_id(line) for line in output.read_bytes().splitlines()) if output.exists() else Counter()
        expected = {audit_id(line) for line in generate_events(events, seed=42, id_prefix="demo-")}
        lost = len(expected - ids.keys())
        duplicated = sum(n - 1 for n in ids.values() if n > 1)
        print(
            f"demo: {events:,} events written in {written:.1f}s with {audit_log.rotations} rotation(s); "
            f"{len(ids):,} arrived in {elapsed:.1f}s ({len(ids) / elapsed:,.0f} events/s end to end); "
            f"lost {lost}, duplicated {duplicated}; pyforward run exited {code}"
        )
        if lost or duplicated or code != 0:
            print("demo: FAILED", file=sys.stderr)
            return 1
        print("demo: OK, every event arrived exactly once")
        return 0


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
