"""The bench's fluent-bit side (bench/fluentbit.py, issue 23): found by --fluent-bit, $FLUENT_BIT or PATH, measured in
the same run as pyforward; where there is none, the reference figures are printed with where they come from.

fluent-bit is not installable on this machine kind, so the measured path runs against a stand-in: an executable
named fluent-bit that reads the configuration the bench wrote (its file alone: the bench gives it no PYFORWARD_*
variable) and ships the log it names with `pyforward run` to the host, port and certificates it names. What is tested
is the bench's side: the binary found and started with its configuration, its process measured, the figures named
fb_* in the table and the JSON; not fluent-bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

STAND_IN = """#!{python}
import os, sys
if sys.argv[1:] == ["--version"]:
    print("Fluent Bit v0.0.0 (stand-in: pyforward run)")
    raise SystemExit(0)
assert sys.argv[1] == "-c", sys.argv
assert not any(k.startswith("PYFORWARD_") for k in os.environ), "the bench configures fluent-bit by its file"
conf = {{}}
for line in open(sys.argv[2]):
    key, _, value = line.strip().partition(" ")
    if value:
        conf[key.lower()] = value.strip()
assert conf["require_ack_response"] == "True" and conf["compress"] == "gzip" and conf["tls.verify"] == "On", conf
env = dict(
    os.environ,
    PYFORWARD_LOG_PATH=conf["path"],
    PYFORWARD_CHECKPOINT_PATH=conf["db"],
    PYFORWARD_START_AT="head",
    PYFORWARD_HOST=conf["host"],
    PYFORWARD_PORT=conf["port"],
    PYFORWARD_TLS="true",
    PYFORWARD_TLS_CA_FILE=conf["tls.ca_file"],
    PYFORWARD_TLS_CERT_FILE=conf["tls.crt_file"],
    PYFORWARD_TLS_KEY_FILE=conf["tls.key_file"],
    PYFORWARD_TLS_SERVER_NAME=conf["tls.vhost"],
    PYFORWARD_LOG_LEVEL="warning",
)
os.execve(sys.executable, [sys.executable, "-m", "pyforward", "run"], env)
"""


def bench(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    argv = [
        sys.executable, "-m", "bench", "--small", "--only", "throughput,steady", "--steady-rates", "100",
        "--out", str(tmp_path / "results"), "--cache", str(tmp_path), *extra,
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=170, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result,) = (tmp_path / "results").glob("*-small.json")
    return done.stdout, json.loads(result.read_text())


@pytest.mark.timeout(180)
@pytest.mark.xdist_group("bench")
def test_a_fluent_bit_found_is_measured_in_the_same_run(tmp_path: Path) -> None:
    binary = tmp_path / "bin" / "fluent-bit"
    binary.parent.mkdir()
    binary.write_text(STAND_IN.format(python=sys.executable))
    binary.chmod(0o755)
    # Found on PATH, as an installed fluent-bit would be.
    env = {**os.environ, "PATH": f"{binary.parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("FLUENT_BIT", None)
    out, result = bench(tmp_path, env=env)
    medians = result["medians"]
    for key in ("fb_throughput_eps", "fb_cpu_us_per_event", "fb_peak_rss_mb", "steady_100_fb_cpu"):
        assert medians[key] > 0, key
    assert medians["steady_100_fb_p99_ms"] > 0
    assert result["fluent_bit"] == {
        "binary": str(binary),
        "version": "Fluent Bit v0.0.0 (stand-in: pyforward run)",
        "reference": result["fluent_bit"]["reference"],
    }
    assert "fluent-bit, same corpus and sink (events/s)" in out
    assert f"fluent-bit: {binary} (Fluent Bit v0.0.0 (stand-in: pyforward run))" in out
    assert "not measured" not in out


@pytest.mark.timeout(180)
@pytest.mark.xdist_group("bench")
def test_without_fluent_bit_the_reference_figures_are_printed_with_their_source(tmp_path: Path) -> None:
    out, result = bench(tmp_path, "--fluent-bit", "none")
    assert not any(key.startswith("fb_") or "_fb_" in key for key in result["medians"])
    assert result["fluent_bit"]["binary"] is None
    assert "fluent-bit: not measured (no binary: --fluent-bit PATH, $FLUENT_BIT or fluent-bit on PATH)" in out
    assert "  fb_throughput_eps = 31600  (issue 7: 200,000 events (210 MB) to a fast receiver on loopback)" in out
    assert "  steady_100_fb_cpu = 0.015  (issue 11)" in out
