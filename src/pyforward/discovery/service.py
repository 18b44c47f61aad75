"""The receiver Service: where to ship."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    """Where to ship: the Service's ClusterIP and port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def port_names(ports: list[dict[str, Any]]) -> str:
    return ", ".join(f"{p.get('name') or 'unnamed'}={p.get('port')}" for p in ports)
