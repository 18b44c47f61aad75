"""The receiver Service: where to ship (its ClusterIP and the port chosen), or None when it cannot be shipped to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyforward.discovery.pacing import WarnOnce


@dataclass(frozen=True)
class Target:
    """Where to ship: the Service's ClusterIP and port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def port_names(ports: list[dict[str, Any]]) -> str:
    return ", ".join(f"{p.get('name') or 'unnamed'}={p.get('port')}" for p in ports)


def service_target(where: str, obj: dict[str, Any], wanted: str | None, warn_once: WarnOnce) -> Target | None:
    """Where the Service `obj` says to ship; None (with a warning) when it has no usable ClusterIP or port."""
    spec = obj.get("spec") or {}
    cluster_ip = spec.get("clusterIP")
    if not isinstance(cluster_ip, str) or not cluster_ip or cluster_ip == "None":
        warn_once(
            f"noip:{cluster_ip}",
            f"{where} has no ClusterIP (type {spec.get('type') or 'ClusterIP'}, clusterIP {cluster_ip!r}): "
            "cannot ship to it; waiting for a change",
        )
        return None
    port = pick_port(where, spec.get("ports") or [], wanted, warn_once)
    if port is None:
        return None
    return Target(cluster_ip, port)


def pick_port(where: str, ports: list[Any], wanted: str | None, warn_once: WarnOnce) -> int | None:
    """The port to ship to: the one named `wanted`, else the first (each choice that may surprise is warned of)."""
    ports = [p for p in ports if isinstance(p, dict) and isinstance(p.get("port"), int)]
    if not ports:
        warn_once("noports", f"{where} has no ports: cannot ship to it; waiting for a change")
        return None
    chosen: dict[str, Any] | None = None
    if wanted:
        chosen = next((p for p in ports if p.get("name") == wanted), None)
        if chosen is None:
            chosen = ports[0]
            warn_once(
                f"portname:{wanted}",
                f"{where} has no port named {wanted!r} (ports: {port_names(ports)}); "
                f"using the first, {chosen.get('name') or 'unnamed'} ({chosen['port']})",
            )
    else:
        chosen = ports[0]
        if len(ports) > 1:
            warn_once(
                "severalports",
                f"{where} has several ports ({port_names(ports)}) and PYFORWARD_SERVICE_PORT_NAME is unset; "
                f"using the first, {chosen.get('name') or 'unnamed'} ({chosen['port']})",
            )
    port = chosen["port"]
    assert isinstance(port, int)
    if not 1 <= port <= 65535:
        warn_once(f"badport:{port}", f"{where} has an invalid port {port}: cannot ship to it")
        return None
    return port
