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
"""

from __future__ import annotations

import argparse
import functools
import gzip
import os
import random
import re
import shutil
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import orjson

__all__ = ["DEFAULT_START", "RotatingAuditLog", "audit_id", "generate_events", "main"]

#: Timestamp of the first event when ``start`` is not given (fixed so that output depends on the seed only).
DEFAULT_START: Final = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
#: Events per second of log time when ``rate_per_second`` is not given.
DEFAULT_RATE: Final = 1000.0
#: Every RR_EVERY-th event is a RequestResponse-level event with request and response objects.
RR_EVERY: Final = 50

_HOLES: Final = ("aid", "rts", "sts", "rv", "sfx")
_HOLE_RE: Final = re.compile(rb"@@(" + b"|".join(h.encode() for h in _HOLES) + rb")@@")

# ------------------------------------------------------------------------------------------ pools

_K8S_VERSION = "v1.31.3"
_K8S_COMMIT = "c83cbee"
_NODES = [f"ip-10-0-{i // 8}-{17 + i * 13 % 200}.eu-central-1.compute.internal" for i in range(12)]
_NAMESPACES = ["kube-system", "default", "payments", "frontend", "monitoring", "data-pipeline", "ingress-nginx"]
_APPS = ["web", "api", "checkout", "worker", "redis", "prometheus", "grafana", "fluent-bit"]
_HUMANS = [
    ("jürgen.müller@example.com", ["oidc:platform-team", "system:authenticated"]),
    ("田中太郎@example.jp", ["oidc:sre-日本", "system:authenticated"]),
    ("zoë.ångström@example.se", ["oidc:developers", "system:authenticated"]),
    ("alice@example.com", ["oidc:developers", "system:authenticated"]),
    ("josé.garcía@example.es", ["oidc:on-call", "system:authenticated"]),
]
_CONTROLLERS = [
    "replicaset-controller",
    "deployment-controller",
    "endpointslice-controller",
    "generic-garbage-collector",
    "namespace-controller",
    "horizontal-pod-autoscaler",
]


def _uid(rng: random.Random) -> str:
    b = rng.getrandbits(128)
    return f"{b >> 96:08x}-{(b >> 80) & 0xFFFF:04x}-4{(b >> 68) & 0xFFF:03x}-{0x8000 | (b >> 52) & 0x3FFF:04x}-{b & 0xFFFFFFFFFFFF:012x}"  # noqa: E501


def _ip(rng: random.Random) -> str:
    return f"10.0.{rng.randrange(0, 8)}.{rng.randrange(2, 250)}"


def _rbac_reason(kind: str, binding: str, role_kind: str, role: str, subject_kind: str, subject: str) -> str:
    return f'RBAC: allowed by {kind} "{binding}" of {role_kind} "{role}" to {subject_kind} "{subject}"'


def _event(
    *,
    level: str,
    uri: str,
    verb: str,
    user: dict[str, Any],
    source_ip: str,
    user_agent: str,
    object_ref: dict[str, Any] | None,
    code: int,
    annotations: dict[str, str],
    status: dict[str, Any] | None = None,
    request_object: dict[str, Any] | None = None,
    response_object: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An audit Event with holes, in kube-apiserver's field order."""
    event: dict[str, Any] = {
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "level": level,
        "auditID": "@@aid@@",
        "stage": "ResponseComplete",
        "requestURI": uri,
        "verb": verb,
        "user": user,
        "sourceIPs": [source_ip],
        "userAgent": user_agent,
    }
    if object_ref is not None:
        event["objectRef"] = object_ref
    event["responseStatus"] = status if status is not None else {"metadata": {}, "code": code}
    if request_object is not None:
        event["requestObject"] = request_object
    if response_object is not None:
        event["responseObject"] = response_object
    event["requestReceivedTimestamp"] = "@@rts@@"
    event["stageTimestamp"] = "@@sts@@"
    event["annotations"] = annotations
    return event


def _sa_user(rng: random.Random, namespace: str, name: str, node: str | None = None) -> dict[str, Any]:
    user: dict[str, Any] = {
        "username": f"system:serviceaccount:{namespace}:{name}",
        "uid": _uid(rng),
        "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
    }
    if node is not None:  # bound token projected into a pod: kube-apiserver >= 1.30 adds these extras
        user["extra"] = {
            "authentication.kubernetes.io/credential-id": [f"JTI={_uid(rng)}"],
            "authentication.kubernetes.io/node-name": [node],
            "authentication.kubernetes.io/node-uid": [_uid(rng)],
            "authentication.kubernetes.io/pod-name": [f"{name}-@@sfx@@"],
            "authentication.kubernetes.io/pod-uid": [_uid(rng)],
        }
    return user


