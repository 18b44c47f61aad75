"""Faults on the path: `pyforward run` SIGKILLed, the receiver killed, receivers that misbehave, the proxy killed,
the network path stalled. Every scenario writes events with unique auditIDs, checks by auditID that each one
arrived at least once, and bounds the duplicates by what can have been in flight at each fault:

    in flight at one fault <= window chunks x chunk_max_records records

(the client never has more than ``window`` chunks unacked on a connection and re-sends only those on the next one;
chunk_max_records is a hard cap since the chunk is cut inside a read batch, test_bad_input.py::
test_chunk_max_records_is_a_hard_cap). For SIGKILL of `pyforward run` what a restart sends again is bounded by the
in-flight budget instead, which is freed only once a checkpoint covering the chunk was written:

    sent again after one kill <= max_inflight_bytes // shortest line
"""

from __future__ import annotations

import functools
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.chaos.conftest import Figures
from tests.chaos.tools import MODES, Relay, ScriptedReceiver, at_least, env_for, proc_status
from tests.harness import (
    AuditWriter,
    Harness,
    RunProcess,
    assert_delivered,
    checkpoint_doc,
    free_port,
    try_metrics,
    wait_for,
)
from tests.proxies import proxies_at

WINDOW = 4
RECORDS = 25
#: Small chunks and window: many chunks, acks, retries and checkpoint writes per scenario.
SETTINGS = {
    "chunk_max_bytes": 32 << 10,
    "chunk_max_records": RECORDS,
    "window": WINDOW,
    "max_inflight_bytes": 128 << 10,
    "max_line_bytes": 64 << 10,
}


def in_flight(lines: list[bytes]) -> int:
    """Events that one fault can make the client send again (module doc), for the lines a test wrote: the window's
    chunks, each at most chunk_max_records records, and at most (chunk_max_bytes + one line) of source."""
    shortest = min(len(line) for line in lines)
    longest = max(len(line) for line in lines)
    return WINDOW * min(RECORDS, (int(SETTINGS["chunk_max_bytes"]) + longest) // shortest)


def seed_from_env() -> int:
    return int(os.environ.get("PYFORWARD_TEST_SEED", random.randrange(1 << 30)))


class BackgroundWriter:
    """Writes bursts of events (rotating) in a thread until stopped: the log grows while faults happen."""

    def __init__(self, writer: AuditWriter, *, burst: tuple[int, int], pause: float, seed: int) -> None:
        self.writer = writer
        self.burst = burst
        self.pause = pause
        self.rng = random.Random(seed)
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.writer.write(self.rng.randrange(*self.burst))
                self._stop.wait(self.pause)  # pacing of the writer, not synchronisation
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> BackgroundWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self.errors, self.errors


def budget_events(lines: list[bytes]) -> int:
    """Most events a restart after a crash can send again: max_inflight_bytes of source lines."""
    return int(SETTINGS["max_inflight_bytes"]) // min(len(line) for line in lines)


def metric(bind: str, name: str) -> float:
    return try_metrics(bind).get(name, 0.0)


# ------------------------------------------------------------------------------------------------ pyforward run


@pytest.mark.chaos
@pytest.mark.parametrize("mode", MODES)
def test_sigkill_run_20_times_during_one_rotating_stream(harness: Harness, figures: Figures, mode: str) -> None:
    """SIGKILL `pyforward run` 20 times at random moments (before it connected, mid-chunk, mid-checkpoint write)
    while the log is written and rotated. At every kill the checkpoint on disk covers only events the receiver
    has, and the events the receiver has beyond it fit in max_inflight_bytes (the in-flight budget is freed only once
    a checkpoint covering the chunk was written: docs/architecture.md); after the last restart every event is there,
    and the duplicates stay within kills x max_inflight_bytes of events."""
    kills = 20
    rotate, burst, progress_max, compress = {
        "ci": (256 << 10, (10, 40), 300, False),
        "long": (4 << 20, (100, 300), 4000, True),
    }[mode]
    seed = seed_from_env()
    rng = random.Random(seed)
    receiver = harness.receiver("plain")
    writer = harness.audit_log(max_bytes=rotate, compress=compress)
    run = harness.run(env_for(harness, receiver, settings=SETTINGS), start=False)
    output = receiver.received()

    def arrived(count: int) -> bool:
        return len(output.refresh()) >= count

    beyond_checkpoint: list[int] = []
    moments: list[str] = []
    with BackgroundWriter(writer, burst=burst, pause=0.05, seed=seed + 1):
        for kill in range(kills):
            run.start()
            moment = rng.choice(["at once", "after start", "progress", "progress", "progress"])
            if moment == "after start":
                run.wait_log(r"^shipping ")
            elif moment == "progress":
                more = rng.randrange(1, progress_max)
                run.wait_until(functools.partial(arrived, len(output.refresh()) + more), 120,
                               what=f"kill {kill}: {more} more events")  # fmt: skip
                moment = f"+{more} events"
            moments.append(moment)
            assert run.kill() == -signal.SIGKILL, f"kill {kill} ({moment}): it had exited already\n{run.tail()}"
            # What the restart resumes from: it may only cover events the receiver has (moves only on ack).
            received = set(output.refresh())
            doc = checkpoint_doc(harness.checkpoint_path)
            covered = writer.events_covered(doc) if doc is not None else 0
            missing = [i for i in writer.ids[:covered] if i not in received]
            assert not missing, f"kill {kill}: the checkpoint covers {len(missing)} events never received"
            beyond = len(received - set(writer.ids[:covered]))
            budget = budget_events(writer.lines)
            assert beyond <= budget, f"kill {kill}: the receiver has {beyond} events beyond the checkpoint (> {budget})"
            beyond_checkpoint.append(beyond)
    run.start()
    harness.wait_delivered(writer.ids, output, run=run, timeout=300)
    assert run.terminate() == 0
    per_fault = budget_events(writer.lines)
    bound = kills * per_fault
    result = assert_delivered(
        writer.ids, output.refresh(), max_duplicates=bound,
        context=f"seed {seed}, {kills} kills ({moments}), {writer.rotations} rotations",
    )  # fmt: skip
    figures.update(
        scenario="SIGKILL of `pyforward run` at random moments, log rotating",
        group="faults",
        faults=kills,
        written=len(writer.ids),
        lost=len(result.lost),
        duplicated=result.duplicated,
        bound=bound,
        notes=f"{writer.rotations} rotations every {rotate >> 10} KiB{' (gzip backups)' if compress else ''}; "
        f"bound = {kills} kills x {per_fault} events (max_inflight_bytes 128 KiB / shortest line); events beyond the "
        f"checkpoint on disk at a kill: at most {max(beyond_checkpoint)}, {sum(beyond_checkpoint)} in all; seed {seed}",
    )


# ------------------------------------------------------------------------------------------------ the receiver


@pytest.mark.chaos
@pytest.mark.parametrize("mode", MODES)
def test_receiver_killed_and_restarted_repeatedly(harness: Harness, figures: Figures, mode: str) -> None:
    """`pyforward receive` is killed (SIGKILL, and SIGTERM every third time) and restarted on its port while
    `pyforward run` ships a rotating log: nothing is lost, and each kill costs at most the window in duplicates
    (a restarted receiver has forgotten the chunk ids it acked)."""
    kills, burst, progress_max = {"ci": (4, (10, 40), 300), "long": (25, (50, 150), 3000)}[mode]
    seed = seed_from_env()
    rng = random.Random(seed)
    receiver = harness.receiver("mtls")
    writer = harness.audit_log(max_bytes=256 << 10)
    run = harness.run(env_for(harness, receiver, settings=SETTINGS))
    output = receiver.received()
    with BackgroundWriter(writer, burst=burst, pause=0.05, seed=seed + 1):
        for kill in range(kills):
            more = rng.randrange(1, progress_max)
            target = len(output.refresh()) + more
            run.wait_until(at_least(lambda: len(output.refresh()), target), 60, what=f"kill {kill}: +{more} events")
            sig = signal.SIGTERM if kill % 3 == 2 else signal.SIGKILL
            code = receiver.stop(sig)
            assert code in (0, -signal.SIGKILL), f"receiver exit code {code}"
            receiver.start()
            output.recount()  # (its start may have cut the output back: receiver/recovery.py)
    harness.wait_delivered(writer.ids, output, run=run, timeout=300)
    assert run.terminate() == 0
    counts = output.recount()
    assert not output.other, f"receiver output has lines without an auditID: {output.other[:3]}"
    per_fault = in_flight(writer.lines)
    bound = kills * per_fault
    result = assert_delivered(writer.ids, counts, max_duplicates=bound, context=f"seed {seed}, {kills} kills")
    figures.update(
        scenario="receiver killed (SIGKILL, SIGTERM) and restarted",
        group="faults",
        faults=kills,
        written=len(writer.ids),
        lost=len(result.lost),
        duplicated=result.duplicated,
        bound=bound,
        notes=f"mTLS; bound = {kills} kills x {per_fault} in flight (window {WINDOW} chunks); "
        f"seed {seed}",
    )


def scripted_env(harness: Harness, receiver: ScriptedReceiver, **settings: object) -> dict[str, str]:
    return env_for(harness, port=receiver.port, settings={**SETTINGS, **settings})


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedReceiver]]:
    """Start scripted receivers (keyword arguments of ScriptedReceiver); all stopped in teardown."""
    started: list[ScriptedReceiver] = []

    def make(**script: Any) -> ScriptedReceiver:
        receiver = ScriptedReceiver(**script).start()
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        receiver.stop()


