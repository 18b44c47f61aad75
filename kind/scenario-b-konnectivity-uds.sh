#!/usr/bin/env bash
# Scenario b: audit log -> pyforward -> HTTP CONNECT over a Unix socket (konnectivity-style: socat + tinyproxy)
# -> mTLS inside the tunnel -> audittailer.
# Usage: kind/scenario-b-konnectivity-uds.sh     (see kind/README.md; KIND_CLUSTER, SKIP_BUILD, TIMEOUT)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

require_tools
ensure_cluster
build_images
ensure_certs
ensure_receiver
use_sender scenario-b-konnectivity-uds.yaml pyforward-uds
verify_delivery pyforward-uds
verify_proxy_used pyforward-uds tinyproxy
show_metrics pyforward-uds
say "scenario b (konnectivity Unix socket) passed"