def _metadata_shapes(rng: random.Random) -> list[dict[str, Any]]:
    """Metadata-level event shapes, repeated according to how common they are in a real cluster."""
    shapes: list[dict[str, Any]] = []
    allow = "authorization.k8s.io/decision"
    reason = "authorization.k8s.io/reason"
    # Leader election lease renewals: the most frequent events of an idle control plane.
    for component in ("kube-controller-manager", "kube-scheduler"):
        for _ in range(6):
            shapes.append(
                _event(
                    level="Metadata",
                    uri=f"/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/{component}?timeout=5s",
                    verb="update",
                    user={"username": f"system:{component}", "groups": ["system:authenticated"]},
                    source_ip=_ip(rng),
                    user_agent=f"{component}/{_K8S_VERSION} (linux/amd64) kubernetes/{_K8S_COMMIT}/leader-election",
                    object_ref={
                        "resource": "leases",
                        "namespace": "kube-system",
                        "name": component,
                        "uid": _uid(rng),
                        "apiGroup": "coordination.k8s.io",
                        "apiVersion": "v1",
                        "resourceVersion": "@@rv@@",
                    },
                    code=200,
                    annotations={
                        allow: "allow",
                        reason: _rbac_reason(
                            "ClusterRoleBinding",
                            f"system:{component}",
                            "ClusterRole",
                            f"system:{component}",
                            "User",
                            f"system:{component}",
                        ),
                    },
                )
            )
    # Kubelets: node lease renewal, node status patch, reading the secrets/configmaps of their pods.
    node_shapes: list[dict[str, Any]] = []
    for node in _NODES:
        node_user = {"username": f"system:node:{node}", "groups": ["system:nodes", "system:authenticated"]}
        kubelet_ua = f"kubelet/{_K8S_VERSION} (linux/amd64) kubernetes/{_K8S_COMMIT}"
        node_annotations = {allow: "allow", reason: ""}
        node_shapes.append(
            _event(
                level="Metadata",
                uri=f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node}?timeout=10s",
                verb="update",
                user=node_user,
                source_ip=_ip(rng),
                user_agent=kubelet_ua,
                object_ref={
                    "resource": "leases",
                    "namespace": "kube-node-lease",
                    "name": node,
                    "uid": _uid(rng),
                    "apiGroup": "coordination.k8s.io",
                    "apiVersion": "v1",
                    "resourceVersion": "@@rv@@",
                },
                code=200,
                annotations=node_annotations,
            )
        )
        node_shapes.append(
            _event(
                level="Metadata",
                uri=f"/api/v1/nodes/{node}/status?timeout=10s",
                verb="patch",
                user=node_user,
                source_ip=_ip(rng),
                user_agent=kubelet_ua,
                object_ref={"resource": "nodes", "name": node, "apiVersion": "v1", "subresource": "status"},
                code=200,
                annotations=node_annotations,
            )
        )
        namespace = rng.choice(_NAMESPACES)
        app = rng.choice(_APPS)
        node_shapes.append(
            _event(
                level="Metadata",
                uri=f"/api/v1/namespaces/{namespace}/configmaps?fieldSelector=metadata.name%3D{app}-config"
                f"&limit=500&resourceVersion=0",
                verb="list",
                user=node_user,
                source_ip=_ip(rng),
                user_agent=kubelet_ua,
                object_ref={
                    "resource": "configmaps",
                    "namespace": namespace,
                    "name": f"{app}-config",
                    "apiVersion": "v1",
                },
                code=200,
                annotations=node_annotations,
            )
        )
    # Kubelet traffic dominates a busy cluster's audit log: weight it.
    shapes.extend(node_shapes * 3)
    # Controllers with bound service-account tokens (the big "extra" block).
    for controller in _CONTROLLERS:
        namespace = rng.choice(_NAMESPACES)
        app = rng.choice(_APPS)
        resource, group, version = rng.choice(
            [("pods", "", "v1"), ("replicasets", "apps", "v1"), ("endpointslices", "discovery.k8s.io", "v1")]
        )
        prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
        verb = rng.choice(["get", "update", "patch", "delete"])
        ref: dict[str, Any] = {"resource": resource, "namespace": namespace, "name": f"{app}-@@sfx@@"}
        if verb != "get":
            ref["uid"] = _uid(rng)
        if group:
            ref["apiGroup"] = group
        ref["apiVersion"] = version
        if verb in ("update", "patch"):
            ref["resourceVersion"] = "@@rv@@"
        shapes.append(
            _event(
                level="Metadata",
                uri=f"{prefix}/namespaces/{namespace}/{resource}/{app}-@@sfx@@",
                verb=verb,
                user=_sa_user(rng, "kube-system", controller, node=rng.choice(_NODES)),
                source_ip=_ip(rng),
                user_agent=f"kube-controller-manager/{_K8S_VERSION} (linux/amd64) kubernetes/{_K8S_COMMIT}"
                f"/system:serviceaccount:kube-system:{controller}",
                object_ref=ref,
                code=200,
                annotations={
                    allow: "allow",
                    reason: _rbac_reason(
                        "ClusterRoleBinding",
                        f"system:controller:{controller}",
                        "ClusterRole",
                        f"system:controller:{controller}",
                        "ServiceAccount",
                        f"{controller}/kube-system",
                    ),
                },
            )
        )
    # Watches (long query strings).
    for resource, group in (
        ("pods", ""),
        ("services", ""),
        ("endpointslices", "discovery.k8s.io"),
        ("ingresses", "networking.k8s.io"),
    ):
        prefix = f"/apis/{group}/v1" if group else "/api/v1"
        ref = {"resource": resource, "apiVersion": "v1"}
        if group:
            ref = {"resource": resource, "apiGroup": group, "apiVersion": "v1"}
        shapes.append(
            _event(
                level="Metadata",
                uri=f"{prefix}/{resource}?allowWatchBookmarks=true&resourceVersion=@@rv@@"
                f"&timeout=8m7s&timeoutSeconds=487&watch=true",
                verb="watch",
                user=_sa_user(rng, "ingress-nginx", "ingress-nginx"),
                source_ip=_ip(rng),
                user_agent="nginx-ingress-controller/v1.11.2 (linux/amd64) "
                "ingress-nginx/46e76e5916813cfca2a9b0bfdc34b69a0000f6b9",
                object_ref=ref,
                code=200,
                annotations={
                    allow: "allow",
                    reason: _rbac_reason(
                        "ClusterRoleBinding",
                        "ingress-nginx",
                        "ClusterRole",
                        "ingress-nginx",
                        "ServiceAccount",
                        "ingress-nginx/ingress-nginx",
                    ),
                },
            )
        )
    # Humans with kubectl (unicode user names, groups and annotation values).
    for username, groups in _HUMANS:
        namespace = rng.choice(_NAMESPACES[1:])
        app = rng.choice(_APPS)
        kubectl_ua = "kubectl/v1.31.2 (darwin/arm64) kubernetes/5864a46"
        human = {"username": username, "groups": groups}
        shapes.append(
            _event(
                level="Metadata",
                uri=f"/api/v1/namespaces/{namespace}/pods?limit=500",
                verb="list",
                user=human,
                source_ip=f"192.168.{rng.randrange(0, 255)}.{rng.randrange(2, 250)}",
                user_agent=kubectl_ua,
                object_ref={"resource": "pods", "namespace": namespace, "apiVersion": "v1"},
                code=200,
                annotations={
                    allow: "allow",
                    reason: _rbac_reason("RoleBinding", "équipe-lecture", "ClusterRole", "view", "Group", groups[0]),
                },
            )
        )
        shapes.append(
            _event(
                level="Metadata",
                uri=f"/api/v1/namespaces/{namespace}/secrets/{app}-tls",
                verb="get",
                user=human,
                source_ip=f"192.168.{rng.randrange(0, 255)}.{rng.randrange(2, 250)}",
                user_agent=kubectl_ua,
                object_ref={"resource": "secrets", "namespace": namespace, "name": f"{app}-tls", "apiVersion": "v1"},
                code=403,
                status={
                    "metadata": {},
                    "status": "Failure",
                    "message": f'secrets "{app}-tls" is forbidden: User "{username}" cannot get resource '
                    f'"secrets" in API group "" in the namespace "{namespace}"',
                    "reason": "Forbidden",
                    "details": {"name": f"{app}-tls", "kind": "secrets"},
                    "code": 403,
                },
                annotations={allow: "forbid", reason: ""},
            )
        )
        shapes.append(
            _event(
                level="Metadata",
                uri=f"/apis/apps/v1/namespaces/{namespace}/deployments/{app}?fieldManager=kubectl-edit",
                verb="update",
                user=human,
                source_ip=f"192.168.{rng.randrange(0, 255)}.{rng.randrange(2, 250)}",
                user_agent=kubectl_ua,
                object_ref={
                    "resource": "deployments",
                    "namespace": namespace,
                    "name": app,
                    "uid": _uid(rng),
                    "apiGroup": "apps",
                    "apiVersion": "v1",
                    "resourceVersion": "@@rv@@",
                },
                code=200,
                annotations={
                    allow: "allow",
                    reason: _rbac_reason(
                        "RoleBinding", "déploiement-équipe", "ClusterRole", "edit", "Group", groups[0]
                    ),
                    "policy.example.com/ticket": "CHG-2026 ✅ Änderung genehmigt — 変更承認済み 🚀",
                    "mutation.webhook.admission.k8s.io/round_0_index_0": orjson.dumps(
                        {"configuration": "policy-webhook", "webhook": "mutate.policy.example.com", "mutated": False}
                    ).decode(),
                },
            )
        )
    return shapes


