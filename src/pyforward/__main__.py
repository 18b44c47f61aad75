"""`python -m pyforward` and the `pyforward` command's entry point.

Kept free of heavy imports on purpose: `pyforward run` is a daemon, and SIGTERM is how Kubernetes stops it, at any
moment, including the ~0.2 s in which Python imports the settings and the pipeline (pydantic, msgpack, ...) before
the asyncio loop installs its own handler (a clean stop: send what was read, wait for the acks, save the
checkpoint). A SIGTERM in that window used to end the process by the signal: status 143, "Error" in the pod's
status, and a failed check for whoever waits on it. Until the loop takes over, SIGTERM now ends `run` at once with
status 0: nothing has been read yet, so nothing is in flight and the checkpoint is as the last run left it.
Other commands keep the default (they are not stopped by SIGTERM as a matter of course).
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType


def _stopped_before_start(signum: int, frame: FrameType | None) -> None:
    # os.write, not print: the handler may run while the main thread is inside a write to sys.stderr.
    os.write(2, b"pyforward run: stopped by SIGTERM before start-up finished; nothing was read\n")
    raise SystemExit(0)


def stop_early_on_sigterm() -> None:
    """SIGTERM ends the process with status 0 until the asyncio loop installs its handler (cli._install_stop)."""
    signal.signal(signal.SIGTERM, _stopped_before_start)


def main() -> int:
    if sys.argv[1:2] == ["run"]:
        stop_early_on_sigterm()
    from pyforward.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
