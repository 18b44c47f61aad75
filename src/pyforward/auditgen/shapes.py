"""The events' shapes: pools (users, nodes, resources) and Metadata / RequestResponse events, each serialised
once into a byte template with holes (see the package's doc)."""

from __future__ import annotations

import random
import re
from functools import cache
from typing import Any, Final

import orjson

_HOLES: Final = ("aid", "rts", "sts", "rv", "sfx")
_HOLE_RE: Final = re.compile(rb"@@(" + b"|".join(h.encode() for h in _HOLES) + rb")@@")

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