def _managed_fields(manager: str, operation: str, fields: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "manager": manager,
            "operation": operation,
            "apiVersion": "v1",
            "time": "2026-11-26T11:58:02Z",
            "fieldsType": "FieldsV1",
            "fieldsV1": fields,
        }
    ]


def _configmap(rng: random.Random, namespace: str, app: str, rv: str | None) -> dict[str, Any]:
    data = {
        "app.yaml": (
            f'server:\n  name: {app}\n  port: 8080\n  greeting: "Grüß Gott — こんにちは — 🎉"\n'
            "  locales: [de-AT, ja-JP, fr-FR, es-ES]\n"
            'features:\n  checkout: true\n  recommendations: false\n  beta_ui: "enabled for 10%"\n'
            + "".join(f"  flag_{i:02d}: {rng.choice(['true', 'false'])}\n" for i in range(40))
        ),
        "logging.json": orjson.dumps(
            {
                "level": "info",
                "format": "json",
                "fields": {"service": app, "team": "zahlungsverkehr-ü"},
                "sampling": {"initial": 100, "thereafter": 100},
            }
        ).decode(),
        "motd": "Willkommen! Bienvenue! ようこそ! 歡迎! Добро пожаловать! 👋",
    }
    meta: dict[str, Any] = {
        "name": f"{app}-config",
        "namespace": namespace,
        "labels": {
            "app.kubernetes.io/name": app,
            "app.kubernetes.io/part-of": "shop",
            "app.kubernetes.io/managed-by": "argocd",
        },
        "annotations": {
            "description": "Konfiguration für den Bezahldienst (日本語の説明付き)",
            "argocd.argoproj.io/tracking-id": f"shop:/ConfigMap:{namespace}/{app}-config",
        },
    }
    if rv is not None:
        meta.update(
            {
                "uid": _uid(rng),
                "resourceVersion": rv,
                "creationTimestamp": "2026-10-01T08:15:30Z",
                "managedFields": _managed_fields(
                    "argocd-controller",
                    "Update",
                    {
                        "f:data": {".": {}, "f:app.yaml": {}, "f:logging.json": {}, "f:motd": {}},
                        "f:metadata": {
                            "f:annotations": {".": {}, "f:description": {}, "f:argocd.argoproj.io/tracking-id": {}},
                            "f:labels": {
                                ".": {},
                                "f:app.kubernetes.io/managed-by": {},
                                "f:app.kubernetes.io/name": {},
                                "f:app.kubernetes.io/part-of": {},
                            },
                        },
                    },
                ),
            }
        )
    return {"kind": "ConfigMap", "apiVersion": "v1", "metadata": meta, "data": data}


