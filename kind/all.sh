#!/usr/bin/env bash
# All three scenarios, one after the other, on one cluster (images built once).
# Usage: kind/all.sh     then kind/down.sh to delete the cluster.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/scenario-a-direct.sh"
SKIP_BUILD=1 "$here/scenario-b-konnectivity-uds.sh"
SKIP_BUILD=1 "$here/scenario-c-mtls-proxy.sh"
printf '\n\033[1mall kind scenarios passed\033[0m\n'
