#!/usr/bin/env bash
# Scenario c: audit log -> pyforward -> mTLS to an HTTP CONNECT proxy (vpn-seed-server: socat + tinyproxy)
# -> mTLS to the receiver inside the tunnel (TLS inside TLS) -> audittailer.
# Usage: kind/scenario-c-mtls-proxy.sh     (see kind/README.md; KIND_CLUSTER, SKIP_BUILD, TIMEOUT)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

require_tools
ensure_cluster
build_images
ensure_certs
ensure_receiver
say "starting the mTLS proxy and the sender"
use_sender scenario-c-mtls-proxy.yaml pyforward-mtls-proxy
k -n pyforward rollout status deployment/vpn-seed-server --timeout=180s >&2 || {
    dump_diagnostics pyforward-mtls-proxy
    fail "the mTLS proxy (vpn-seed-server) did not start"
}
verify_delivery pyforward-mtls-proxy
verify_proxy_used vpn-seed-server tinyproxy
show_metrics pyforward-mtls-proxy
say "scenario c (mTLS proxy) passed"
