"""Hostile peers.

* The receiver's decoder (pyforward.protocol.ServerDecoder) and the client's (ClientDecoder) are fuzzed with
  arbitrary bytes and with truncated and mutated valid messages, fed in random pieces: only ProtocolError may
  come out, never anything else.
* A real `pyforward receive` process gets gzip bombs, 4 GiB length prefixes, 200,000 tiny messages on one
  connection and slowloris connections: it does not crash, its memory stays bounded (VmRSS / VmHWM from /proc),
  and a good client on another connection still gets its acks.
* A real `pyforward run` faces receivers that answer garbage, ack unknown chunk ids, send a PONG with a wrong
  digest or with its own hostname: it logs it, retries, never takes a wrong answer for an ack, never sends data
  before the handshake succeeded, and ships everything once the receiver behaves.
"""

from __future__ import annotations

import functools
import gzip
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyforward.protocol import (
    ClientDecoder,
    EventTime,
    ProtocolError,
    Request,
    ServerDecoder,
    encode_ack,
    encode_compressed_packed_forward,
    encode_forward,
    encode_helo,
    encode_message,
    encode_packed_forward,
    encode_ping,
    encode_pong,
    gzip_compress,
    make_helo,
    make_ping,
    make_pong,
)
from tests.chaos.conftest import Figures
from tests.chaos.test_faults import SETTINGS, in_flight
from tests.chaos.tools import MODES, ScriptedReceiver, env_for, open_fds, proc_status, wrong_digest
from tests.harness import Harness, ReceiverProcess, assert_delivered, wait_for

pytestmark = pytest.mark.chaos

# ------------------------------------------------------------------------------------------------ decoder fuzzing


def _entries(n: int) -> bytes:
    return b"".join(
        msgpack.packb([EventTime(1_700_000_000 + i, i).to_ext(), {"auditID": f"id-{i}", "n": i}]) for i in range(n)
    )


def _valid_client_messages() -> list[bytes]:
    helo = make_helo(user_auth=True)
    ping = make_ping(helo, hostname="client", shared_key="k", username="u", password="p")
    opts = {"chunk": "Y2h1bmstaWQ=", "size": 3}
    return [
        encode_message("tag", EventTime(1_700_000_000, 5), {"auditID": "m", "x": [1, 2]}, opts),
        encode_forward("tag", [(EventTime(1_700_000_000, 1), {"a": 1}), (1_700_000_001, {"b": "c"})], opts),
        encode_packed_forward("tag", _entries(3), opts),
        encode_compressed_packed_forward("tag", gzip_compress(_entries(3)), {**opts, "compressed": "gzip"}),
        encode_compressed_packed_forward(
            "tag", gzip_compress(_entries(2)) + gzip_compress(_entries(1)), {**opts, "compressed": "gzip"}
        ),
        msgpack.packb(["tag", [[EventTime(1, 2).to_ext(), {"meta": 1}], {"a": 1}], {"x": 1}]),  # v1.5 Message
        msgpack.packb(None),
        encode_ping(ping),
    ]


def _valid_server_messages() -> list[bytes]:
    helo = make_helo(user_auth=True)
    ping = make_ping(helo, hostname="client", shared_key="k", username="u", password="p")
    pong = make_pong(ping, ok=True, reason="", nonce=helo.nonce, hostname="server", shared_key="k")
    return [encode_helo(helo), encode_pong(pong), encode_ack(b"Y2h1bmstaWQ="), msgpack.packb({"ack": "x"})]


CLIENT_MESSAGES = _valid_client_messages()
SERVER_MESSAGES = _valid_server_messages()


def _feed(decoder: ServerDecoder | ClientDecoder, data: bytes, cuts: list[int]) -> None:
    """Feed ``data`` in pieces at ``cuts``; anything but ProtocolError fails the test."""
    pieces, start = [], 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        pieces.append(data[start:cut])
        start = cut
    pieces.append(data[start:])
    try:
        for piece in pieces:
            events = decoder.feed(piece)
            for event in events:
                if isinstance(event, Request):
                    for entry in event.entries:  # what the receiver does next must not fail either
                        assert isinstance(entry.record, dict)
                        assert isinstance(entry.time, EventTime)
    except ProtocolError:
        with pytest.raises(ProtocolError):  # a failed decoder stays failed
            decoder.feed(b"\x90")


