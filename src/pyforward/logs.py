"""Logging: JSON lines for the cluster's log pipeline, plain text on a terminal, secrets redacted, repeats limited.

One handler on the root logger, so that asyncio's and the libraries' messages come out in the same format.
Two filters run on that handler, in this order:

1. the rate limiter: a message (same logger, level and template; the same text for a template that is only
   placeholders, like ``"%s"``) is shown the first time, then at most once per ``rate_limit_seconds`` with
   "(repeated K times)" counting what was held back. A receiver that is down for an
   hour must not write a line per reconnect attempt into the control plane's logs.
2. the redactor: every registered secret (shared key, passwords, proxy credentials) is replaced by ``********``
   in the message, its arguments, extra fields and tracebacks, before anything is formatted.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import IO, Any, Literal

import orjson

REDACTED = "********"
DEFAULT_RATE_LIMIT_SECONDS = 30.0
_RATE_LIMIT_KEYS = 4096  # distinct templates remembered; f-string messages would otherwise grow the table forever

# Attributes every LogRecord has; anything else on a record came in through ``extra=`` and is shown as a field.
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "repeated",
}
_CORE_KEYS = ("ts", "level", "logger", "msg")
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


# --- secrets -----------------------------------------------------------------------------------------------------
class _SecretRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        if not value:
            return
        with self._lock:
            if value in self._values:
                return
            self._values.add(value)
            # Longest first, so that a secret containing another one is replaced whole.
            ordered = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in ordered))

    def redact(self, text: str) -> str:
        pattern = self._pattern  # one read: a concurrent add() swaps in a new pattern atomically
        if pattern is None:
            return text
        return pattern.sub(REDACTED, text)


_secrets = _SecretRegistry()


def add_secret(value: str | None) -> None:
    """Register a secret value (shared key, password, a Proxy-Authorization header...): never written to a log."""
    if value:
        _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ********."""
    return _secrets.redact(text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return _secrets.redact(value)
    if isinstance(value, int | float | bool) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    return _secrets.redact(str(value))


class RedactFilter(logging.Filter):
    """Formats the message once, redacted, and drops the arguments so that nothing formats them again."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the event
            message = f"{record.msg!r} {record.args!r}"
        record.msg = _secrets.redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            # Formatters use a record's exc_text when it is set: the traceback is formatted once, redacted.
            record.exc_text = _secrets.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = _secrets.redact(record.stack_info)
        for key, value in list(record.__dict__.items()):
            if key not in _RESERVED:
                record.__dict__[key] = _redact_value(value)
        return True


# --- repeated messages -------------------------------------------------------------------------------------------
class RateLimitFilter(logging.Filter):
    """First occurrence of a message template, then at most one per ``interval`` seconds, with the count held back.

    Messages below ``min_level`` (warning, by default) are never held back: info lines are state changes (a new
    destination, shipping paused) that must all be seen; repeated failures are warnings and errors.
    """

    def __init__(
        self,
        interval: float = DEFAULT_RATE_LIMIT_SECONDS,
        min_level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.interval = interval
        self.min_level = min_level
        self.clock = clock
        self._lock = threading.Lock()
        # key -> [time shown last, occurrences held back since]
        self._seen: OrderedDict[tuple[str, int, str], list[float]] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.interval <= 0 or record.levelno < self.min_level:
            return True
        key = (record.name, record.levelno, _rate_key_text(record))
        now = self.clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self.interval:
                entry[1] += 1
                return False
            if entry is not None and entry[1]:
                record.repeated = int(entry[1])
            self._seen[key] = [now, 0]
            self._seen.move_to_end(key)
            while len(self._seen) > _RATE_LIMIT_KEYS:
                self._seen.popitem(last=False)
        return True


_PLACEHOLDER = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?[diouxXeEfFgGcrsa%]")
_MIN_TEMPLATE_LETTERS = 6


def _rate_key_text(record: logging.LogRecord) -> str:
    """The template, unless it is (almost) all placeholders: ``log.warning("%s", line)`` carries distinct messages
    in one template, and holding back the second one because the first had the same "%s" would hide it."""
    explicit = getattr(record, "rate_key", None)
    if explicit is not None:  # the caller says what makes two lines "the same" (e.g. the failure, not the delay)
        return str(explicit)
    template = str(record.msg)
    literal = _PLACEHOLDER.sub("", template)
    if sum(ch.isalpha() for ch in literal) >= _MIN_TEMPLATE_LETTERS:
        return template
    try:
        return record.getMessage()
    except Exception:  # a bad format string: the template is all there is
        return template


# --- formatting --------------------------------------------------------------------------------------------------
def _timestamp(created: float) -> str:
    return datetime.fromtimestamp(created, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _message(record: logging.LogRecord) -> str:
    message = record.getMessage()
    repeated = getattr(record, "repeated", 0)
    if repeated:
        message += f" (repeated {repeated} times)"
    return message


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RESERVED and k != "rate_key"}


def _level_name(record: logging.LogRecord) -> str:
    return record.levelname.lower()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339, UTC), level, logger, msg, then the ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": _level_name(record),
            "logger": record.name,
            "msg": _message(record),
        }
        for key, value in _extras(record).items():
            out[f"extra_{key}" if key in _CORE_KEYS else key] = value
        repeated = getattr(record, "repeated", 0)
        if repeated:
            out["repeated"] = repeated
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        try:
            return orjson.dumps(out, default=str).decode()
        except TypeError:  # e.g. an int beyond 64 bits in an extra field
            return orjson.dumps({k: v if isinstance(v, str) else repr(v) for k, v in out.items()}).decode()


class TextFormatter(logging.Formatter):
    """For a human at a terminal: ``TIME LEVEL logger: message key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record.created), f"{record.levelname:<7}", f"{record.name}:", _message(record)]
        parts.extend(f"{k}={v}" for k, v in _extras(record).items())
        line = " ".join(parts)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + record.stack_info
        return line


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler setup_logging installs; marked so that a second call replaces it and leaves others alone."""

    def handleError(self, record: logging.LogRecord) -> None:
        # A closed or full stderr must not raise into the pipeline; logging's default prints a traceback there.
        pass


def parse_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    try:
        return _LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(f"PYFORWARD_LOG_LEVEL: unknown log level {level!r} (debug, info, warning, error)") from None


def setup_logging(
    level: str | int = "info",
    fmt: Literal["auto", "json", "text"] = "auto",
    stream: IO[str] | None = None,
    secrets: Iterable[str | None] = (),
    *,
    rate_limit_seconds: float = DEFAULT_RATE_LIMIT_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> logging.Handler:
    """Install pyforward's handler on the root logger (replacing one installed before) and return it.

    ``fmt="auto"``: text when ``stream`` is a terminal, JSON lines otherwise (in a pod).
    """
    stream = sys.stderr if stream is None else stream
    for secret in secrets:
        add_secret(secret)
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        fmt = "text" if callable(isatty) and isatty() else "json"
    handler = _Handler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RateLimitFilter(rate_limit_seconds, clock=clock))  # first: it keys on the raw template
    handler.addFilter(RedactFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(parse_level(level))
    logging.captureWarnings(True)  # warnings.warn() from libraries come out as log lines, not bare stderr text
    return handler
