"""The writer container of the image tests: appends audit events to a log rotated the way kube-apiserver's
lumberjack does, at a steady pace, so that the sidecar ships while files rotate (and while it is restarted).

Runs inside the image under test (``docker run --entrypoint python ... /writer/writer.py``) with its own
pyforward.auditgen. The events are those of ``generate_events(count, seed=seed, id_prefix=prefix)``: the test
computes the same auditIDs on its side and checks each one at the receiver.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pyforward.auditgen import RotatingAuditLog, generate_events


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the live log, e.g. /auditlog/audit.log")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--id-prefix", required=True)
    parser.add_argument("--batch", type=int, default=20, help="events per write")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between writes")
    parser.add_argument("--max-bytes", type=int, default=256 << 10, help="rotate before exceeding this")
    parser.add_argument("--pause-at", type=int, default=None, help="after this many events, wait for --gate")
    parser.add_argument("--gate", type=Path, default=None, help="a file the test creates to let the writer go on")
    parser.add_argument("--gate-timeout", type=float, default=600.0)
    args = parser.parse_args()
    lines = list(generate_events(args.count, seed=args.seed, id_prefix=args.id_prefix))
    pause_at = args.pause_at if args.pause_at is not None and args.gate is not None else len(lines)
    with RotatingAuditLog(args.out, max_bytes=args.max_bytes) as log:
        for start in range(0, len(lines), args.batch):
            if start == pause_at:
                # The test opens the gate once the sidecar is down: the rest is written, and rotated, meanwhile.
                print(f"writer: {start} events written, waiting for {args.gate}", flush=True)
                deadline = time.monotonic() + args.gate_timeout
                while not args.gate.exists():
                    if time.monotonic() > deadline:
                        print(f"writer: {args.gate} did not appear within {args.gate_timeout:g}s", flush=True)
                        return 3
                    time.sleep(0.05)  # polling interval of a condition wait
            log.write_many(lines[start : start + args.batch])
            time.sleep(args.interval)  # the pace of an API server, not synchronisation
        print(f"writer: {len(lines)} events, {log.rotations} rotations", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
