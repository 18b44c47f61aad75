"""Logging: JSON lines, text on a terminal, secrets redacted everywhere, repeated messages rate-limited."""

from __future__ import annotations

import io
import logging
import secrets as pysecrets
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import orjson
import pytest

from pyforward.logs import REDACTED, add_secret, parse_level, redact, setup_logging


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    logging.captureWarnings(False)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def fresh_secret() -> str:
    # Unique per test: the secret registry is process-wide.
    return "s3cr3t-" + pysecrets.token_hex(8)


def test_json_lines_have_the_documented_keys() -> None:
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    logging.getLogger("pyforward.client").info(
        "connected to %s:%d", "audittailer", 24224, extra={"peer": "10.0.0.1:24224", "attempt": 3}
    )
    [line] = lines(out)
    assert line["level"] == "info"
    assert line["logger"] == "pyforward.client"
    assert line["msg"] == "connected to audittailer:24224"
    assert line["peer"] == "10.0.0.1:24224"
    assert line["attempt"] == 3
    assert list(line)[:4] == ["ts", "level", "logger", "msg"]
    ts = datetime.fromisoformat(line["ts"])
    assert line["ts"].endswith("Z")
    assert ts.utcoffset() is not None
    assert ts.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_extra_fields_cannot_shadow_core_keys_and_odd_values_still_serialise() -> None:
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    logging.getLogger("pyforward.x").warning("w", extra={"level": "fake", "path": object(), "big": 2**80})
    [line] = lines(out)
    assert line["level"] == "warning"
    assert line["extra_level"] == "fake"
    assert line["path"].startswith("<object object")
    assert str(2**80) in line["big"]


def test_exception_is_one_json_line_with_traceback() -> None:
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    try:
        raise ConnectionResetError("peer reset")
    except ConnectionResetError:
        logging.getLogger("pyforward.client").exception("connection lost")
    assert len(out.getvalue().splitlines()) == 1
    [line] = lines(out)
    assert line["level"] == "error"
    assert "ConnectionResetError: peer reset" in line["exc"]


def test_level_filters() -> None:
    out = io.StringIO()
    setup_logging("warning", "json", stream=out)
    log = logging.getLogger("pyforward.t")
    log.info("hidden")
    log.debug("hidden")
    log.warning("shown")
    assert [line["msg"] for line in lines(out)] == ["shown"]


@pytest.mark.parametrize(("text", "level"), [("debug", 10), ("INFO", 20), ("warn", 30), ("Warning", 30)])
def test_parse_level(text: str, level: int) -> None:
    assert parse_level(text) == level


def test_parse_level_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="PYFORWARD_LOG_LEVEL"):
        parse_level("loud")


def test_auto_is_text_on_a_terminal_and_json_otherwise() -> None:
    tty = TTY()
    setup_logging("info", "auto", stream=tty)
    logging.getLogger("pyforward.t").info("hello %s", "world", extra={"file": "audit.log"})
    text = tty.getvalue()
    assert " INFO    pyforward.t: hello world file=audit.log" in text
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(text)

    pipe = io.StringIO()
    setup_logging("info", "auto", stream=pipe)
    logging.getLogger("pyforward.t").info("hello")
    assert lines(pipe)[0]["msg"] == "hello"
    assert tty.getvalue() == text  # the first handler was replaced, not kept


def test_setup_twice_does_not_duplicate_lines() -> None:
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    setup_logging("info", "json", stream=out)
    logging.getLogger("pyforward.t").info("once")
    assert len(lines(out)) == 1


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_secrets_never_reach_the_log(fmt: Any) -> None:
    shared_key, password, later = fresh_secret(), fresh_secret(), fresh_secret()
    out = io.StringIO()
    setup_logging("debug", fmt, stream=out, secrets=[shared_key, None, password])
    add_secret(later)
    log = logging.getLogger("pyforward.client")
    log.info("handshake with key %s", shared_key)
    log.info(f"password is {password}")  # even an f-string message
    log.warning("proxy said %r", {"auth": later, "n": 1})
    log.error("bad", extra={"header": f"Basic {later}", "nested": {"k": [password]}})
    try:
        raise ValueError(f"digest over {shared_key} failed")
    except ValueError:
        log.exception("handshake failed")
    log.debug("stack", stack_info=True, extra={"x": shared_key})
    text = out.getvalue()
    for secret in (shared_key, password, later):
        assert secret not in text
    assert text.count(REDACTED) >= 7
    if fmt == "json":
        parsed = lines(out)
        assert parsed[0]["msg"] == f"handshake with key {REDACTED}"
        assert parsed[3]["header"] == f"Basic {REDACTED}"
        assert parsed[3]["nested"] == {"k": [REDACTED]}
        assert REDACTED in parsed[4]["exc"]


