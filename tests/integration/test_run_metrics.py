"""Operations end to end: /metrics scraped during a real `pyforward run` matches what was sent; /healthz and
/readyz answer as specified in each state; the JSON log lines parse and carry no secret."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from tests.harness import Harness, assert_delivered, free_port, try_metrics, wait_for


def probe(bind: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{bind}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_match_what_was_shipped_and_probes_follow_the_state(harness: Harness) -> None:
    receiver = harness.receiver("mtls")
    bind = f"127.0.0.1:{free_port()}"
    writer = harness.audit_log(max_bytes=400_000)
    ids = writer.write(3000)
    env = harness.run_env(receiver, metrics_bind=bind, ready_max_backlog_bytes=1000)
    run = harness.run(env)
    counts = harness.wait_delivered(ids, receiver.received(), run=run)
    assert_delivered(ids, counts)
    size = sum(len(line) for line in writer.lines)

    def settled() -> dict[str, float] | None:
        values = try_metrics(bind)
        return values if values.get("pyforward_records_acked_total") == len(ids) else None

    values = wait_for(settled, 30, what="records_acked_total to reach the events written")
    assert values["pyforward_lines_read_total"] == len(ids)
    assert values["pyforward_read_bytes_total"] == size
    assert values["pyforward_records_sent_total"] == len(ids)
    assert values["pyforward_chunks_acked_total"] == values["pyforward_chunks_sent_total"]
    assert values["pyforward_connected"] == 1
    assert values["pyforward_ack_latency_seconds_count"] == values["pyforward_chunks_acked_total"]
    assert values['pyforward_parse_errors_total{kind="json"}'] == 0
    assert 'pyforward_certificate_expiry_seconds{cert="receiver"}' in values
    assert probe(bind, "/healthz")[0] == 200
    assert probe(bind, "/readyz")[0] == 200  # connected

    # The receiver goes away and a backlog builds up: not connected, backlog over the threshold -> not ready.
    receiver.stop()
    more = writer.write(200)
    wait_for(lambda: probe(bind, "/readyz")[0] == 503, 30, what="/readyz to turn 503")
    _, body = probe(bind, "/readyz")
    assert "backlog" in body or "connected" in body
    assert probe(bind, "/healthz")[0] == 200  # alive all the same: the event loop answers
    assert try_metrics(bind)["pyforward_connected"] == 0

    # Back: everything arrives, ready again.
    receiver.start()
    env_port = receiver.port
    assert env_port
    counts = harness.wait_delivered(ids + more, receiver.received(), run=run)
    assert_delivered(ids + more, counts)
    wait_for(lambda: probe(bind, "/readyz")[0] == 200, 30, what="/readyz to turn 200 again")
    run.terminate()


def test_json_logs_carry_no_secret(harness: Harness) -> None:
    secret = "sup3r-s3cret-shared-key"
    receiver = harness.receiver("plain", extra_args=["--shared-key", "a-different-key"])
    writer = harness.audit_log()
    writer.write(10)
    env = harness.run_env(receiver, shared_key=secret, password="hunter2-password", username="alice",
                          log_level="debug")
    run = harness.run(env)
    # The handshake fails (the keys differ): the failure is logged, and retried.
    run.wait_log("shared.?key|handshake|refused", level="warning", timeout=30)
    run.terminate()
    text = run.stderr_text(all_runs=True)
    assert secret not in text
    assert "hunter2-password" not in text
    for line in text.splitlines():
        if line.strip():
            entry = json.loads(line)
            assert {"ts", "level", "logger", "msg"} <= entry.keys()
