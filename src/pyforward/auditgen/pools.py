"""The pools the generated events draw from: cluster version, nodes, namespaces, apps, people, controllers, and
random UIDs and addresses."""

from __future__ import annotations

import random

K8S_VERSION = "v1.31.3"
K8S_COMMIT = "c83cbee"
NODES = [f"ip-10-0-{i // 8}-{17 + i * 13 % 200}.eu-central-1.compute.internal" for i in range(12)]
NAMESPACES = ["kube-system", "default", "payments", "frontend", "monitoring", "data-pipeline", "ingress-nginx"]
APPS = ["web", "api", "checkout", "worker", "redis", "prometheus", "grafana", "fluent-bit"]
HUMANS = [
    ("jürgen.müller@example.com", ["oidc:platform-team", "system:authenticated"]),
    ("田中太郎@example.jp", ["oidc:sre-日本", "system:authenticated"]),
    ("zoë.ångström@example.se", ["oidc:developers", "system:authenticated"]),
    ("alice@example.com", ["oidc:developers", "system:authenticated"]),
    ("josé.garcía@example.es", ["oidc:on-call", "system:authenticated"]),
]
CONTROLLERS = [
    "replicaset-controller",
    "deployment-controller",
    "endpointslice-controller",
    "generic-garbage-collector",
    "namespace-controller",
    "horizontal-pod-autoscaler",
]


def uid(rng: random.Random) -> str:
    b = rng.getrandbits(128)
    return f"{b >> 96:08x}-{(b >> 80) & 0xFFFF:04x}-4{(b >> 68) & 0xFFF:03x}-{0x8000 | (b >> 52) & 0x3FFF:04x}-{b & 0xFFFFFFFFFFFF:012x}"  # noqa: E501


def ip(rng: random.Random) -> str:
    return f"10.0.{rng.randrange(0, 8)}.{rng.randrange(2, 250)}"
