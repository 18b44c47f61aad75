#!/usr/bin/env bash
# Scenario a: kube-apiserver audit log -> pyforward (on the control-plane node) -> mTLS -> audittailer.
# Usage: kind/scenario-a-direct.sh     (see kind/README.md; KIND_CLUSTER, SKIP_BUILD, TIMEOUT)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

require_tools
ensure_cluster
build_images
ensure_certs
ensure_receiver
use_sender scenario-a-direct.yaml pyforward-direct
verify_delivery pyforward-direct
show_metrics pyforward-direct
say "scenario a (direct mTLS) passed"
