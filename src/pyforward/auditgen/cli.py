"""``python -m pyforward.auditgen --count N --out FILE [--seed S] [--id-prefix P] [--rate R]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pyforward.auditgen.events import generate_events


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pyforward.auditgen", description="Write a synthetic kube-apiserver audit log."
    )
    parser.add_argument("--count", type=int, required=True, help="number of events")
    parser.add_argument("--out", type=Path, required=True, help="output file ('-' for stdout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--id-prefix", default="", help="prefix of every auditID")
    parser.add_argument("--rate", type=float, default=None, help="events per second of log time")
    args = parser.parse_args(argv)
    events = generate_events(args.count, seed=args.seed, rate_per_second=args.rate, id_prefix=args.id_prefix)
    total = 0
    with open(sys.stdout.fileno(), "wb", closefd=False) if str(args.out) == "-" else args.out.open("wb") as out:
        batch: list[bytes] = []
        for line in events:
            batch.append(line)
            if len(batch) == 4096:
                data = b"".join(batch)
                out.write(data)
                total += len(data)
                batch.clear()
        data = b"".join(batch)
        out.write(data)
        total += len(data)
    print(f"auditgen: wrote {args.count} events ({total} bytes) to {args.out}", file=sys.stderr)
    return 0