def test_secret_containing_json_specials_is_redacted_before_escaping() -> None:
    secret = 'pa"ss\\wörd\n' + pysecrets.token_hex(4)
    out = io.StringIO()
    setup_logging("info", "json", stream=out, secrets=[secret])
    logging.getLogger("pyforward.t").info("got %s", secret)
    assert secret not in lines(out)[0]["msg"]
    assert lines(out)[0]["msg"] == f"got {REDACTED}"


def test_longest_secret_wins_over_a_contained_one() -> None:
    short = pysecrets.token_hex(4)
    long = f"{short}-{pysecrets.token_hex(4)}"
    add_secret(short)
    add_secret(long)
    add_secret("")  # ignored, not a pattern matching everywhere
    assert redact(f"a {long} b {short} c") == f"a {REDACTED} b {REDACTED} c"


def test_rate_limiter_shows_first_then_one_per_interval_with_count() -> None:
    clock = FakeClock()
    out = io.StringIO()
    setup_logging("info", "json", stream=out, rate_limit_seconds=30.0, clock=clock)
    log = logging.getLogger("pyforward.client")
    for attempt in range(5):
        log.warning("connect to %s failed: %s", "audittailer:24224", f"refused #{attempt}")
        clock.now += 1
    log.warning("another template")  # its own key: not held back
    assert [line["msg"] for line in lines(out)] == [
        "connect to audittailer:24224 failed: refused #0",
        "another template",
    ]
    clock.now += 30
    log.warning("connect to %s failed: %s", "audittailer:24224", "refused #5")
    last = lines(out)[-1]
    assert last["msg"] == "connect to audittailer:24224 failed: refused #5 (repeated 4 times)"
    assert last["repeated"] == 4
    # Quiet for longer than the interval: shown again, with nothing to count.
    clock.now += 31
    log.warning("connect to %s failed: %s", "audittailer:24224", "refused #6")
    assert lines(out)[-1]["msg"] == "connect to audittailer:24224 failed: refused #6"
    assert "repeated" not in lines(out)[-1]


def test_rate_limiter_keys_on_logger_and_level_and_spares_debug() -> None:
    clock = FakeClock()
    out = io.StringIO()
    setup_logging("debug", "text", stream=out, rate_limit_seconds=30.0, clock=clock)
    logging.getLogger("pyforward.a").warning("failed")
    logging.getLogger("pyforward.b").warning("failed")
    logging.getLogger("pyforward.a").error("failed")
    logging.getLogger("pyforward.a").warning("failed")  # held back
    for _ in range(3):
        logging.getLogger("pyforward.a").debug("poll")  # debug is asked for: never held back
    assert len(out.getvalue().splitlines()) == 6


def test_rate_limiter_keys_a_bare_placeholder_template_on_the_message() -> None:
    # log.warning("%s", line) carries distinct messages in one template: each distinct one must be shown.
    clock = FakeClock()
    out = io.StringIO()
    setup_logging("info", "json", stream=out, rate_limit_seconds=30.0, clock=clock)
    log = logging.getLogger("pyforward")
    log.warning("%s", "AUDIT_NAMESPACE and PYFORWARD_NAMESPACE are both set")
    log.warning("%s", "AUDIT_PROXY_HOST and PYFORWARD_PROXY_HOST are both set")
    log.warning("%s: %s; %s", "watching Secret a/b", "403", "retrying")
    log.warning("%s: %s; %s", "watching Service a/c", "403", "retrying")
    log.warning("%s", "AUDIT_NAMESPACE and PYFORWARD_NAMESPACE are both set")  # a true repeat: held back
    assert len(lines(out)) == 4


def test_rate_limit_zero_disables() -> None:
    out = io.StringIO()
    setup_logging("info", "json", stream=out, rate_limit_seconds=0)
    for _ in range(3):
        logging.getLogger("pyforward.t").warning("same")
    assert len(lines(out)) == 3


def test_warnings_are_captured_as_log_lines() -> None:
    import warnings

    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    warnings.warn("something deprecated", DeprecationWarning, stacklevel=1)
    [line] = lines(out)
    assert line["logger"] == "py.warnings"
    assert "something deprecated" in line["msg"]