def _decoders() -> list[Callable[[], ServerDecoder]]:
    return [
        ServerDecoder,
        functools.partial(ServerDecoder, max_request_bytes=300, max_decompressed_bytes=600, max_entries=2),
    ]


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for position, value in edits:
        buf[position % len(buf)] = value
    return bytes(buf)


FUZZ_EXAMPLES = {"ci": 150, "long": 2000}


@pytest.mark.parametrize("mode", MODES)
def test_decoders_raise_only_protocol_error(figures: Figures, mode: str) -> None:
    examples = FUZZ_EXAMPLES[mode]
    tried = {"arbitrary": 0, "truncated": 0, "mutated": 0, "spliced": 0}
    fuzz = settings(max_examples=examples, deadline=None, database=None, derandomize=mode == "ci",
                    suppress_health_check=list(HealthCheck))  # fmt: skip
    cuts = st.lists(st.integers(0, 1 << 16), max_size=8)

    @fuzz
    @given(st.binary(max_size=2048), cuts, st.integers(0, 1))
    def arbitrary(data: bytes, at: list[int], which: int) -> None:
        tried["arbitrary"] += 1
        _feed(_decoders()[which](), data, at)
        _feed(ClientDecoder(), data, at)

    @fuzz
    @given(st.sampled_from(CLIENT_MESSAGES + SERVER_MESSAGES), st.integers(0, 4096), cuts, st.integers(0, 1))
    def truncated(message: bytes, length: int, at: list[int], which: int) -> None:
        tried["truncated"] += 1
        data = message[: length % (len(message) + 1)]
        _feed(_decoders()[which](), data, at)
        _feed(ClientDecoder(), data, at)

    edits = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=6)

    @fuzz
    @given(st.sampled_from(CLIENT_MESSAGES + SERVER_MESSAGES), edits, cuts, st.integers(0, 1))
    def mutated(message: bytes, changes: list[tuple[int, int]], at: list[int], which: int) -> None:
        tried["mutated"] += 1
        data = _mutate(message, changes)
        _feed(_decoders()[which](), data, at)
        _feed(ClientDecoder(), data, at)

    @fuzz
    @given(st.lists(st.sampled_from(CLIENT_MESSAGES + SERVER_MESSAGES), min_size=2, max_size=6), st.binary(max_size=8),
           edits, cuts)  # fmt: skip
    def spliced(messages: list[bytes], junk: bytes, changes: list[tuple[int, int]], at: list[int]) -> None:
        tried["spliced"] += 1
        data = _mutate(b"".join(messages[:1]) + junk + b"".join(messages[1:]), changes)
        _feed(ServerDecoder(), data, at)
        _feed(ClientDecoder(), data, at)

    for check in (arbitrary, truncated, mutated, spliced):
        check()
    figures.update(
        scenario="decoder fuzzing (hypothesis): arbitrary, truncated, mutated, spliced messages",
        group="hostile peers", inputs=sum(tried.values()),
        limits="only ProtocolError escaped ServerDecoder (default and tiny limits) and ClientDecoder; "
        + ", ".join(f"{k} {v}" for k, v in tried.items()),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ a real receiver


def rss(receiver: ReceiverProcess) -> int:
    return proc_status(receiver.pid, "VmRSS")


def connect(receiver: ReceiverProcess, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", receiver.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def closed_by_peer(sock: socket.socket, timeout: float = 20) -> bytes:
    """Read until the peer closes; returns what it sent. Fails when it keeps the connection open."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        raise AssertionError(f"the receiver kept the connection open for {timeout} s") from None
    except ConnectionResetError:
        pass
    return data


def good_client_acked(receiver: ReceiverProcess, tag: str = "good", timeout: float = 10) -> float:
    """One request with a chunk id on a new connection; returns the seconds until its ack."""
    started = time.monotonic()
    with connect(receiver, timeout) as sock:
        chunk = f"good-{time.monotonic_ns()}"
        sock.sendall(encode_message(tag, EventTime.now(), {"auditID": chunk}, {"chunk": chunk}))
        sock.settimeout(timeout)
        decoder = ClientDecoder()
        while True:
            piece = sock.recv(4096)
            if not piece:
                raise ConnectionResetError("the receiver closed the good client's connection")
            events = decoder.feed(piece)
            if events:
                assert events[0].chunk_id == chunk.encode()  # type: ignore[union-attr]
                return time.monotonic() - started


def good_client_retrying(receiver: ReceiverProcess, deadline: float = 20) -> tuple[float, int]:
    """A good client that retries (as every Forward client does) until acked: (seconds, attempts)."""
    started = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        try:
            good_client_acked(receiver, timeout=5)
            return time.monotonic() - started, attempts
        except OSError:
            if time.monotonic() - started > deadline:
                raise
            time.sleep(0.1)  # the client's reconnect backoff, not synchronisation


@functools.cache
def zeros_member() -> bytes:
    return gzip.compress(bytes(16 << 20), compresslevel=9)  # 16 MiB of zeros in ~16 KiB


def bomb(header: bytes, gib: int) -> bytes:
    """gzip members: ``header``, then ``gib`` GiB of zeros (64 members of 16 MiB each per GiB)."""
    return gzip.compress(header) + zeros_member() * (64 * gib)


@pytest.fixture
def limited_receiver(harness: Harness) -> ReceiverProcess:
    return harness.receiver("plain", extra_args=["--max-decompressed-bytes", "32Mi", "--max-connections", "256"])


def test_gzip_bombs_and_huge_length_prefixes(harness: Harness, figures: Figures) -> None:
    """Against `pyforward receive` (32 MiB decompression limit): gzip bombs that inflate to 1 GiB (zeros, and a
    declared 4 GiB binary followed by zeros), also 4 at once, and every msgpack container/string with a 4 GiB
    length prefix: each connection is closed without an ack, memory stays within the limits, and a good client is
    acked meanwhile and afterwards."""
    receiver = harness.receiver("plain", extra_args=["--max-decompressed-bytes", "32Mi"])
    assert good_client_acked(receiver) < 5
    baseline = rss(receiver)
    bombs = {
        "1 GiB of zeros": bomb(b"", 1),
        "declared 4 GiB bin, then zeros": bomb(b"\xc6\xff\xff\xff\xff", 1),
        "declared 4 GiB str, then zeros": bomb(b"\xdb\xff\xff\xff\xff", 1),
        "array32 of 4G entries, then zeros": bomb(b"\xdd\xff\xff\xff\xff", 1),
    }
    tried = 0
    for name, blob in bombs.items():
        with connect(receiver) as sock:
            message = encode_compressed_packed_forward("bomb", blob, {"compressed": "gzip", "chunk": "bomb"})
            assert len(message) < 2 << 20  # on the wire: small
            sock.sendall(message)
            answer = closed_by_peer(sock)
            assert answer == b"", f"{name}: the receiver answered {answer[:80]!r}"
            tried += 1
    # Four at once, and a good client while they inflate.
    socks = [connect(receiver) for _ in range(4)]
    blob = bombs["declared 4 GiB bin, then zeros"]
    message = encode_compressed_packed_forward("bomb", blob, {"compressed": "gzip", "chunk": "bomb"})
    senders = [threading.Thread(target=s.sendall, args=(message,)) for s in socks]
    for sender in senders:
        sender.start()
    good = good_client_acked(receiver)
    for sender, sock in zip(senders, socks, strict=True):
        sender.join(30)
        assert closed_by_peer(sock) == b""
        sock.close()
        tried += 1
    prefixes = {
        "bin32": b"\x93\xa3tag\xc6\xff\xff\xff\xff" + b"x" * 1000,
        "str32": b"\x93\xa3tag\xdb\xff\xff\xff\xff" + b"x" * 1000,
        "array32": b"\x93\xa3tag\xdd\xff\xff\xff\xff" + b"\x00" * 1000,
        "map32": b"\x94\xa3tag\x01\xdf\xff\xff\xff\xff" + b"\x00" * 1000,
        "ext32": b"\x93\xa3tag\xc9\xff\xff\xff\xff\x00" + b"x" * 1000,
        "outer array32": b"\xdd\xff\xff\xff\xff" + b"\xc0" * 1000,
        "outer bin32": b"\xc6\xff\xff\xff\xff" + b"x" * 1000,
    }
    for name, data in prefixes.items():
        with connect(receiver) as sock:
            sock.sendall(data)
            assert closed_by_peer(sock, 10) == b"", name
            tried += 1
    peak = proc_status(receiver.pid, "VmHWM")
    after = rss(receiver)
    assert good_client_acked(receiver) < 5
    assert receiver.alive
    # Four concurrent connections may each hold one decompression bound (32 MiB) plus a read buffer.
    assert peak < baseline + 4 * 2 * 32 * 1024 + 64 * 1024, f"peak VmHWM {peak} KiB (baseline {baseline} KiB)"
    written = receiver.received().refresh()
    assert all(key.startswith("good-") for key in written), f"a bomb was written: {written}"
    assert not receiver.received().other, "a bomb was written"
    figures.update(
        scenario="gzip bombs (1 GiB), 4 GiB length prefixes against `pyforward receive`",
        group="hostile peers", inputs=tried,
        limits=f"every one closed without an ack; good client acked in {good:.2f} s during 4 concurrent bombs; "
        f"VmRSS {baseline >> 10} MiB before, {after >> 10} MiB after, peak {peak >> 10} MiB "
        "(--max-decompressed-bytes 32Mi)",
    )  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_many_tiny_messages_on_one_connection(harness: Harness, figures: Figures, mode: str) -> None:
    """200,000 Message-mode requests (each with a chunk id) on one connection: every one acked, in order, while
    another client is still served; memory stays flat."""
    count = {"ci": 20_000, "long": 200_000}[mode]
    receiver = harness.receiver("plain")
    baseline = rss(receiver)
    now = EventTime(1_700_000_000, 0)
    payload = b"".join(encode_message("t", now, {"i": i}, {"chunk": f"c{i}"}) for i in range(count))
    acks = 0
    errors: list[BaseException] = []
    with connect(receiver) as sock:

        def send() -> None:
            try:
                sock.sendall(payload)
            except BaseException as exc:
                errors.append(exc)

        sender = threading.Thread(target=send)
        started = time.monotonic()
        sender.start()
        decoder = ClientDecoder()
        sock.settimeout(60)
        good = None
        while acks < count:
            piece = sock.recv(1 << 16)
            assert piece, f"closed after {acks} acks"
            for event in decoder.feed(piece):
                assert event.chunk_id == f"c{acks}".encode()  # type: ignore[union-attr]
                acks += 1
            if good is None and acks > count // 2:
                good = good_client_acked(receiver)
        seconds = time.monotonic() - started
        sender.join(30)
    assert not errors, errors
    peak = proc_status(receiver.pid, "VmHWM")
    output = receiver.received()
    wait_for(lambda: output.refresh() is not None and output.lines >= count + 1, 30, what="every record written")
    assert receiver.alive
    figures.update(
        scenario=f"{count:,} tiny messages on one connection",
        group="hostile peers", inputs=count,
        limits=f"all acked in order in {seconds:.1f} s ({count / seconds:,.0f}/s); another client acked in "
        f"{good or 0:.2f} s meanwhile; VmRSS {baseline >> 10} MiB before, peak {peak >> 10} MiB "
        f"({len(payload) / 1e6:.1f} MB sent)",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("cap", "attackers"),
    [
        pytest.param(256, 200, id="below-cap"),
        pytest.param(64, 200, id="beyond-cap"),
        pytest.param(256, 1000, id="beyond-cap-long", marks=[pytest.mark.slow, pytest.mark.timeout(600)]),
    ],
)
def test_slowloris(harness: Harness, figures: Figures, cap: int, attackers: int) -> None:
    """Idle and half-open connections (some send half a message and stall, some one byte) up to and beyond
    --max-connections: the receiver keeps serving a good client, and its memory and fds stay bounded."""
    receiver = harness.receiver("plain", extra_args=["--max-connections", str(cap), "--idle-timeout", "300"])
    baseline, fds_before = rss(receiver), open_fds(receiver.pid)
    socks: list[socket.socket] = []
    refused = 0
    try:
        for i in range(attackers):
            try:
                sock = connect(receiver, 5)
                if i % 3 == 1:
                    sock.sendall(b"\x94\xa3tag")  # half a message
                elif i % 3 == 2:
                    sock.sendall(b"\x93")  # one byte; more never comes
                socks.append(sock)
            except OSError:
                refused += 1
        goods = [good_client_retrying(receiver) for _ in range(5)]
        peak = proc_status(receiver.pid, "VmHWM")
        fds = open_fds(receiver.pid)
        assert receiver.alive
    finally:
        for sock in socks:
            sock.close()
    assert fds <= fds_before + cap + 16, f"{fds} fds open (cap {cap})"
    figures.update(
        scenario=f"slowloris: {attackers} idle / half-open connections, --max-connections {cap}",
        group="hostile peers", inputs=attackers,
        limits=f"5 good clients acked, the slowest after {max(t for t, _ in goods):.2f} s and "
        f"{max(n for _, n in goods)} attempts; {refused} attackers refused; fds {fds_before} -> {fds}; "
        f"VmRSS {baseline >> 10} MiB, peak {peak >> 10} MiB",
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ a hostile receiver


def _garbage(request: Request) -> bytes:
    return b"\xc1\xc1 not msgpack"


def _unknown_id(request: Request) -> bytes:
    assert request.chunk is not None
    return encode_ack(b"unknown-" + request.chunk)


def _map_not_ack(request: Request) -> bytes:
    return bytes(msgpack.packb({"nack": request.chunk}))


HOSTILE: dict[str, tuple[dict[str, Any], dict[str, object], str]] = {
    # name: (scripted receiver behaviour, run settings, the log line that must say what happened)
    "answers garbage": ({"answer": _garbage}, {}, r"malformed msgpack"),
    "acks unknown chunk ids": ({"answer": _unknown_id}, {}, r"ack for an unknown chunk id"),
    "answers a map that is no ack": ({"answer": _map_not_ack}, {}, r"unexpected map"),
    "sends a PONG with a wrong digest": (
        {"shared_key": "the-shared-key", "pong": wrong_digest}, {"shared_key": "the-shared-key"}, r"(?i)digest"
    ),
    "sends a PONG from our own hostname": (
        {"shared_key": "the-shared-key", "hostname": "pyforward-e2e"}, {"shared_key": "the-shared-key"},
        r"(?i)hostname",
    ),
    "has another shared key": (
        {"shared_key": "another-key"}, {"shared_key": "the-shared-key"}, r"(?i)digest",
    ),
}


@pytest.mark.parametrize("behaviour", list(HOSTILE))
def test_run_facing_a_hostile_receiver(harness: Harness, figures: Figures, behaviour: str) -> None:
    script, run_settings, logged = HOSTILE[behaviour]
    receiver = ScriptedReceiver(**script).start()
    try:
        writer = harness.audit_log()
        ids = writer.write(200)
        env = env_for(harness, port=receiver.port, ack_timeout=2, settings={**SETTINGS, **run_settings})
        run = harness.run(env)
        run.wait_until(lambda: receiver.connections >= 3, 60, what="two retries")
        failed = run.wait_log(r"connection to the receiver failed", level="warning")
        assert run.find_log(logged, level="warning"), f"no log line /{logged}/:\n{run.tail()}"
        assert not harness.checkpoint_path.exists(), "an answer that is no ack moved the checkpoint"
        if "shared_key" in script:
            assert receiver.requests == 0, f"data sent before the handshake succeeded: {receiver.describe()}"
        assert receiver.data_before_auth == 0
        # Heal: behave, and everything arrives.
        receiver.answer = None
        receiver.pong = None
        receiver.hostname = "scripted-receiver"
        receiver.shared_key = script.get("shared_key") and "the-shared-key"
        wait_for(lambda: receiver.has_all(ids), 60, what="delivery once the receiver behaves",
                 diagnostics=lambda: f"{receiver.describe()}\n{run.tail()}")  # fmt: skip
        assert run.terminate() == 0
        assert receiver.data_before_auth == 0
        bound = (receiver.connections - 1) * in_flight(writer.lines)
        result = assert_delivered(ids, receiver.snapshot(), max_duplicates=bound)
        assert not receiver.errors, receiver.errors
    finally:
        receiver.stop()
    figures.update(
        scenario=f"`pyforward run` vs a receiver that {behaviour}",
        group="hostile peers", faults=receiver.connections - 1, written=len(ids), lost=len(result.lost),
        duplicated=result.duplicated, bound=bound,
        limits=f"logged: {failed.string[:90]!r}; checkpoint untouched; no data before the handshake; shipped once "
        "healed",
    )  # fmt: skip

