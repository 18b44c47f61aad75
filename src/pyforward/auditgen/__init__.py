"""Realistic kube-apiserver audit log generator (demo, tests, benchmarks): fixed seed => identical bytes.

Events are ``audit.k8s.io/v1`` ``Event`` objects as kube-apiserver writes them with the JSON log backend:
one compact JSON object per line, UTF-8 unescaped (Go's encoding/json), microsecond RFC 3339 timestamps.
Mostly ``Metadata`` level (lease renewals, kubelet and controller traffic, humans with kubectl), every 50th
a ``RequestResponse`` event carrying a ConfigMap/Pod/Deployment as request and response objects.

Speed: the bench needs 200,000 events (~210 MB). Each event shape is serialised once into a byte template
with ``%(name)s`` holes; per event we only pick a template and fill auditID, timestamps, resourceVersion and
a name suffix with ``bytes % mapping``.

:class:`RotatingAuditLog` writes files the way kube-apiserver does with lumberjack (``--audit-log-maxsize``,
``--audit-log-maxbackup``, ``--audit-log-compress``).

CLI: ``python -m pyforward.auditgen --count N --out FILE [--seed S] [--id-prefix P] [--rate R]``.

Modules: `pools` (nodes, apps, people, ...), `objects` (the ConfigMap and Pod of RequestResponse events), `shapes`
(event shapes, templates), `events` (generate_events, audit_id), `rotating`
(RotatingAuditLog), `cli` (``python -m pyforward.auditgen``).
"""

from __future__ import annotations

from pyforward.auditgen.cli import main
from pyforward.auditgen.events import DEFAULT_START, RR_EVERY, audit_id, generate_events
from pyforward.auditgen.rotating import RotatingAuditLog

__all__ = ["DEFAULT_START", "RR_EVERY", "RotatingAuditLog", "audit_id", "generate_events", "main"]