def wait_received(
    harness: Harness, receiver: ScriptedReceiver, ids: list[str], run: RunProcess, timeout: float
) -> None:
    def done() -> bool:
        run.check_alive()
        return receiver.has_all(ids)

    wait_for(done, timeout, what=f"{len(ids)} events at the scripted receiver",
             diagnostics=lambda: f"{receiver.describe()}\n{harness.describe()}")  # fmt: skip


@pytest.mark.chaos
@pytest.mark.parametrize("mode", MODES)
def test_receiver_closing_before_every_nth_ack(
    harness: Harness, figures: Figures, scripted: Callable[..., ScriptedReceiver], mode: str
) -> None:
    """Every 5th request, the receiver closes the connection instead of acking (fluentd does that on any error):
    the client reconnects and re-sends; everything arrives, duplicates <= faults x window x records."""
    events = {"ci": 2500, "long": 25000}[mode]
    receiver = scripted(close_every=5)
    writer = harness.audit_log(max_bytes=256 << 10)
    ids = writer.write(events)
    run = harness.run(scripted_env(harness, receiver))
    wait_received(harness, receiver, ids, run, 120)
    assert run.terminate() == 0
    faults = receiver.closed_before_ack
    assert faults >= events // RECORDS // 5 - 1
    assert receiver.max_unacked <= WINDOW, receiver.describe()
    assert not receiver.errors, receiver.errors
    # Only a new connection re-sends, and only the window.
    bound = (receiver.connections - 1) * in_flight(writer.lines)
    result = assert_delivered(ids, receiver.snapshot(), max_duplicates=bound, context=receiver.describe())
    figures.update(
        scenario="receiver closes the connection before acking every 5th chunk",
        group="faults", faults=faults, written=len(ids), lost=len(result.lost), duplicated=result.duplicated,
        bound=bound, notes=f"{receiver.connections} connections; bound = reconnects x {in_flight(writer.lines)} "
        "(each re-sends at most the window)",
    )  # fmt: skip


