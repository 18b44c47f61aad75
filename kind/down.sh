#!/usr/bin/env bash
# Delete the scenarios' kind cluster and the generated certificates.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
kind delete cluster --name "${KIND_CLUSTER:-pyforward}"
rm -rf "$here/.work"
