"""The generator: templates filled with auditID, timestamps, resourceVersion and a name suffix; fixed seed =>
identical bytes. And `audit_id`, which finds an event's auditID again in a line."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Final

from pyforward.auditgen.shapes import _suffixes, _templates

#: Timestamp of the first event when ``start`` is not given (fixed so that output depends on the seed only).
DEFAULT_START: Final = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
#: Events per second of log time when ``rate_per_second`` is not given.
DEFAULT_RATE: Final = 1000.0
#: Every RR_EVERY-th event is a RequestResponse-level event with request and response objects.
RR_EVERY: Final = 50


def generate_events(
    count: int,
    *,
    seed: int = 0,
    start: datetime | None = None,
    rate_per_second: float | None = None,
    id_prefix: str = "",
) -> Iterator[bytes]:
    """Yield ``count`` audit events as JSON lines (each ending in ``b"\\n"``).

    Deterministic in (seed, start, rate_per_second, id_prefix): the same arguments give the same bytes,
    and a shorter run is a prefix of a longer one. ``auditID`` is ``id_prefix`` + a UUID-like string
    whose last group is the event index (unique within a run); timestamps start at ``start`` (default
    :data:`DEFAULT_START`; naive means UTC), ``rate_per_second`` apart (default :data:`DEFAULT_RATE`),
    both ``requestReceivedTimestamp`` and ``stageTimestamp`` strictly increasing.
    """
    if count < 0:
        raise ValueError(f"auditgen: count must be >= 0, got {count}")
    rate = DEFAULT_RATE if rate_per_second is None else float(rate_per_second)
    if not rate > 0:
        raise ValueError(f"auditgen: rate_per_second must be > 0, got {rate_per_second}")
    if start is None:
        start = DEFAULT_START
    elif start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    start_us = (start - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    step_us = 1_000_000.0 / rate
    metadata, request_response = _templates()
    n_meta = len(metadata)
    n_rr = len(request_response)
    suffixes = _suffixes()
    prefix = id_prefix.encode()
    rng = random.Random(seed)
    rand = rng.random
    bits = rng.getrandbits
    last_second = -1
    second_prefix = b""
    prev_rts = start_us - 1
    prev_sts = start_us - 1
    for index in range(count):
        r = bits(64)
        aid = b"%s%08x-%04x-4%03x-%04x-%012x" % (
            prefix,
            r >> 32,
            (r >> 16) & 0xFFFF,
            (r >> 4) & 0xFFF,
            0x8000 | (r & 0xF) << 8 | (index >> 48) & 0xFF,
            index & 0xFFFFFFFFFFFF,
        )
        rts = start_us + int(index * step_us)
        if rts <= prev_rts:
            rts = prev_rts + 1
        # Latency: mostly sub-millisecond, a long tail to tens of milliseconds.
        sts = rts + 150 + int(rand() ** 4 * 40_000)
        if sts <= prev_sts:
            sts = prev_sts + 1
        prev_rts = rts
        prev_sts = sts
        # Timestamps: "YYYY-MM-DDTHH:MM:SS" changes once per second of log time; format it only then.
        second, micros = divmod(rts, 1_000_000)
        if second != last_second:
            last_second = second
            second_prefix = _second_prefix(second)
        rts_text = b"%s.%06dZ" % (second_prefix, micros)
        second, micros = divmod(sts, 1_000_000)
        if second != last_second:
            last_second = second
            second_prefix = _second_prefix(second)
        sts_text = b"%s.%06dZ" % (second_prefix, micros)
        if index % RR_EVERY == RR_EVERY - 1:
            template = request_response[int(rand() * n_rr)]
        else:
            template = metadata[int(rand() * n_meta)]
        yield template % {
            b"aid": aid,
            b"rts": rts_text,
            b"sts": sts_text,
            b"rv": b"%d" % (48_000_000 + index * 7 + bits(3)),
            b"sfx": suffixes[bits(12)],
        }


def _second_prefix(second: int) -> bytes:
    return (datetime(1970, 1, 1) + timedelta(seconds=second)).strftime("%Y-%m-%dT%H:%M:%S").encode()


_AUDIT_ID_KEY: Final = b'"auditID":"'


def audit_id(line: bytes) -> str:
    """The ``auditID`` of one audit event line, found by byte search (no JSON parse).

    Raises ValueError when the line has no auditID. Relies on the ID needing no JSON escaping (true for
    UUIDs and for the generator's prefixes); the first top-level-looking occurrence wins.
    """
    start = line.find(_AUDIT_ID_KEY)
    if start < 0:
        raise ValueError(f"auditgen: no auditID in line {line[:80]!r}")
    start += len(_AUDIT_ID_KEY)
    end = line.find(b'"', start)
    if end < 0:
        raise ValueError(f"auditgen: unterminated auditID in line {line[:80]!r}")
    return line[start:end].decode("utf-8")
