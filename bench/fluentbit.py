"""fluent-bit side by side: the shipper pyforward replaces, measured in the same run where the machine has it.

audit-forwarder ran fluent-bit with a fixed configuration (shared/reference/audit-forwarder.md, "What its fluent-bit
did"): tail with a JSON parser and `stageTimestamp` as the time key, read from the head, an offsets DB; forward with
acks, gzip and TLS with verification and a client certificate. `config` writes that configuration for the bench's
log, sink and certificates, so fluent-bit ships the same events over the same kind of connection to the same sink.

The binary: `--fluent-bit PATH`, else $FLUENT_BIT, else `fluent-bit` on PATH or where its packages install it. Where
there is none (it is not installable on every machine), the bench prints the figures it compares with instead and
where they come from (REFERENCE).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

#: fluent-bit 5.1.1 with audit-forwarder's configuration, measured on this machine kind (2 cores) when no binary is
#: here to measure: (figure, value, where it was measured). The figures' keys are the bench's own, prefixed fb_.
REFERENCE: dict[str, tuple[float, str]] = {
    "fb_throughput_eps": (31_600.0, "issue 7: 200,000 events (210 MB) to a fast receiver on loopback"),
    "fb_cpu_us_per_event": (39.0, "issue 7"),
    "fb_peak_rss_mb": (147.0, "issue 7"),
    "fb_latency_p99_ms": (999.0, "issue 11: append->ack p99 at 1,000 events/s (its 1 s flush)"),
    "steady_idle_fb_cpu": (0.0, "issue 11: CPU share of a core over 20 s after a warm-up"),
    "steady_100_fb_cpu": (0.015, "issue 11"),
    "steady_1000_fb_cpu": (0.08, "issue 11"),
}

#: Where fluent-bit's own packages put the binary (td-agent-bit, fluent-bit deb/rpm), besides PATH.
PACKAGE_PATHS = ("/opt/fluent-bit/bin/fluent-bit", "/opt/td-agent-bit/bin/td-agent-bit")


def find(setting: str | None) -> Path | None:
    """The fluent-bit to measure: `setting` (the --fluent-bit flag; "" or "none": do not), $FLUENT_BIT, PATH."""
    if setting is not None:
        return None if setting in ("", "none") else Path(setting)
    if os.environ.get("FLUENT_BIT"):
        return Path(os.environ["FLUENT_BIT"])
    found = shutil.which("fluent-bit")
    if found:
        return Path(found)
    return next((Path(p) for p in PACKAGE_PATHS if os.access(p, os.X_OK)), None)


def version(binary: Path) -> str:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SystemExit(f"bench: cannot run fluent-bit {binary}: {e}") from e
    return out.splitlines()[0].strip() if out.strip() else "?"


def config(directory: Path, log_path: Path, port: int, certs: Any) -> list[str]:
    """audit-forwarder's fluent-bit configuration for this log and sink, written into `directory`; the arguments
    to start fluent-bit with it."""
    parsers = directory / "parsers.conf"
    parsers.write_text(
        "[PARSER]\n"
        "    Name        audit\n"
        "    Format      json\n"
        "    Time_Key    stageTimestamp\n"
        "    Time_Format %Y-%m-%dT%H:%M:%S.%LZ\n"
        "    Time_Keep   On\n"
    )
    main = directory / "fluent-bit.conf"
    main.write_text(
        "[SERVICE]\n"
        "    Flush        1\n"
        "    Log_Level    warn\n"
        f"    Parsers_File {parsers}\n"
        "[INPUT]\n"
        "    Name              tail\n"
        f"    Path              {log_path}\n"
        "    Tag               audit\n"
        "    Parser            audit\n"
        f"    DB                {directory / 'fluent-bit.db'}\n"
        "    Read_from_Head    On\n"
        "    Buffer_Chunk_Size 2MB\n"
        "    Buffer_Max_Size   10MB\n"
        "    Skip_Long_Lines   On\n"
        "    Mem_Buf_Limit     200MB\n"
        "[OUTPUT]\n"
        "    Name                 forward\n"
        "    Match                *\n"
        "    Host                 127.0.0.1\n"
        f"    Port                 {port}\n"
        "    Require_ack_response True\n"
        "    Compress             gzip\n"
        "    tls                  On\n"
        "    tls.verify           On\n"
        f"    tls.ca_file          {certs.ca}\n"
        f"    tls.crt_file         {certs.client_cert}\n"
        f"    tls.key_file         {certs.client_key}\n"
        "    tls.vhost            localhost\n"
    )
    return ["-c", str(main)]


def reference_lines() -> list[str]:
    """What the table compares with when no fluent-bit is measured, and where each figure comes from."""
    lines = [
        "fluent-bit: not measured (no binary: --fluent-bit PATH, $FLUENT_BIT or fluent-bit on PATH); the figures "
        "compared with are fluent-bit 5.1.1 with audit-forwarder's configuration on this machine kind:"
    ]
    for key, (value, where) in REFERENCE.items():
        lines.append(f"  {key} = {value:g}  ({where})")
    return lines
