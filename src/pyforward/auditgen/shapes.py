"""The events' shapes: pools (users, nodes, resources) and Metadata / RequestResponse events, each serialised
once into a byte template with holes (see the package's doc)."""

from __future__ import annotations

import random
import re
from functools import cache
from typing import Any, Final

import orjson

from pyforward.auditgen.objects import configmap, pod
from pyforward.auditgen.pools import APPS, CONTROLLERS, HUMANS, K8S_COMMIT, K8S_VERSION, NAMESPACES, NODES, ip, uid

_HOLES: Final = ("aid", "rts", "sts", "rv", "sfx")
_HOLE_RE: Final = re.compile(rb"@@(" + b"|".join(h.encode() for h in _HOLES) + rb")@@")


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
        "uid": uid(rng),
        "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
    }
    if node is not None:  # bound token projected into a pod: kube-apiserver >= 1.30 adds these extras
        user["extra"] = {
            "authentication.kubernetes.io/credential-id": [f"JTI={uid(rng)}"],
            "authentication.kubernetes.io/node-name": [node],
            "authentication.kubernetes.io/node-uid": [uid(rng)],
            "authentication.kubernetes.io/pod-name": [f"{name}-@@sfx@@"],
            "authentication.kubernetes.io/pod-uid": [uid(rng)],
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
                    source_ip=ip(rng),
                    user_agent=f"{component}/{K8S_VERSION} (linux/amd64) kubernetes/{K8S_COMMIT}/leader-election",
                    object_ref={
                        "resource": "leases",
                        "namespace": "kube-system",
                        "name": component,
                        "uid": uid(rng),
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
    for node in NODES:
        node_user = {"username": f"system:node:{node}", "groups": ["system:nodes", "system:authenticated"]}
        kubelet_ua = f"kubelet/{K8S_VERSION} (linux/amd64) kubernetes/{K8S_COMMIT}"
        node_annotations = {allow: "allow", reason: ""}
        node_shapes.append(
            _event(
                level="Metadata",
                uri=f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node}?timeout=10s",
                verb="update",
                user=node_user,
                source_ip=ip(rng),
                user_agent=kubelet_ua,
                object_ref={
                    "resource": "leases",
                    "namespace": "kube-node-lease",
                    "name": node,
                    "uid": uid(rng),
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
                source_ip=ip(rng),
                user_agent=kubelet_ua,
                object_ref={"resource": "nodes", "name": node, "apiVersion": "v1", "subresource": "status"},
                code=200,
                annotations=node_annotations,
            )
        )
        namespace = rng.choice(NAMESPACES)
        app = rng.choice(APPS)
        node_shapes.append(
            _event(
                level="Metadata",
                uri=f"/api/v1/namespaces/{namespace}/configmaps?fieldSelector=metadata.name%3D{app}-config"
                f"&limit=500&resourceVersion=0",
                verb="list",
                user=node_user,
                source_ip=ip(rng),
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
    for controller in CONTROLLERS:
        namespace = rng.choice(NAMESPACES)
        app = rng.choice(APPS)
        resource, group, version = rng.choice(
            [("pods", "", "v1"), ("replicasets", "apps", "v1"), ("endpointslices", "discovery.k8s.io", "v1")]
        )
        prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
        verb = rng.choice(["get", "update", "patch", "delete"])
        ref: dict[str, Any] = {"resource": resource, "namespace": namespace, "name": f"{app}-@@sfx@@"}
        if verb != "get":
            ref["uid"] = uid(rng)
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
                user=_sa_user(rng, "kube-system", controller, node=rng.choice(NODES)),
                source_ip=ip(rng),
                user_agent=f"kube-controller-manager/{K8S_VERSION} (linux/amd64) kubernetes/{K8S_COMMIT}"
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
                source_ip=ip(rng),
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
    for username, groups in HUMANS:
        namespace = rng.choice(NAMESPACES[1:])
        app = rng.choice(APPS)
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
                    "uid": uid(rng),
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


def _request_response_shapes(rng: random.Random) -> list[dict[str, Any]]:
    shapes: list[dict[str, Any]] = []
    allow = "authorization.k8s.io/decision"
    reason = "authorization.k8s.io/reason"
    for namespace in ("payments", "frontend", "data-pipeline"):
        app = rng.choice(APPS)
        username, groups = rng.choice(HUMANS)
        shapes.append(
            _event(
                level="RequestResponse",
                uri=f"/api/v1/namespaces/{namespace}/configmaps/{app}-config?fieldManager=argocd-controller",
                verb="update",
                user=_sa_user(rng, "argocd", "argocd-application-controller", node=rng.choice(NODES)),
                source_ip=ip(rng),
                user_agent="argocd-application-controller/v2.13.1+af54ef8 (linux/amd64) kubernetes/af54ef8",
                object_ref={
                    "resource": "configmaps",
                    "namespace": namespace,
                    "name": f"{app}-config",
                    "uid": uid(rng),
                    "apiVersion": "v1",
                    "resourceVersion": "@@rv@@",
                },
                code=200,
                request_object=configmap(rng, namespace, app, None),
                response_object=configmap(rng, namespace, app, "@@rv@@"),
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
                user=_sa_user(rng, "kube-system", "replicaset-controller", node=rng.choice(NODES)),
                source_ip=ip(rng),
                user_agent=f"kube-controller-manager/{K8S_VERSION} (linux/amd64) kubernetes/{K8S_COMMIT}"
                "/system:serviceaccount:kube-system:replicaset-controller",
                object_ref={
                    "resource": "pods",
                    "namespace": namespace,
                    "name": f"{app}-7c9f6d8b4d-@@sfx@@",
                    "apiVersion": "v1",
                },
                code=201,
                status={"metadata": {}, "code": 201},
                request_object=pod(rng, namespace, app, None),
                response_object=pod(rng, namespace, app, "@@rv@@"),
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