@pytest.mark.chaos
@pytest.mark.parametrize("mode", MODES)
def test_receiver_that_never_acks(
    harness: Harness, figures: Figures, scripted: Callable[..., ScriptedReceiver], mode: str
) -> None:
    """A receiver that takes the data and never acks: the client keeps at most the window on the wire, times out
    (PYFORWARD_ACK_TIMEOUT), reconnects and re-sends the same chunks; the checkpoint does not move. Once the
    receiver acks again, everything arrives."""
    events, timeouts = {"ci": (400, 3), "long": (4000, 10)}[mode]
    receiver = scripted(ack=False)
    writer = harness.audit_log()
    ids = writer.write(events)
    run = harness.run(scripted_env(harness, receiver, ack_timeout=0.5))
    run.wait_until(lambda: receiver.connections > timeouts, 60, what=f"{timeouts} ack timeouts and reconnects")
    assert run.find_log(r"no ack within 0\.5s", level="warning"), run.tail()
    assert receiver.max_unacked <= WINDOW, receiver.describe()
    assert not harness.checkpoint_path.exists(), "the checkpoint moved without an ack"
    receiver.ack = True  # heal
    wait_received(harness, receiver, ids, run, 120)
    wait_for(harness.checkpoint_path.exists, 30, what="the checkpoint once acks flow")
    assert run.terminate() == 0
    faults = receiver.connections - 1  # ack timeouts (and the one after the heal, for what it never acked)
    bound = faults * in_flight(writer.lines)  # only a new connection re-sends, and only the window
    result = assert_delivered(ids, receiver.snapshot(), max_duplicates=bound, context=receiver.describe())
    figures.update(
        scenario="receiver never acks (ack timeout 0.5 s), then heals",
        group="faults", faults=faults, written=len(ids), lost=len(result.lost), duplicated=result.duplicated,
        bound=bound, notes=f"{receiver.connections} connections; never more than {receiver.max_unacked} chunks "
        f"unacked (window {WINDOW}); checkpoint unchanged while nothing was acked",
    )  # fmt: skip


@pytest.mark.chaos
@pytest.mark.parametrize("mode", MODES)
def test_receiver_that_acks_slowly(
    harness: Harness, figures: Figures, scripted: Callable[..., ScriptedReceiver], mode: str
) -> None:
    """Acks that take 50 ms each (well within the ack timeout): slower, but no reconnect and no duplicate."""
    events = {"ci": 500, "long": 5000}[mode]
    receiver = scripted(ack_delay=0.05)
    writer = harness.audit_log()
    ids = writer.write(events)
    run = harness.run(scripted_env(harness, receiver, ack_timeout=5))
    wait_received(harness, receiver, ids, run, 120)
    wait_for(lambda: receiver.acks >= receiver.requests, 30, what="the last acks")
    assert run.terminate() == 0
    assert receiver.connections == 1, receiver.describe()
    result = assert_delivered(ids, receiver.snapshot(), max_duplicates=0, context=receiver.describe())
    figures.update(
        scenario="receiver acks slowly (50 ms per chunk, ack timeout 5 s)",
        group="faults", faults=0, written=len(ids), lost=len(result.lost), duplicated=result.duplicated, bound=0,
        notes=f"{receiver.requests} chunks on one connection; window {WINDOW} kept the pipe full",
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ the path


@pytest.mark.chaos
@pytest.mark.proxy
@pytest.mark.parametrize("mode", MODES)
def test_proxy_killed_mid_stream(harness: Harness, figures: Figures, mode: str) -> None:
    """tinyproxy (HTTP CONNECT, TLS to the receiver inside the tunnel) is SIGKILLed mid-stream and restarted on
    its port, repeatedly: `pyforward run` reconnects through it and loses nothing."""
    kills, burst = {"ci": (2, (10, 40)), "long": (12, (50, 150))}[mode]
    receiver = harness.receiver("mtls")
    writer = harness.audit_log(max_bytes=256 << 10)
    output = receiver.received()
    rng = random.Random(seed_from_env())
    with proxies_at(harness.root / "proxies") as proxies:
        proxy = proxies.tinyproxy([receiver.port])
        bind = f"127.0.0.1:{free_port()}"
        env = env_for(harness, receiver, proxy_host="127.0.0.1", proxy_port=proxy.port, metrics_bind=bind,
                      settings=SETTINGS)  # fmt: skip
        run = harness.run(env)
        with BackgroundWriter(writer, burst=burst, pause=0.05, seed=1):
            for kill in range(kills):
                target = len(output.refresh()) + rng.randrange(50, 400)
                run.wait_until(at_least(lambda: len(output.refresh()), target), 60, what=f"kill {kill}: progress")
                reconnects = metric(bind, "pyforward_reconnects_total")
                proxy.kill()
                proxy.start()
                # The connection through the dead proxy broke: the client is connected again, through the new one.
                run.wait_until(at_least(lambda: metric(bind, "pyforward_reconnects_total"), reconnects + 1), 60,
                               what=f"kill {kill}: a reconnect through the restarted proxy")  # fmt: skip
        harness.wait_delivered(writer.ids, output, run=run, timeout=120)
        assert proxy.starts == kills + 1
    assert run.terminate() == 0
    bound = kills * in_flight(writer.lines)
    result = assert_delivered(writer.ids, output.refresh(), max_duplicates=bound)
    figures.update(
        scenario="HTTP CONNECT proxy (tinyproxy) SIGKILLed mid-stream and restarted",
        group="faults", faults=kills, written=len(writer.ids), lost=len(result.lost), duplicated=result.duplicated,
        bound=bound, notes="mTLS to the receiver inside the CONNECT tunnel",
    )  # fmt: skip


@pytest.mark.chaos
@pytest.mark.parametrize("mode", MODES)
def test_stalled_network_path(harness: Harness, figures: Figures, mode: str) -> None:
    """A relay on the path stops forwarding bytes but keeps the connections open (a black-holed path): the client
    notices through its ack timeout, reconnects (into the same stall), keeps memory flat, and ships everything
    once the path flows again."""
    stalls, burst = {"ci": (2, (10, 40)), "long": (6, (50, 150))}[mode]
    receiver = harness.receiver("plain")
    relay = Relay(receiver.port).start()
    writer = harness.audit_log(max_bytes=256 << 10)
    run = harness.run(env_for(harness, port=relay.port, ack_timeout=0.5, settings=SETTINGS))
    output = receiver.received()
    rss_before = 0
    try:
        with BackgroundWriter(writer, burst=burst, pause=0.05, seed=2):
            for stall in range(stalls):
                target = len(output.refresh()) + 200
                run.wait_until(at_least(lambda: len(output.refresh()), target), 60, what=f"stall {stall}: progress")
                if not rss_before:
                    rss_before = proc_status(run.pid, "VmRSS")
                relay.pause()
                connections = relay.connections
                # Stalled: at least two ack timeouts, i.e. a reconnect into the stall and a second timeout there.
                run.wait_until(at_least(lambda: relay.connections, connections + 2), 60,
                               what="two ack timeouts in the stall")  # fmt: skip
                relay.resume()
        harness.wait_delivered(writer.ids, output, run=run, timeout=120)
        rss_after = proc_status(run.pid, "VmRSS")
    finally:
        relay.stop()
    assert run.terminate() == 0
    per_fault = in_flight(writer.lines)
    bound = relay.connections * per_fault
    result = assert_delivered(writer.ids, output.refresh(), max_duplicates=bound)
    assert rss_after < rss_before + 64 * 1024, f"VmRSS grew from {rss_before} to {rss_after} KiB"
    figures.update(
        scenario="network path stalled (bytes held, connections open), then flowing again",
        group="faults", faults=stalls, written=len(writer.ids), lost=len(result.lost), duplicated=result.duplicated,
        bound=bound, notes=f"ack timeout 0.5 s; {relay.connections} connections through the relay; bound = connections"
        f" x {per_fault}; VmRSS {rss_before >> 10} -> {rss_after >> 10} MiB",
    )  # fmt: skip
