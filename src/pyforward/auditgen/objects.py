"""The Kubernetes objects that RequestResponse events carry as request and response: a ConfigMap and a Pod as a
controller writes them (managedFields included), with a ``@@rv@@`` hole for the resourceVersion of the response."""

from __future__ import annotations

import random
from typing import Any

import orjson

from pyforward.auditgen.pools import NODES, uid


def managed_fields(manager: str, operation: str, fields: dict[str, Any]) -> list[dict[str, Any]]:
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


def configmap(rng: random.Random, namespace: str, app: str, rv: str | None) -> dict[str, Any]:
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
                "uid": uid(rng),
                "resourceVersion": rv,
                "creationTimestamp": "2026-10-01T08:15:30Z",
                "managedFields": managed_fields(
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


def pod_spec(app: str, node: str | None) -> dict[str, Any]:
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


def pod(rng: random.Random, namespace: str, app: str, rv: str | None) -> dict[str, Any]:
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
                "uid": uid(rng),
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    pod: dict[str, Any] = {"kind": "Pod", "apiVersion": "v1", "metadata": meta}
    if rv is None:
        pod["spec"] = pod_spec(app, None)
        pod["status"] = {}
        return pod
    meta.update(
        {
            "uid": uid(rng),
            "resourceVersion": rv,
            "creationTimestamp": "2026-11-26T11:58:02Z",
            "managedFields": managed_fields(
                "kube-controller-manager",
                "Update",
                {
                    "f:metadata": {
                        "f:generateName": {},
                        "f:labels": {".": {}, "f:app.kubernetes.io/name": {}, "f:pod-template-hash": {}},
                        "f:ownerReferences": {".": {}, f'k:{{"uid":"{uid(rng)}"}}': {}},
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
    pod["spec"] = pod_spec(app, rng.choice(NODES))
    pod["status"] = {"phase": "Pending", "qosClass": "Burstable"}
    return pod