def _pod_spec(app: str, node: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "volumes": [
            {"name": "config", "configMap": {"name": f"{app}-config", "defaultMode": 420}},
            {
                "name": "kube-api-access-@@sfx@@",
                "projected": {
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                        {
                            "downwardAPI": {
                                "items": [
                                    {
                                        "path": "namespace",
                                        "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                                    }
                                ]
                            }
                        },
                    ],
                    "defaultMode": 420,
                },
            },
        ],
        "containers": [
            {
                "name": app,
                "image": f"registry.example.com/shop/{app}:2026.11.3",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "env": [
                    {"name": "GREETING", "value": "Grüß Gott 👋"},
                    {"name": "REGION", "value": "eu-central-1"},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
                ],
                "resources": {
                    "limits": {"cpu": "500m", "memory": "512Mi"},
                    "requests": {"cpu": "100m", "memory": "128Mi"},
                },
                "volumeMounts": [
                    {"name": "config", "readOnly": True, "mountPath": "/etc/app"},
                    {
                        "name": "kube-api-access-@@sfx@@",
                        "readOnly": True,
                        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                    },
                ],
                "livenessProbe": {
                    "httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"},
                    "timeoutSeconds": 1,
                    "periodSeconds": 10,
                    "successThreshold": 1,
                    "failureThreshold": 3,
                },
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent",
                "securityContext": {
                    "runAsNonRoot": True,
                    "readOnlyRootFilesystem": True,
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "serviceAccountName": app,
        "serviceAccount": app,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "schedulerName": "default-scheduler",
        "tolerations": [
            {
                "key": "node.kubernetes.io/not-ready",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            },
            {
                "key": "node.kubernetes.io/unreachable",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            },
        ],
        "priority": 0,
        "enableServiceLinks": True,
        "preemptionPolicy": "PreemptLowerPriority",
    }
    if node is not None:
        spec["nodeName"] = node
    return spec


def _pod(rng: random.Random, namespace: str, app: str, rv: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": f"{app}-7c9f6d8b4d-@@sfx@@",
        "generateName": f"{app}-7c9f6d8b4d-",
        "namespace": namespace,
        "labels": {"app.kubernetes.io/name": app, "pod-template-hash": "7c9f6d8b4d"},
        "annotations": {
            "kubectl.kubernetes.io/restartedAt": "2026-11-26T11:00:00+01:00",
            "team.example.com/owner": "Zahlungsverkehr — Jürgen Müller",
        },
        "ownerReferences": [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": f"{app}-7c9f6d8b4d",
                "uid": _uid(rng),
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    pod: dict[str, Any] = {"kind": "Pod", "apiVersion": "v1", "metadata": meta}
    if rv is None:
        pod["spec"] = _pod_spec(app, None)
        pod["status"] = {}
        return pod
    meta.update(
        {
            "uid": _uid(rng),
            "resourceVersion": rv,
            "creationTimestamp": "2026-11-26T11:58:02Z",
            "managedFields": _managed_fields(
                "kube-controller-manager",
                "Update",
                {
                    "f:metadata": {
                        "f:generateName": {},
                        "f:labels": {".": {}, "f:app.kubernetes.io/name": {}, "f:pod-template-hash": {}},
                        "f:ownerReferences": {".": {}, f'k:{{"uid":"{_uid(rng)}"}}': {}},
                    },
                    "f:spec": {
                        "f:containers": {
                            f'k:{{"name":"{app}"}}': {
                                ".": {},
                                "f:env": {".": {}, 'k:{"name":"GREETING"}': {".": {}, "f:name": {}, "f:value": {}}},
                                "f:image": {},
                                "f:imagePullPolicy": {},
                                "f:livenessProbe": {},
                                "f:name": {},
                                "f:ports": {},
                                "f:resources": {},
                                "f:securityContext": {},
                            }
                        },
                        "f:dnsPolicy": {},
                        "f:enableServiceLinks": {},
                        "f:restartPolicy": {},
                    },
                },
            ),
        }
    )
    pod["spec"] = _pod_spec(app, rng.choice(_NODES))
    pod["status"] = {"phase": "Pending", "qosClass": "Burstable"}
    return pod


def _request_response_shapes(rng: random.Random) -> list[dict[str, Any]]:
    shapes: list[dict[str, Any]] = []
    allow = "authorization.k8s.io/decision"
    reason = "authorization.k8s.io/reason"
    for namespace in ("payments", "frontend", "data-pipeline"):
        app = rng.choice(_APPS)
        username, groups = rng.choice(_HUMANS)
        shapes.append(
            _event(
                level="RequestResponse",
                uri=f"/api/v1/namespaces/{namespace}/configmaps/{app}-config?fieldManager=argocd-controller",
                verb="update",
                user=_sa_user(rng, "argocd", "argocd-application-controller", node=rng.choice(_NODES)),
                source_ip=_ip(rng),
                user_agent="argocd-application-controller/v2.13.1+af54ef8 (linux/amd64) kubernetes/af54ef8",
                object_ref={
                    "resource": "configmaps",
                    "namespace": namespace,
                    "name": f"{app}-config",
                    "uid": _uid(rng),
                    "apiVersion": "v1",
                    "resourceVersion": "@@rv@@",
                },
                code=200,
                request_object=_configmap(rng, namespace, app, None),
                response_object=_configmap(rng, namespace, app, "@@rv@@"),
                annotations={
                    allow: "allow",
                    reason: _rbac_reason(
                        "ClusterRoleBinding",
                        "argocd-application-controller",
                        "ClusterRole",
                        "argocd-application-controller",
                        "ServiceAccount",
                        "argocd-application-controller/argocd",
                    ),
                },
            )
        )
        shapes.append(
            _event(
                level="RequestResponse",
                uri=f"/api/v1/namespaces/{namespace}/pods",
                verb="create",
                user=_sa_user(rng, "kube-system", "replicaset-controller", node=rng.choice(_NODES)),
                source_ip=_ip(rng),
                user_agent=f"kube-controller-manager/{_K8S_VERSION} (linux/amd64) kubernetes/{_K8S_COMMIT}"
                "/system:serviceaccount:kube-system:replicaset-controller",
                object_ref={
                    "resource": "pods",
                    "namespace": namespace,
                    "name": f"{app}-7c9f6d8b4d-@@sfx@@",
                    "apiVersion": "v1",
                },
                code=201,
                status={"metadata": {}, "code": 201},
                request_object=_pod(rng, namespace, app, None),
                response_object=_pod(rng, namespace, app, "@@rv@@"),
                annotations={
                    allow: "allow",
                    reason: _rbac_reason(
                        "ClusterRoleBinding",
                        "system:controller:replicaset-controller",
                        "ClusterRole",
                        "system:controller:replicaset-controller",
                        "ServiceAccount",
                        "replicaset-controller/kube-system",
                    ),
                    "pod-security.kubernetes.io/enforce-policy": "restricted:latest",
                    "note.example.com/by": f"{username} ({groups[0]})",
                },
            )
        )
    return shapes


def _template(event: dict[str, Any]) -> bytes:
    """Serialise once; turn the ``@@hole@@`` markers into ``%(hole)s`` for ``bytes % mapping``."""
    raw = orjson.dumps(event).replace(b"%", b"%%")
    return _HOLE_RE.sub(lambda m: b"%(" + m.group(1) + b")s", raw) + b"\n"


@cache
def _templates() -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    # A fixed internal seed: the *shapes* never change; the caller's seed picks among them.
    rng = random.Random(0x6B756265)
    metadata = tuple(_template(e) for e in _metadata_shapes(rng))
    request_response = tuple(_template(e) for e in _request_response_shapes(rng))
    return metadata, request_response


@cache
def _suffixes() -> tuple[bytes, ...]:
    # Kubernetes' rand.String alphabet (no vowels, no confusable digits).
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    rng = random.Random(5)
    return tuple("".join(rng.choice(alphabet) for _ in range(5)).encode() for _ in range(4096))


# ------------------------------------------------------------------------------------------ generator


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


# ------------------------------------------------------------------------------------------ rotation

_BACKUP_FORMAT: Final = "%Y-%m-%dT%H-%M-%S.%f"  # lumberjack's backupTimeFormat "2006-01-02T15-04-05.000"
_EPOCH_NAIVE: Final = datetime(1970, 1, 1)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class RotatingAuditLog:
    """Append lines to ``path`` and rotate it like lumberjack (kube-apiserver's audit log writer).

    Before a write that would make the file exceed ``max_bytes``, the file is closed, renamed to
    ``<stem>-<UTC %Y-%m-%dT%H-%M-%S.mmm><ext>`` (``audit-2026-11-26T12-00-00.000.log``) and a new file is
    created at ``path`` with the old file's mode. Names are unique and increase: when the millisecond is already
    taken (or earlier than the previous backup's), the next free millisecond is used. ``max_backups`` keeps only
    the newest rotated files; ``compress`` gzips each rotated file to ``<name>.gz`` and deletes the original.

    By default that happens synchronously inside the write that rotates, so that tests are deterministic. With
    ``mill=True`` it happens as lumberjack v2.2.1 does it (``millRunOnce``): in one background thread, at most one
    pass queued, after the write returned. A pass lists the backups newest first, removes those beyond
    ``max_backups`` (a ``.log`` and its ``.log.gz`` count once), then gzips each remaining plain backup: the
    ``.gz`` is created (truncating a leftover), written and closed, and only then is the plain file removed. So a
    reader sees backups vanish and plain files replaced by a ``.gz`` concurrently (tests of issue 12, the bench's
    soak scenario). :meth:`settle` waits for the mill to be idle; :meth:`close` settles it.

    Lines are never split across files: a write holds whole lines only (a missing trailing ``\\n`` is
    added), and a single line longer than ``max_bytes`` goes alone into a fresh file (lumberjack refuses such
    writes; kube-apiserver would lose the event, a test corpus should not). Writes are unbuffered, one
    ``write(2)`` per :meth:`write` call, as lumberjack does; :meth:`write_many` batches whole lines.

    ``clock`` (UTC now) is injectable for tests.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        max_backups: int | None = None,
        compress: bool = False,
        clock: Callable[[], datetime] = _utc_now,
        mill: bool = False,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"RotatingAuditLog: max_bytes must be > 0, got {max_bytes}")
        if max_backups is not None and max_backups < 0:
            raise ValueError(f"RotatingAuditLog: max_backups must be >= 0, got {max_backups}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_backups = max_backups
        self.compress = compress
        self._clock = clock
        self._stem = self.path.stem
        self._ext = self.path.suffix
        self._backup_re = re.compile(
            re.escape(self._stem + "-")
            + r"(\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}\.\d{3})"
            + re.escape(self._ext)
            + r"(?:\.gz)?"
        )
        self._last_backup_ms: int | None = None
        self._rotations = 0
        self._fd: int | None = None
        self._size = 0
        self.mill = mill
        self.mill_errors: list[OSError] = []  # what the background mill could not do (lumberjack ignores them too)
        self._mill_cond = threading.Condition()
        self._mill_queued = False
        self._mill_running = False
        self._mill_closing = False
        self._mill_thread: threading.Thread | None = None
        self._open()

    @property
    def rotations(self) -> int:
        return self._rotations

    @property
    def size(self) -> int:
        """Bytes in the current file."""
        return self._size

    def _open(self, mode: int | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if mode is None:  # an existing file is appended to (lumberjack's openExistingOrNew)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        else:  # after a rotation: openNew, O_CREATE|O_TRUNC with the old file's mode
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, mode)
        self._size = os.fstat(self._fd).st_size

    def _write_all(self, data: bytes) -> None:
        if self._fd is None:
            raise ValueError(f"RotatingAuditLog: {self.path} is closed")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._size += len(data)

    def write(self, line: bytes) -> None:
        if not line.endswith(b"\n"):
            line += b"\n"
        if self._size and self._size + len(line) > self.max_bytes:
            self._rotate()
        self._write_all(line)

    def write_many(self, lines: Iterable[bytes]) -> None:
        batch: list[bytes] = []
        batch_size = 0
        for line in lines:
            if not line.endswith(b"\n"):
                line += b"\n"
            size = len(line)
            if self._size + batch_size and self._size + batch_size + size > self.max_bytes:
                if batch:
                    self._write_all(b"".join(batch))
                    batch.clear()
                    batch_size = 0
                self._rotate()
            batch.append(line)
            batch_size += size
            if batch_size >= 1 << 20:
                self._write_all(b"".join(batch))
                batch.clear()
                batch_size = 0
        if batch:
            self._write_all(b"".join(batch))

    def _backup_name(self) -> Path:
        now = self._clock()
        if now.tzinfo is not None:
            now = now.astimezone(UTC).replace(tzinfo=None)
        ms = (now - _EPOCH_NAIVE) // timedelta(milliseconds=1)
        if self._last_backup_ms is not None and ms <= self._last_backup_ms:
            ms = self._last_backup_ms + 1
        while True:
            stamp = (_EPOCH_NAIVE + timedelta(milliseconds=ms)).strftime(_BACKUP_FORMAT)[:-3]
            candidate = self.path.with_name(f"{self._stem}-{stamp}{self._ext}")
            if not candidate.exists() and not candidate.with_name(candidate.name + ".gz").exists():
                self._last_backup_ms = ms
                return candidate
            ms += 1

    def _rotate(self) -> None:
        mode = 0o600  # lumberjack's default when there was no file
        if self._fd is not None:
            mode = os.fstat(self._fd).st_mode & 0o7777
            os.close(self._fd)
            self._fd = None
        backup = self._backup_name()
        os.rename(self.path, backup)
        self._open(mode)
        self._rotations += 1
        if self.mill:
            self._request_mill()
            return
        if self.compress:
            compressed = backup.with_name(backup.name + ".gz")
            with backup.open("rb") as source, gzip.open(compressed, "wb", compresslevel=6) as target:
                shutil.copyfileobj(source, target, 1 << 20)
            backup.unlink()
        if self.max_backups is not None:
            self._remove_old_backups(self.max_backups)

    def backups(self) -> list[Path]:
        """Rotated files (``.log`` or ``.log.gz``), oldest first."""
        found: list[tuple[str, str, Path]] = []
        for entry in self.path.parent.iterdir():
            match = self._backup_re.fullmatch(entry.name)
            if match is not None:
                found.append((match.group(1), entry.name, entry))
        found.sort()
        return [entry for _, _, entry in found]

    def _remove_old_backups(self, keep: int) -> None:
        by_stamp: dict[str, list[Path]] = {}
        for backup in self.backups():
            match = self._backup_re.fullmatch(backup.name)
            assert match is not None
            by_stamp.setdefault(match.group(1), []).append(backup)
        stamps = sorted(by_stamp)
        for stamp in stamps[: max(0, len(stamps) - keep)]:
            for old in by_stamp[stamp]:
                old.unlink(missing_ok=True)

    # -- lumberjack's mill (mill=True) ------------------------------------------------------------------------

    def _request_mill(self) -> None:
        # lumberjack: `select { case l.millCh <- true: default: }` on a channel of capacity 1.
        with self._mill_cond:
            self._mill_queued = True
            if self._mill_thread is None:
                self._mill_thread = threading.Thread(target=self._mill_loop, name="auditgen-mill", daemon=True)
                self._mill_thread.start()
            self._mill_cond.notify_all()

    def _mill_loop(self) -> None:
        while True:
            with self._mill_cond:
                while not self._mill_queued and not self._mill_closing:
                    self._mill_cond.wait()
                if not self._mill_queued:
                    return
                self._mill_queued = False
                self._mill_running = True
            try:
                self._mill_run_once()
            finally:
                with self._mill_cond:
                    self._mill_running = False
                    self._mill_cond.notify_all()

    def _mill_run_once(self) -> None:
        files = sorted(self.backups(), key=lambda p: self._stamp(p), reverse=True)  # newest first
        remaining = files
        if self.max_backups is not None:
            preserved: set[str] = set()
            remaining = []
            for path in files:
                preserved.add(path.name.removesuffix(".gz"))
                if len(preserved) > self.max_backups:
                    self._mill_do(path.unlink)
                else:
                    remaining.append(path)
        if self.compress:
            for path in remaining:
                if not path.name.endswith(".gz"):
                    self._mill_do(functools.partial(self._compress_file, path))

    def _stamp(self, path: Path) -> str:
        match = self._backup_re.fullmatch(path.name)
        assert match is not None
        return match.group(1)

    def _mill_do(self, action: Callable[[], None]) -> None:
        try:
            action()
        except OSError as e:
            self.mill_errors.append(e)

    @staticmethod
    def _compress_file(source: Path) -> None:
        target = source.with_name(source.name + ".gz")
        with source.open("rb") as src:
            mode = os.fstat(src.fileno()).st_mode & 0o7777
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            try:
                with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) as gz:
                    shutil.copyfileobj(src, gz, 1 << 20)
            except BaseException:
                target.unlink(missing_ok=True)  # lumberjack removes a partial .gz
                raise
        source.unlink()

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until the mill has nothing queued or running. True if it is idle."""
        with self._mill_cond:
            return self._mill_cond.wait_for(lambda: not self._mill_queued and not self._mill_running, timeout)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with self._mill_cond:
            self._mill_closing = True
            self._mill_cond.notify_all()
            thread = self._mill_thread
        if thread is not None:
            thread.join()  # the pass queued last runs first: nothing is left half done

    def __enter__(self) -> RotatingAuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pyforward.auditgen", description="Write a synthetic kube-apiserver audit log."
    )
    parser.add_argument("--count", type=int, required=True, help="number of events")
    parser.add_argument("--out", type=Path, required=True, help="output file ('-' for stdout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--id-prefix", default="", help="prefix of every auditID")
    parser.add_argument("--rate", type=float, default=None, help="events per second of log time")
    args = parser.parse_args(argv)
    events = generate_events(args.count, seed=args.seed, rate_per_second=args.rate, id_prefix=args.id_prefix)
    total = 0
    with open(sys.stdout.fileno(), "wb", closefd=False) if str(args.out) == "-" else args.out.open("wb") as out:
        batch: list[bytes] = []
        for line in events:
            batch.append(line)
            if len(batch) == 4096:
                data = b"".join(batch)
                out.write(data)
                total += len(data)
                batch.clear()
        data = b"".join(batch)
        out.write(data)
        total += len(data)
    print(f"auditgen: wrote {args.count} events ({total} bytes) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
