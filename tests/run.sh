#!/usr/bin/env bash
# The whole test suite, from a fresh machine with only Python: installs what the tests need that is missing
# (Debian: socat, tinyproxy; npm: @fluent-org/logger for interop; Python: the package with its test extras),
# then runs ruff, mypy --strict and pytest. Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for tool in socat tinyproxy; do command -v "$tool" >/dev/null 2>&1 || need_apt+=("$tool"); done
if ! command -v node >/dev/null 2>&1; then need_apt+=(nodejs npm); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "tests/run.sh: installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

echo "tests/run.sh: installing pyforward with its test extras"
python3 -m pip install -q --disable-pip-version-check -e ".[test,fast,bench]" 2>&1 | grep -v -E "^(WARNING: Running pip as|WARNING: Location)" || true

if [ -f tests/interop/node/package.json ] && [ ! -d tests/interop/node/node_modules ]; then
  echo "tests/run.sh: installing node packages for interop tests"
  (cd tests/interop/node && npm ci --no-audit --no-fund --loglevel=error)
fi

echo "tests/run.sh: ruff"
python3 -m ruff check src tests bench
echo "tests/run.sh: mypy --strict"
python3 -m mypy
echo "tests/run.sh: pytest"
python3 -m pytest -n 2 --dist loadgroup -q "$@"
