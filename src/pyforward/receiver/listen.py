"""The receiver's sockets and its log: listening on every address of a host, naming a peer, and a log that a
misbehaving peer cannot flood (moved out of server.py, which issue 22 grew)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time


class RateLimitedLog:
    """At most ``burst`` messages per ``interval`` seconds per kind; then one line saying how many were dropped.

    A misbehaving peer reconnecting in a loop must not flood the receiver's log (or its disk).
    """

    def __init__(self, logger: logging.Logger, *, interval: float = 10.0, burst: int = 5) -> None:
        self._log = logger
        self._interval = interval
        self._burst = burst
        self._windows: dict[str, list[float]] = {}  # kind -> [window start, emitted, suppressed]

    def __call__(self, level: int, kind: str, msg: str, *args: object) -> None:
        if not self._log.isEnabledFor(level):
            return
        now = time.monotonic()
        window = self._windows.get(kind)
        if window is None or now - window[0] >= self._interval:
            if window is not None and window[2]:
                self._log.log(
                    level, "%d more %s messages suppressed in the last %.0f s", window[2], kind, now - window[0]
                )
            window = self._windows[kind] = [now, 0, 0]
        if window[1] < self._burst:
            window[1] += 1
            self._log.log(level, msg, *args)
        else:
            window[2] += 1


def peer_address(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "<disconnected>"
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer)


async def listen(host: str, port: int, backlog: int = 512) -> list[socket.socket]:
    """Listening sockets for every address of ``host`` (as asyncio.start_server; port 0: the first one's port)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(listeners) > 1:  # the same free port on every address
                address = (address[0], listeners[0].getsockname()[1], *address[2:])
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"error while attempting to bind on address {address!r}: {(exc.strerror or '').lower()}"
                ) from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners
