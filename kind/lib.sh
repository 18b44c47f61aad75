# shellcheck shell=bash
# Shared steps of the kind scenarios. Sourced by scenario-*.sh; not run on its own.
#
# Environment:
#   KIND_CLUSTER   cluster name (default: pyforward)
#   SKIP_BUILD=1   do not build and load the images (they are already in the cluster)
#   TIMEOUT        seconds to wait for the probe event at the receiver (default: 180)
#   KEEP_CERTS=1   keep certificates across runs (default: reuse kind/.work/certs when present)

set -euo pipefail

KIND_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$KIND_DIR/.." && pwd)"
WORK_DIR="$KIND_DIR/.work"
CERT_DIR="$WORK_DIR/certs"
CLUSTER="${KIND_CLUSTER:-pyforward}"
CONTEXT="kind-$CLUSTER"
IMAGE="pyforward:kind"
PROXY_IMAGE="pyforward-proxy:kind"
TIMEOUT="${TIMEOUT:-180}"
SCENARIO_START="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

say() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }
fail() {
    printf '\n\033[31mFAILED: %s\033[0m\n' "$*" >&2
    exit 1
}
k() { kubectl --context "$CONTEXT" "$@"; }

require_tools() {
    local missing=()
    for tool in kind kubectl docker openssl; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    [[ ${#missing[@]} -eq 0 ]] || fail "missing tools: ${missing[*]} (see kind/README.md, Prerequisites)"
}

# --- cluster and images -------------------------------------------------------------------------------------------
ensure_cluster() {
    if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
        say "kind cluster $CLUSTER exists"
    else
        say "creating kind cluster $CLUSTER (kube-apiserver with an audit log)"
        # extraMounts resolves ./audit-policy.yaml against the working directory.
        (cd "$KIND_DIR/cluster" && kind create cluster --name "$CLUSTER" --config kind-config.yaml --wait 180s)
    fi
    k get nodes -o wide >&2
    # The API server must be writing its audit log before anything can be shipped.
    local node="$CLUSTER-control-plane"
    docker exec "$node" test -s /var/log/kubernetes/audit/audit.log ||
        fail "the API server writes no audit log: docker exec $node ls -la /var/log/kubernetes/audit"
}

build_images() {
    if [[ "${SKIP_BUILD:-0}" == 1 ]]; then
        say "SKIP_BUILD=1: using the images already loaded into $CLUSTER"
        return
    fi
    say "building $IMAGE and $PROXY_IMAGE"
    DOCKER_BUILDKIT=1 docker build -t "$IMAGE" "$REPO_DIR"
    DOCKER_BUILDKIT=1 docker build -t "$PROXY_IMAGE" "$KIND_DIR/proxy"
    say "loading the images into the kind node"
    kind load docker-image --name "$CLUSTER" "$IMAGE" "$PROXY_IMAGE"
}

# --- certificates (openssl; EC P-256; valid 90 days) --------------------------------------------------------------
# new_ca DIR COMMON_NAME
new_ca() {
    local dir="$1" cn="$2"
    mkdir -p "$dir"
    cat >"$dir/ca.cnf" <<EOF
[req]
distinguished_name = dn
x509_extensions = v3_ca
prompt = no
[dn]
O = pyforward kind
CN = $cn
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
    openssl ecparam -name prime256v1 -genkey -noout -out "$dir/ca.key"
    openssl req -x509 -new -sha256 -days 90 -key "$dir/ca.key" -config "$dir/ca.cnf" -out "$dir/ca.crt"
}

# new_leaf CA_DIR OUT_PREFIX COMMON_NAME serverAuth|clientAuth [DNS names...]
new_leaf() {
    local ca_dir="$1" out="$2" cn="$3" usage="$4"
    shift 4
    local san="" name
    for name in "$@"; do san="${san:+$san, }DNS:$name"; done
    cat >"$out.cnf" <<EOF
[req]
distinguished_name = dn
prompt = no
[dn]
O = pyforward kind
CN = $cn
[v3]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = $usage
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
${san:+subjectAltName = $san}
EOF
    openssl ecparam -name prime256v1 -genkey -noout -out "$out.key"
    openssl req -new -sha256 -key "$out.key" -config "$out.cnf" -out "$out.csr"
    openssl x509 -req -sha256 -days 90 -in "$out.csr" -CA "$ca_dir/ca.crt" -CAkey "$ca_dir/ca.key" \
        -CAcreateserial -extfile "$out.cnf" -extensions v3 -out "$out.crt" 2>/dev/null
    chmod 600 "$out.key"
}

ensure_certs() {
    if [[ -s "$CERT_DIR/receiver/client.crt" && -s "$CERT_DIR/proxy/client.crt" ]]; then
        say "reusing certificates in $CERT_DIR"
        return
    fi
    say "generating certificates in $CERT_DIR"
    rm -rf "$CERT_DIR"
    # The receiver's CA: the audittailer's server certificate and pyforward's client certificate.
    new_ca "$CERT_DIR/receiver" "pyforward kind audit CA"
    new_leaf "$CERT_DIR/receiver" "$CERT_DIR/receiver/server" audittailer serverAuth \
        audittailer audittailer.audit audittailer.audit.svc audittailer.audit.svc.cluster.local
    new_leaf "$CERT_DIR/receiver" "$CERT_DIR/receiver/client" audittailer-client clientAuth
    # The mTLS proxy's own CA (a separate trust domain, as in Gardener).
    new_ca "$CERT_DIR/proxy" "pyforward kind proxy CA"
    new_leaf "$CERT_DIR/proxy" "$CERT_DIR/proxy/server" vpn-seed-server serverAuth \
        vpn-seed-server vpn-seed-server.pyforward vpn-seed-server.pyforward.svc \
        vpn-seed-server.pyforward.svc.cluster.local
    new_leaf "$CERT_DIR/proxy" "$CERT_DIR/proxy/client" pyforward-proxy-client clientAuth
    openssl verify -CAfile "$CERT_DIR/receiver/ca.crt" "$CERT_DIR/receiver/server.crt" "$CERT_DIR/receiver/client.crt" >&2
    openssl verify -CAfile "$CERT_DIR/proxy/ca.crt" "$CERT_DIR/proxy/server.crt" "$CERT_DIR/proxy/client.crt" >&2
}

# apply_secret NAMESPACE NAME KEY=FILE...
apply_secret() {
    local ns="$1" name="$2"
    shift 2
    local args=() pair
    for pair in "$@"; do args+=("--from-file=$pair"); done
    k -n "$ns" create secret generic "$name" "${args[@]}" --dry-run=client -o yaml | k apply -f - >&2
}

# --- the receiver side --------------------------------------------------------------------------------------------
ensure_receiver() {
    say "namespaces, RBAC, Secrets and the audittailer receiver"
    k apply -f "$KIND_DIR/manifests/00-namespaces.yaml" >&2
    local r="$CERT_DIR/receiver" p="$CERT_DIR/proxy"
    apply_secret audit audittailer-server tls.crt="$r/server.crt" tls.key="$r/server.key" ca.crt="$r/ca.crt"
    # Production layout of the client Secret: ca.crt / tls.crt / tls.key (AUDIT_TLS_*_FILE name the keys).
    apply_secret audit audittailer-client ca.crt="$r/ca.crt" tls.crt="$r/client.crt" tls.key="$r/client.key"
    apply_secret pyforward vpn-seed-server-tls tls.crt="$p/server.crt" tls.key="$p/server.key" ca.crt="$p/ca.crt"
    apply_secret pyforward vpn-seed-server-ca ca.crt="$p/ca.crt"
    apply_secret pyforward pyforward-proxy-client tls.crt="$p/client.crt" tls.key="$p/client.key"
    k apply -f "$KIND_DIR/manifests/10-receiver.yaml" \
        -f "$KIND_DIR/manifests/20-sender-rbac.yaml" \
        -f "$KIND_DIR/manifests/30-tinyproxy-config.yaml" >&2
    k -n audit rollout status deployment/audittailer --timeout=180s >&2 || {
        dump_diagnostics
        fail "the audittailer receiver did not start"
    }
}

# --- the sender ---------------------------------------------------------------------------------------------------
# use_sender MANIFEST DEPLOYMENT: exactly one sender runs at a time, so that what arrives came this way.
use_sender() {
    local manifest="$1" deployment="$2" other
    for other in $(k -n pyforward get deployments -l app.kubernetes.io/component=sender -o name); do
        if [[ "$other" != "deployment.apps/$deployment" ]]; then
            say "stopping the other sender $other"
            k -n pyforward delete "$other" --wait=true >&2
        fi
    done
    say "starting $deployment ($(basename "$manifest"))"
    k apply -f "$KIND_DIR/manifests/$manifest" >&2
    k -n pyforward rollout status "deployment/$deployment" --timeout=180s >&2 || {
        dump_diagnostics "$deployment"
        fail "$deployment did not start"
    }
}

# --- checks -------------------------------------------------------------------------------------------------------
# verify_delivery DEPLOYMENT: make a uniquely named API request now and wait until its audit event is printed by
# the receiver.
verify_delivery() {
    local deployment="$1"
    local marker
    marker="pyforward-probe-$(date +%s)-$RANDOM"
    say "probe: creating and deleting ConfigMap pyforward/$marker (two audit events)"
    k -n pyforward create configmap "$marker" --from-literal=probe=1 >&2
    k -n pyforward delete configmap "$marker" >&2
    say "waiting up to ${TIMEOUT}s for its audit event in the receiver's output"
    local deadline=$((SECONDS + TIMEOUT)) line=""
    while ((SECONDS < deadline)); do
        line="$(k -n audit logs deployment/audittailer --since-time="$SCENARIO_START" 2>/dev/null |
            grep -F "$marker" | grep -F '"audit.k8s.io/v1"' | head -n 1 || true)"
        [[ -n "$line" ]] && break
        sleep 2
    done
    if [[ -z "$line" ]]; then
        dump_diagnostics "$deployment"
        fail "no audit event for $marker reached the receiver within ${TIMEOUT}s"
    fi
    local events
    events="$(k -n audit logs deployment/audittailer --since-time="$SCENARIO_START" 2>/dev/null |
        grep -c '"audit.k8s.io/v1"' || true)"
    say "OK: the receiver printed the probe's audit event ($events audit events since $SCENARIO_START):"
    printf '%s\n' "${line:0:400}"
}

# show_metrics DEPLOYMENT: the sender's own view (connected, acked chunks, backlog), from its /metrics.
show_metrics() {
    local deployment="$1"
    say "metrics of $deployment"
    k -n pyforward exec "deployment/$deployment" -c pyforward -- python -c \
        'import urllib.request as u; print(u.urlopen("http://127.0.0.1:9090/metrics", timeout=5).read().decode())' |
        grep -E '^pyforward_(connected|chunks_acked_total|records_acked_total|backlog_bytes|rotations_total|parse_errors_total|truncated_lines_total) ' ||
        fail "cannot read the metrics of $deployment"
}

# verify_proxy_used DEPLOYMENT CONTAINER: tinyproxy logged a CONNECT to the receiver's Forward port.
verify_proxy_used() {
    local deployment="$1" container="$2"
    local log
    log="$(k -n pyforward logs "deployment/$deployment" -c "$container" --since-time="$SCENARIO_START" 2>/dev/null |
        grep -E 'Request \(file descriptor [0-9]+\): CONNECT [^ ]+:24224 ' | tail -n 1 || true)"
    [[ -n "$log" ]] || {
        dump_diagnostics "$deployment"
        fail "the proxy ($deployment/$container) logged no CONNECT to port 24224"
    }
    say "OK: the traffic went through the proxy:"
    printf '%s\n' "$log"
}

dump_diagnostics() {
    local deployment="${1:-}"
    say "diagnostics"
    k get pods -A -o wide >&2 || true
    k -n audit logs deployment/audittailer --tail=30 >&2 || true
    if [[ -n "$deployment" ]]; then
        k -n pyforward describe "deployment/$deployment" >&2 || true
        k -n pyforward logs "deployment/$deployment" --all-containers --prefix --tail=60 >&2 || true
    fi
}
